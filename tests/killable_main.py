"""`python -m tests.killable_main --config=... --workdir=...`: `clca_jax.main` with kill points.

The reliability tests interrupt runs at reproducible points of the training loop. The point
comes from the environment variable `KILL_AT_ENV`, read here (never by the library), and is
acted on through the loop's `train.LoopEvents` hooks:

* `step:N`: SIGKILL right after train step N;
* `save:N`: SIGKILL right after the save of step N has started (orbax writes it in the
  background);
* `term:N`: SIGTERM after train step N (a preemption notice);
* `term:start`: SIGTERM once start-up is done, before the first step;
* `term:eval`: SIGTERM before the final evaluation.

Without the variable the command is `clca_jax.main` itself.
"""

import os
import signal

from clca_jax import train

KILL_AT_ENV = "CLCA_TEST_KILL_AT"


class KillAt(train.LoopEvents):
    """Kills this process at one point of the loop (`phase:step`)."""

    def __init__(self, point: str):
        self.point = point

    def after_step(self, step: int) -> None:
        if self.point == f"step:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.point == f"term:{step}":
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, step: int) -> None:
        if self.point == f"save:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def before_loop(self, step: int) -> None:
        if self.point == "term:start":
            os.kill(os.getpid(), signal.SIGTERM)

    def before_final_evaluation(self, step: int) -> None:
        if self.point == "term:eval":
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    from clca_jax import main as clca_main

    point = os.environ.get(KILL_AT_ENV, "")
    clca_main.cli(events=KillAt(point) if point else None)
