"""Trains and evaluates a model as a config file says.

    python -m clca_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m clca_jax.main --config=configs/soyglobal.py --workdir=runs/soyglobal \
        --config.data.dir=/data/soyglobal --config.model.reduction.keep_rate=0.1

Every config field can be set on the command line (`--config.FIELD=VALUE`); a field the config
does not have is an error. Rerunning with the same workdir resumes from its latest checkpoint.

On SIGTERM (a preemption notice) the run stops at the next safe point (during training: after
saving the next step) and exits with status 0 (`PREEMPTED_EXIT_CODE`); rerun the same command
to continue. A bad config, data or workdir, a damaged checkpoint or a full disk ends the run
with one `error: ...` line and status 2 (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clca_jax import commands, train, user_errors
from clca_jax.training.config import parse_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/demo.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.")
flags.mark_flags_as_required(["config", "workdir"])
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of a configuration, data, workdir or disk error."
)
PREEMPTED_EXIT_CODE = 0


def main(argv, events: train.LoopEvents | None = None):
    """The command; `events` lets a wrapper act at points of the loop (see `train.LoopEvents`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        with user_errors.reported(_DEBUG.value):
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, events=events)
    except train.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    commands.run(main, flags_parser=parse_flags)
