"""Metrics (clu), TensorBoard event files, the console progress line, the run summary.

TensorBoard files are written with `tensorboardX`, which needs no TensorFlow (clu's own writers
import it), and read back with `read_events`. Only process 0 writes anything.

clu reads the metric types from the collections' annotations, so this module must not use
`from __future__ import annotations`.
"""

import functools
import glob
import json
import logging
import os
import struct
import time

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics

TOP_K = 5


@flax.struct.dataclass
class NonFinite(metrics.Metric):
    """The first step since the last report whose loss or gradient was not finite.

    Merging keeps the earlier record, so merge in step order (`merge(total, new)` does).

    Attributes:
      step: that step, counted from 1 (the step count after it); 0 when all were finite.
      what: 0 for the loss, `i + 1` for gradient leaf `i` (in `jax.tree.leaves` order).
      count: how many steps were not finite.
    """

    step: jax.Array
    what: jax.Array
    count: jax.Array

    @classmethod
    def from_model_output(cls, nonfinite_step, nonfinite_what, **_) -> "NonFinite":
        bad = nonfinite_what >= 0
        return cls(
            step=jnp.where(bad, nonfinite_step, 0).astype(jnp.int32),
            what=jnp.maximum(nonfinite_what, 0).astype(jnp.int32),
            count=bad.astype(jnp.int32),
        )

    def merge(self, other: "NonFinite") -> "NonFinite":
        earlier = self.count > 0
        return type(self)(
            step=jnp.where(earlier, self.step, other.step),
            what=jnp.where(earlier, self.what, other.what),
            count=self.count + other.count,
        )

    def compute(self) -> jax.Array:
        return jnp.stack([self.step, self.what, self.count])


@flax.struct.dataclass
class FiniteLoss(metrics.Average):
    """Average of the loss over the steps whose loss and gradients were finite."""

    @classmethod
    def from_model_output(cls, loss, nonfinite_what, **_) -> "FiniteLoss":
        finite = nonfinite_what < 0
        return cls(total=jnp.where(finite, loss, 0.0), count=finite.astype(jnp.int32))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Averages over the steps since the last report, the latest learning rate, and the first
    non-finite step (see `train_step_metrics` for the inputs)."""

    loss: FiniteLoss
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    nonfinite: NonFinite


GLOBAL_NORM = "global"  # the part name of the norm of all gradients together
GRAD_NORM_PREFIX = "grad_norm/"  # their TensorBoard tags: `grad_norm/<part>`


def gradient_norms(grads) -> dict[str, jax.Array]:
    """The L2 norm of the gradients of each top-level parameter (a transformer block
    `blocks_i`, the `cla_head` or `ifa_head`, the cache's `clr` tokens, `patch_embed`, the
    classifier `head`, ...), so that the parts hold every parameter once, and under
    `GLOBAL_NORM` the norm of them all."""
    norms = {name: optax.tree.norm(part) for name, part in grads.items()}
    norms[GLOBAL_NORM] = jnp.sqrt(sum(jnp.square(norm) for norm in norms.values()))
    return norms


@flax.struct.dataclass
class GradientNorms(metrics.Metric):
    """Per-part gradient norms (see `gradient_norms`) averaged over the finite steps.

    Attributes:
      names: the part names, in the order of `total` (static).
      total: [parts] sum of each part's norm over the finite steps.
      count: how many steps were finite.
    """

    names: tuple[str, ...] = flax.struct.field(pytree_node=False)
    total: jax.Array
    count: jax.Array

    @classmethod
    def from_model_output(cls, grad_norms, nonfinite_what, **_) -> "GradientNorms":
        finite = nonfinite_what < 0
        names = tuple(grad_norms)
        values = jnp.stack([grad_norms[name] for name in names])
        return cls(names, jnp.where(finite, values, 0.0), finite.astype(jnp.int32))

    def merge(self, other: "GradientNorms") -> "GradientNorms":
        return type(self)(self.names, self.total + other.total, self.count + other.count)

    def compute(self) -> jax.Array:
        return self.total / self.count


@flax.struct.dataclass
class OverflowSteps(metrics.Metric):
    """How many steps a float16 run skipped because its scaled gradients overflowed."""

    count: jax.Array

    @classmethod
    def from_model_output(cls, overflow, **_) -> "OverflowSteps":
        return cls(overflow.astype(jnp.int32))

    def merge(self, other: "OverflowSteps") -> "OverflowSteps":
        return type(self)(self.count + other.count)

    def compute(self) -> jax.Array:
        return self.count


@functools.cache
def train_metrics_class(gradients: bool = False, loss_scale: bool = False) -> type:
    """`TrainMetrics`, plus the averaged per-part gradient norms (`gradients`) and float16's
    latest loss scale and count of overflowed steps (`loss_scale`)."""
    if not gradients and not loss_scale:
        return TrainMetrics
    fields = dict(TrainMetrics.__annotations__)
    if gradients:
        fields["grad_norms"] = GradientNorms
    if loss_scale:
        fields["loss_scale"] = metrics.LastValue.from_output("loss_scale")
        fields["overflow_steps"] = OverflowSteps
    name = "TrainMetrics" + "WithGradients" * gradients + "WithLossScale" * loss_scale
    body = {"__annotations__": fields, "__doc__": train_metrics_class.__doc__}
    return flax.struct.dataclass(type(name, (metrics.Collection,), body))


# Positional, as `train_step_metrics` calls it: functools.cache keys keyword calls apart.
TrainMetricsWithGradients = train_metrics_class(True, False)


def train_step_metrics(
    loss,
    learning_rate,
    logits,
    labels,
    step,
    nonfinite_what,
    grad_norms=None,
    loss_scale=None,
    overflow=None,
):
    """The metrics of one train step.

    Args:
      loss: the step's scalar loss.
      learning_rate: the learning rate the step used.
      logits: [batch, classes].
      labels: [batch] integer labels.
      step: the step count after this step.
      nonfinite_what: -1 when loss and gradients were finite, else what was not (see
        `NonFinite`).
      grad_norms: None, or `gradient_norms` of the step's gradients.
      loss_scale: None, or float16's loss scale after the step (then also `overflow`: whether
        the step's scaled gradients overflowed).

    Returns:
      A `train_metrics_class` collection with the parts given.
    """
    outputs = dict(
        loss=loss,
        learning_rate=learning_rate,
        nonfinite_step=step,
        nonfinite_what=nonfinite_what,
        **top_k_correct(logits, labels),
    )
    if grad_norms is not None:
        outputs["grad_norms"] = grad_norms
    if loss_scale is not None:
        outputs.update(loss_scale=loss_scale, overflow=overflow)
    collection = train_metrics_class(grad_norms is not None, loss_scale is not None)
    return collection.single_from_model_output(**outputs)


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Per-example averages over an evaluation pass; padding (mask False) is left out."""

    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


def top_k_correct(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example float hits at 1 and at 5 (5 capped at the class count)."""
    k = min(TOP_K, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hits = top == labels[:, None]
    return {
        "top1": hits[:, 0].astype(jnp.float32),
        "top5": hits.any(axis=-1).astype(jnp.float32),
    }


def merge(total, new):
    """Running merge of metric collections; `total` may be None."""
    return new if total is None else total.merge(new)


def to_floats(collection) -> dict[str, float]:
    """Host floats of a collection's scalar values (the non-finite record and the gradient
    norms are left out)."""
    values = collection.compute()
    left_out = ("nonfinite", "grad_norms")
    return {key: float(value) for key, value in values.items() if key not in left_out}


def gradient_norm_floats(collection) -> dict[str, float]:
    """Part name -> averaged gradient norm of a train collection; empty without the norms."""
    norms = getattr(collection, "grad_norms", None)
    if norms is None:
        return {}
    values = jax.device_get(norms.compute())
    return {name: float(value) for name, value in zip(norms.names, values, strict=True)}


def first_nonfinite(collection) -> tuple[int, int, int] | None:
    """(step, what, count) of the first non-finite step in a `TrainMetrics`, or None."""
    step, what, count = (int(v) for v in jax.device_get(collection.nonfinite.compute()))
    return (step, what, count) if count else None


class MetricWriter:
    """Scalars to TensorBoard event files in `logdir` (process 0 only)."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning(
                "tensorboardX is not installed, so no TensorBoard logs are written; "
                "pip install tensorboardX==2.6.5 to get them."
            )
            return
        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def write_text(self, step: int, name: str, text: str) -> None:
        """Markdown text (TensorBoard's Text tab)."""
        if self._writer is not None:
            self._writer.add_text(name, text, step)
            self._writer.flush()

    def write_image(self, step: int, name: str, pixels) -> None:
        """A uint8 RGB [H, W, 3] image (TensorBoard's Images tab)."""
        if self._writer is not None:
            self._writer.add_image(name, pixels, step, dataformats="HWC")
            self._writer.flush()

    def write_hparams(self, step: int, hparams: dict, metrics: dict[str, float]) -> None:
        """The run's settings beside its final metrics (TensorBoard's HParams tab), in the
        run's own event file (tensorboardX's `add_hparams` would open a sub-folder per call)."""
        if self._writer is None:
            return
        from tensorboardX.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):
            self._writer.file_writer.add_summary(summary)
        self.write_scalars(step, metrics)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_events(logdir: str) -> list:
    """Every event of the TensorBoard files under `logdir` (sub-folders too), file by file in
    name order; the TFRecord framing is read directly, so no TensorFlow is needed.

    Returns:
      `tensorboardX.proto.event_pb2.Event` messages.
    """
    from tensorboardX.proto import event_pb2

    events = []
    pattern = os.path.join(logdir, "**", "events.*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        # Each record: uint64 length, uint32 CRC of it, the data, uint32 CRC of the data.
        while offset + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            events.append(event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def flat_hparams(config) -> dict:
    """The config's fields as `section.field` -> number, string or bool (what the HParams tab
    takes; tuples become strings)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = str(value)

    walk("", config.to_dict())
    return flat


class Progress:
    """Steps per second and the time left, measured from the first reported step on (so the
    compile of the first step does not count)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._start_step: int | None = None
        self._start_time = 0.0
        self._last_step = 0
        self._last_time = 0.0

    def update(self, step: int) -> dict[str, float]:
        """Rates at `step` (steps done); empty at the first report, which only starts the clock."""
        now = time.perf_counter()
        if self._start_step is None:
            self._start_step, self._start_time = step, now
            self._last_step, self._last_time = step, now
            return {}
        recent = (step - self._last_step) / max(now - self._last_time, 1e-9)
        overall = (step - self._start_step) / max(now - self._start_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / overall if overall > 0 else 0.0
        return {"steps_per_second": recent, "eta_seconds": eta}

    def line(self, step: int, epoch: int, epochs: int, scalars: dict[str, float]) -> str:
        """One console line: position, metrics, speed and ETA."""
        eta = scalars.get("eta_seconds", 0.0)
        parts = [
            f"step {step}/{self.total_steps}",
            f"epoch {epoch}/{epochs}",
            f"loss {scalars['loss']:.4f}",
            f"top1 {100 * scalars['top1']:.1f}%",
            f"lr {scalars['learning_rate']:.3g}",
        ]
        if "steps_per_second" in scalars:
            parts.append(f"{scalars['steps_per_second']:.2f} steps/s")
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)


PERCENT_METRICS = ("top1", "top5")


def in_percent(scalars: dict[str, float]) -> dict[str, float]:
    """`scalars` with the accuracies as percentages, the one unit of the console, TensorBoard,
    `best/` and `summary.json` (the metrics compute fractions)."""
    return {k: 100 * v if k in PERCENT_METRICS else v for k, v in scalars.items()}


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class _DropLibraryNoise(logging.Filter):
    """Drops the library log lines that tell a user nothing they can act on:

    - orbax's per-save INFO lines, which would drown the progress lines;
    - orbax's ERROR records: each of those failures reaches our code as an exception, which is
      reported once in one line (`training.checkpoint`), where orbax logs it again from every
      thread it passed through, with a traceback each;
    - orbax's warnings that a folder opened read-only (evaluation, pictures) will not be saved
      to; its other warnings still show;
    - JAX's note that it found no TPU (`Unable to initialize backend 'tpu'`), printed on every
      CPU and GPU machine.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            if record.levelno == logging.WARNING:
                return "read_only" not in str(record.msg) and "read only" not in str(record.msg)
            return logging.INFO < record.levelno < logging.ERROR
        return not str(record.msg).startswith("Unable to initialize backend")


_LIBRARY_NOISE = _DropLibraryNoise()


def quiet_library_logs() -> None:
    """Hides the log lines `_DropLibraryNoise` lists; idempotent."""
    for name in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(name).addFilter(_LIBRARY_NOISE)


def write_json(path: str, value: dict) -> None:
    """Writes a JSON file (process 0 only), atomically."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)
