"""A training workdir's saved config and classes: written once a run starts, read to resume,
evaluate, draw, count or predict with it, and compared on restart so a workdir never mixes two
models or two sets of classes.

    WORKDIR/config.json    the whole training config of the run (RUN_CONFIG_FILE)
    WORKDIR/classes.json   the class names by class id (CLASSES_FILE; null names for data
                           without names, such as the csv route)

(A converted model directory has its own `config.json`, holding the `model` section only:
`clca_jax.pretrained.MODEL_CONFIG_FILE`.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket

import ml_collections
from absl import logging

from clca_jax.training.config import config_from_dict

RUN_CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
# Model fields that change how the model runs, not its parameters: a run may resume with others.
RUNTIME_FIELDS = frozenset({"model.attention", "model.remat"})


def run_config_path(workdir: str) -> str:
    return os.path.join(workdir, RUN_CONFIG_FILE)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config a run saved in `workdir`.

    Raises:
      FileNotFoundError: the workdir has no saved config.
      ValueError: the file is not valid JSON or holds fields this version does not know.
    """
    path = run_config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; was {workdir} written by clca_jax.main?")
    try:
        with open(path) as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); the run's saved config is damaged. Restore it "
            "or start a new --workdir."
        ) from error
    return config_from_dict(values)


def check_same_model(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose saved config describes another model: its checkpoints cannot
    continue this one."""
    path = run_config_path(workdir)
    if not os.path.isfile(path):
        return
    before = _flat(json.loads(read_run_config(workdir).to_json())["model"], "model.")
    now = _flat(json.loads(config.to_json())["model"], "model.")
    listed = _differences(before, now, ignore=RUNTIME_FIELDS)
    if listed:
        raise ValueError(
            f"{workdir} holds a run of another model ({listed}); nothing was "
            "changed. Use a new --workdir for this model, or the saved model settings to "
            "resume that run."
        )


def classes_path(workdir: str) -> str:
    return os.path.join(workdir, CLASSES_FILE)


def classes_record(num_classes: int, class_names: list[str] | None) -> dict:
    """What `CLASSES_FILE` holds: the class count and the names by class id (or None)."""
    return {"num_classes": int(num_classes), "names": list(class_names) if class_names else None}


def read_classes(workdir: str) -> dict | None:
    """The classes a run saved in `workdir` (see `classes_record`), or None when it saved none
    (a run started before the file existed).

    Raises:
      ValueError: the file is not valid JSON or lacks its fields.
    """
    path = classes_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        names = record["names"]
        if names is not None and len(names) != record["num_classes"]:
            raise ValueError(f"{len(names)} names for {record['num_classes']} classes")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path} is damaged ({error}); it should hold the run's class names. Restore it or "
            "start a new --workdir."
        ) from None
    return record


def check_same_classes(workdir: str, num_classes: int, class_names: list[str] | None) -> None:
    """Refuses to resume a run whose data now has other classes than it was started with
    (the same class ids would mean other classes)."""
    before = read_classes(workdir)
    now = classes_record(num_classes, class_names)
    if before is None or before == now:
        return
    difference = _classes_difference(before, now)
    raise ValueError(
        f"the data's classes changed since {workdir} was started ({difference}); "
        "nothing was changed. Train on the data it was started with, or use a new --workdir."
    )


def _classes_difference(before: dict, now: dict) -> str:
    """A short description of how two class records differ."""
    old, new = before["names"], now["names"]
    if before["num_classes"] != now["num_classes"]:
        return f"{before['num_classes']} classes then, {now['num_classes']} now"
    if old is None or new is None:
        said = {True: "without names", False: "with names"}
        return f"classes {said[old is None]} then, {said[new is None]} now"
    changed = [(i, a, b) for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    shown = ", ".join(f"class {i}: {a!r} -> {b!r}" for i, a, b in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return shown + more


def warn_if_config_changed(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Logs the fields that differ from the config an earlier run wrote to the workdir."""
    path = run_config_path(workdir)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = _flat(json.load(f))
    listed = _differences(before, _flat(json.loads(config.to_json())))
    if listed:
        logging.warning("The config differs from the one this workdir was started with: %s", listed)


def _differences(before: dict, now: dict, ignore=frozenset()) -> str:
    """`field: old -> new` for every flat field that differs, comma-separated ('' if none)."""
    keys = sorted((before.keys() | now.keys()) - ignore)
    changed = [(k, before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)]
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------------------------
# One run per workdir.

LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive lock on a workdir for the length of a run (process 0 of a run takes it).

    `WORKDIR/.lock` names the holder (host and PID) and is removed when the run ends. The lock
    itself is an advisory `flock` on that file, which the kernel releases when the holder
    exits, killed or not: a lock file left by a killed run is stale and is simply taken over.
    (On network file systems without `flock`, the lock is not enforced.)
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> WorkdirLock:
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise WorkdirBusyError(
                    f"{os.path.dirname(self.path)} is in use by another run ({holder}); "
                    "nothing was changed. Wait for it to finish, stop it, or use another "
                    "--workdir."
                ) from None
            # The holder before us may have removed the file between our open and our lock.
            if os.path.exists(self.path) and os.path.samestat(
                os.stat(self.path), os.fstat(handle.fileno())
            ):
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            os.remove(self.path)  # while still locked: no one can hold a lock on it now
            self._file.close()
            self._file = None


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


def check_workdir_name(workdir: str) -> str:
    """The absolute workdir path; an empty name is refused (it would mean the current folder).

    Raises:
      ValueError: `workdir` is empty or only spaces.
    """
    if not isinstance(workdir, str) or not workdir.strip():
        raise ValueError(
            f"--workdir is empty ({workdir!r}); name a folder for the run's checkpoints and logs "
            "(e.g. --workdir=runs/demo)."
        )
    return os.path.abspath(os.path.expanduser(workdir))
