"""Checkpoints of a training workdir, written with orbax.

Layout:

    WORKDIR/checkpoints/<step>/state      the TrainState (step, params, batch_stats,
                                          opt_state, base RNG key), one array file per leaf
    WORKDIR/checkpoints/<step>/loader     the train loader's `get_state()` (JSON)
    WORKDIR/best/<step>/variables         params (+ batch_stats) of the best evaluation
    WORKDIR/best/<step>/metrics           its evaluation metrics (orbax keeps the best top-1)

`checkpoints/` keeps the newest `max_to_keep` saves and is what a restarted run resumes from;
`best/` keeps one. Arrays are restored onto whatever shardings the caller's abstract tree
carries, so a checkpoint written on 8 devices restores on 1 and vice versa.

A save is atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
once every file is complete, so a run killed during a save leaves a temporary folder that no
restore picks up; opening the folders (not read-only) deletes such leftovers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import jax
import orbax.checkpoint as ocp


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); earlier complete
    checkpoints are intact."""


LATEST_DIR = "checkpoints"
BEST_DIR = "best"
BEST_METRIC = "top1"


class Checkpoints:
    """The latest and best checkpoints of one workdir.

    Attributes:
      workdir: the run's directory.
    """

    def __init__(
        self, workdir: str, max_to_keep: int = 2, keep_best: bool = True, read_only: bool = False
    ):
        """Opens (or, unless `read_only`, creates) the checkpoint folders of `workdir`."""
        self.workdir = os.path.abspath(workdir)
        access = {
            "create": not read_only,
            "read_only": read_only,
            "cleanup_tmp_directories": not read_only,
        }
        self._latest = ocp.CheckpointManager(
            os.path.join(self.workdir, LATEST_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **access),
        )
        self._saving = None  # the step of the latest save started
        self._best = None
        if keep_best:
            self._best = ocp.CheckpointManager(
                os.path.join(self.workdir, BEST_DIR),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, best_fn=lambda m: m[BEST_METRIC], best_mode="max", **access
                ),
            )

    def latest_step(self) -> int | None:
        """Step of the newest resumable checkpoint, or None."""
        return self._latest.latest_step()

    def save(self, step: int, state, loader_state: dict) -> None:
        """Saves the train state and the input position (asynchronously; skip if present).

        Raises:
          CheckpointWriteError: this save, or an earlier one still in flight, failed.
        """
        if step in self._latest.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)
        )
        # orbax first waits for the save in flight: an error here is most likely that one's.
        with self._writing(self._saving if self._saving is not None else step):
            self._latest.save(step, args=args)
        self._saving = step

    def check_saves(self) -> None:
        """Raises `CheckpointWriteError` if a background save has failed (does not wait)."""
        if self._saving is not None:
            with self._writing(self._saving):
                self._latest.check_for_errors()

    @contextlib.contextmanager
    def _writing(self, step: int):
        """Turns orbax's errors while writing step `step` into one `CheckpointWriteError`."""
        try:
            yield
        except Exception as error:  # orbax and tensorstore raise assorted types
            if isinstance(error, CheckpointWriteError):
                raise
            complete = [s for s in self._latest.all_steps() if s != step]
            kept = f"checkpoint {max(complete)} is intact" if complete else "none was saved before"
            folder = os.path.join(self.workdir, LATEST_DIR)
            raise CheckpointWriteError(
                f"cannot save checkpoint {step} in {folder}: {_first_line(error)}. Training "
                f"stopped at the first failed save; {kept}. Free space (or fix the folder) and "
                "rerun the same command to continue."
            ) from error

    def restore(self, abstract_state, step: int | None = None):
        """The train state and loader state at `step` (default: the latest).

        Args:
          abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with shardings.
          step: which checkpoint; None for the latest.

        Returns:
          (state, loader_state).
        """
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()
        )
        with _reading(lambda error: self._unreadable(step, error)):
            restored = self._latest.restore(step, args=args)
        return restored["state"], restored["loader"]

    def restore_variables(
        self, abstract_variables: dict, step: int | None = None, part: str = ""
    ) -> dict:
        """Only the model variables (params, batch_stats) of the train state at `step`
        (default: the latest): evaluation needs no optimizer state, so none is read.

        Args:
          abstract_variables: `{'params': ..., 'batch_stats'?: ...}` of ShapeDtypeStructs
            with shardings.
          part: '' for the trained variables, `ema` for their moving average.
        """
        step = self.latest_step() if step is None else step
        wanted = {"params": abstract_variables["params"]}
        wanted["batch_stats"] = abstract_variables.get("batch_stats", {})
        if part:
            if not wanted["batch_stats"]:
                del wanted["batch_stats"]
            wanted = {part: wanted}
        restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=wanted, restore_args=restore_args, partial_restore=True
            )
        )
        with _reading(lambda error: self._unreadable(step, error)):
            restored = self._latest.restore(step, args=args)["state"]
        restored = restored[part] if part else restored
        variables = {"params": restored["params"]}
        if restored.get("batch_stats"):
            variables["batch_stats"] = restored["batch_stats"]
        return variables

    def _unreadable(self, step: int, error: Exception) -> str:
        folder = os.path.join(self.workdir, LATEST_DIR, str(step))
        earlier = [s for s in self._latest.all_steps() if s < step]
        instead = (
            f"to resume from step {max(earlier)}" if earlier else "to start this run from scratch"
        )
        return (
            f"cannot restore checkpoint {folder}: {_first_line(error)}. Its "
            "files are damaged or belong to another model. Nothing was changed; delete that "
            f"folder {instead}, or use a new --workdir."
        )

    def save_best(self, step: int, variables: dict, metrics: dict[str, float]) -> None:
        """Offers an evaluated model; orbax keeps it if its top-1 is the best so far."""
        if self._best is None or step in self._best.all_steps():
            return
        self._best.save(
            step,
            args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
            metrics={k: float(v) for k, v in metrics.items()},
        )

    def best_step(self) -> int | None:
        """Step of the best evaluated model, or None."""
        return None if self._best is None else self._best.best_step()

    def restore_best(self, abstract_variables: dict) -> dict:
        """The variables of the best evaluated model onto the given shardings."""
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(
                f"{os.path.join(self.workdir, BEST_DIR)} holds no checkpoint; the run has not "
                "been evaluated yet. Use the latest checkpoint instead."
            )
        args = ocp.args.Composite(variables=ocp.args.StandardRestore(abstract_variables))
        folder = os.path.join(self.workdir, BEST_DIR, str(step))
        with _reading(
            lambda error: (
                f"cannot restore the best checkpoint {folder}: {_first_line(error)}. Its files "
                "are damaged or belong to another model; nothing was changed. Evaluate the "
                "latest checkpoint instead (--checkpoint=latest)."
            )
        ):
            restored = self._best.restore(step, args=args)
        return restored["variables"]

    def wait(self) -> None:
        """Blocks until pending saves are on disk.

        Raises:
          CheckpointWriteError: a pending save failed.
        """
        with self._writing(self._saving if self._saving is not None else -1):
            self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes the folders (also when a save failed).

        Raises:
          CheckpointWriteError: a pending save failed.
        """
        try:
            self.wait()
        finally:
            self._saving = None
            with contextlib.suppress(Exception):  # a failed save has been reported already
                self._latest.close()
                if self._best is not None:
                    self._best.close()


@contextlib.contextmanager
def _reading(describe):
    """Turns orbax's errors while reading into one `ValueError(describe(error))`.

    orbax raises assorted types for damaged or foreign files. When one array fails, orbax
    closes its event loop while tensorstore still reads the others; their completions then
    report "Event loop is closed" as unraisable exceptions, tracebacks printed around the
    one error line. Those (and only those) are silenced from the first restore on: they can
    come before the error reaches this frame, and after it.
    """
    _silence_reads_orphaned_by_a_failed_restore()
    try:
        yield
    except Exception as error:
        raise ValueError(describe(error)) from error


def _is_orphaned_read(unraisable) -> bool:
    return (
        unraisable.object is None
        and unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
    )


def _silence_reads_orphaned_by_a_failed_restore() -> None:
    previous = sys.unraisablehook
    if getattr(previous, "drops_orphaned_reads", False):
        return

    def hook(unraisable):
        if not _is_orphaned_read(unraisable):
            previous(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook


def _first_line(error: Exception) -> str:
    """`Type: first line of the message` (orbax's messages can be pages of tensorstore JSON,
    which is cut off)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = reason.split(" See full TensorStore details")[0].rstrip(".")
    return f"{type(error).__name__}: {reason[:300]}" if reason else type(error).__name__


def check_writable(workdir: str) -> None:
    """Creates `workdir/checkpoints` and writes and deletes a probe file in it, so that a
    directory the run cannot write is reported before any data is read or anything compiled.

    Raises:
      OSError: the folder cannot be created or written; says which and why.
    """
    folder = os.path.join(os.path.abspath(workdir), LATEST_DIR)
    probe = os.path.join(folder, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe\n")
        os.remove(probe)
    except OSError as error:
        raise OSError(
            f"cannot write checkpoints to {folder}: {error.strerror or error} "
            f"({type(error).__name__}). Nothing was trained. Point --workdir at a writable "
            "directory with free space."
        ) from error


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves on `shardings` (restore targets)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )
