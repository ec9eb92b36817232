"""How the absl commands start (`clca_jax.main`, `evaluate`, `flops`, `tools/benchmark.py`).

`run(main)` is absl's `app.run`, except that `--help`, `--helpshort` and `--helpfull` exit with
status 0 once they have printed, as the argparse commands (`visualize`, the converter,
`clca_jax.data.prepare`) do. absl exits with 1 there, so `COMMAND --help` would read as a
failure to a script or a CI step.
"""

from __future__ import annotations

import sys

from absl import app, flags


def _exiting_with_success(help_flag: type[flags.BooleanFlag]) -> type[flags.BooleanFlag]:
    class HelpExitingWithSuccess(help_flag):
        def parse(self, argument):
            try:
                super().parse(argument)
            except SystemExit:
                sys.exit(0)

    return HelpExitingWithSuccess


def run(main, flags_parser=app.parse_flags_with_usage) -> None:
    """absl's `app.run(main, flags_parser)`, with the help flags exiting with status 0."""
    app.define_help_flags()
    for help_flag in (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag):
        flag = _exiting_with_success(help_flag)()
        flag.allow_override = True  # replaces absl's flag of the same name
        flags.DEFINE_flag(flag)
    app.run(main, flags_parser=flags_parser)
