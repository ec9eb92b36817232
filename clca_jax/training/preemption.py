"""Preemption: SIGTERM (the notice a preemptible machine gets) makes the loop save and stop."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
    """Training stopped at a preemption notice (SIGTERM) after saving a checkpoint.

    Attributes:
      step: the step saved; rerunning the same command continues from it.
    """

    def __init__(self, step: int, workdir: str, saved: bool = True):
        self.step = step
        where = f"saved step {step} in {workdir}" if saved else f"nothing to save in {workdir}"
        super().__init__(
            f"preempted (SIGTERM): {where} and stopped; rerun the same command to continue."
        )


class PreemptionNotice:
    """SIGTERM, the notice a preemptible machine gets, asks the loop to save and stop.

    With one process, a handler (installed while the object is entered) sets a flag that the
    loop reads after each step. With several, JAX's preemption service, started by
    `jax.distributed.initialize`, catches the signal and lets all processes agree on the step
    at which they save together.
    """

    def __init__(self):
        self.received = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> PreemptionNotice:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # only a flag: a handler must not log or block

    def received_here(self) -> bool:
        """Whether this process (of a single-process run) has had SIGTERM; outside the train
        loop, where several processes could not agree on a step, only one process stops."""
        return jax.process_count() == 1 and self.received

    def reached(self, step: int) -> bool:
        """Whether to save at `step` (steps done) and stop."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received
