"""Metrics (clu), TensorBoard event files, the console progress line, the run summary.

TensorBoard files are written with `tensorboardX`, which needs no TensorFlow (clu's own writers
import it). Only process 0 writes anything.

clu reads the metric types from the collections' annotations, so this module must not use
`from __future__ import annotations`.
"""

import json
import logging
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
from clu import metrics

TOP_K = 5


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Averages over the steps since the last report, and the latest learning rate."""

    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    learning_rate: metrics.LastValue.from_output("learning_rate")


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
    """Host floats of a collection's computed values."""
    return {key: float(value) for key, value in collection.compute().items()}


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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class _DropCheckpointInfo(logging.Filter):
    """Drops orbax's per-save INFO lines, which would drown the progress lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


_CHECKPOINT_FILTER = _DropCheckpointInfo()


def quiet_checkpoint_logs() -> None:
    """Hides orbax's INFO messages (warnings and errors still show); idempotent."""
    logging.getLogger("absl").addFilter(_CHECKPOINT_FILTER)


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
