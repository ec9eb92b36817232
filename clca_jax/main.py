"""Trains and evaluates a model as a config file says.

    python -m clca_jax.main --config=demo --workdir=runs/demo
    python -m clca_jax.main --config=soyglobal --workdir=runs/soyglobal \
        --config.data.dir=/data/soyglobal --config.model.reduction.keep_rate=0.1
    python -m clca_jax.main --workdir=runs/soyglobal    # resume: the config the run saved
    python -m clca_jax.main --workdir=runs/soyglobal --config=runs/soyglobal \
        --config.train.epochs=60                        # go on with a saved field changed

`--config` is a shipped config's name (`demo`, `soygene:tiny`) or a config file's path (see
`clca_jax.config_files`). Every config field can be set on the command line
(`--config.FIELD=VALUE`); a field the config does not have is an error. Rerunning with the same
workdir resumes from its latest checkpoint; without --config, with the config the run saved in
it (`config.json`).

On SIGTERM (a preemption notice) the run stops at the next safe point (during training: after
saving the next step) and exits with status 0 (`PREEMPTED_EXIT_CODE`); rerun the same command
to continue. A bad config, data or workdir, a damaged checkpoint or a full disk ends the run
with one `error: ...` line and status 2 (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging

from clca_jax import commands, config_files, train, user_errors
from clca_jax.training import workdirs
from clca_jax.training.config import parse_flags

PREEMPTED_EXIT_CODE = 0


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    config_files.DEFINE_config(
        "config",
        None,
        "Training config: a shipped config's name (demo, soyglobal, soygene:tiny) or a config "
        "file's path. Default: the config the run in --workdir saved.",
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.")
    flags.mark_flags_as_required(["workdir"])
    flags.DEFINE_bool(
        "debug", False, "Show the traceback of a configuration, data, workdir or disk error."
    )


def saved_config(workdir: str):
    """The config of the run in `workdir`, for a restart given only --workdir."""
    workdir = os.path.expanduser(workdir)
    if not os.path.isfile(workdirs.run_config_path(workdir)):
        raise app.UsageError(
            f"--config is needed: {workdir} holds no run to resume. (To go on with a run's "
            "saved config with fields changed: --config=WORKDIR --config.FIELD=VALUE.)"
        )
    return workdirs.read_run_config(workdir)


def main(argv, events: train.LoopEvents | None = None):
    """The command; `events` lets a wrapper act at points of the loop (see `train.LoopEvents`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        with user_errors.reported(FLAGS.debug):
            config = FLAGS.config if FLAGS.config is not None else saved_config(FLAGS.workdir)
            train.train_and_evaluate(config, FLAGS.workdir, events=events)
    except train.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)


def cli(events: train.LoopEvents | None = None) -> None:
    """`python -m clca_jax.main`, the `clca-train` command."""
    define_flags()
    command = main if events is None else functools.partial(main, events=events)
    commands.run(command, flags_parser=parse_flags, doc=__doc__, config_help=True)


if __name__ == "__main__":
    cli()
