"""How the absl commands start (`clca_jax.main`, `evaluate`, `flops`, `demo`, `benchmark`).

`run(main, doc=...)` is absl's `app.run`, except that
- `--help`, `--helpshort` and `--helpfull` exit with status 0 once they have printed, as the
  argparse commands (`visualize`, the converter, `clca_jax.data.prepare`) do. absl exits with
  1 there, so `COMMAND --help` would read as a failure to a script or a CI step;
- the help starts with the command's own docstring (`doc`) also when it runs as an installed
  console script, whose `__main__` is a generated wrapper without one, and, for the commands
  that take `--config`, ends with the config fields most runs set, with their defaults.
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


# The config fields most runs set, listed in the help of the commands that take `--config`.
COMMON_FIELDS = (
    "data.name",
    "data.dir",
    "model.backbone",
    "model.img_size",
    "model.dtype",
    "model.attention",
    "model.remat",
    "model.reduction.method",
    "model.reduction.keep_rate",
    "model.reduction.locations",
    "model.clca.head",
    "model.clca.clc",
    "init.checkpoint",
    "optim.lr",
    "train.epochs",
    "train.batch_size",
    "train.accumulation_steps",
    "eval.batch_size",
    "seed",
)


def config_fields_help() -> str:
    """The `--config.FIELD` lines of the help: `COMMON_FIELDS` with their defaults."""
    from clca_jax.training.config import default_config  # the config needs jax; help does not

    defaults = default_config()
    lines = ["", "Config fields most runs set (defaults of a config that does not set them):"]
    for field in COMMON_FIELDS:
        value = defaults
        for key in field.split("."):
            value = value[key]
        lines.append(f"  --config.{field}={value!r}")
    lines.append("Every field: clca_jax.training.config.default_config().")
    return "\n".join(lines) + "\n"


def run(
    main, flags_parser=app.parse_flags_with_usage, doc: str | None = None, config_help=False
) -> None:
    """absl's `app.run(main, flags_parser)`, with the help flags exiting with status 0.

    Args:
      main: the command's function of argv.
      flags_parser: absl's flags parser.
      doc: the help's text (the command module's docstring).
      config_help: list `COMMON_FIELDS` at the end of the help text.
    """
    from clca_jax.training.metrics import quiet_library_logs

    quiet_library_logs()
    if doc is not None:
        sys.modules["__main__"].__doc__ = doc + (config_fields_help() if config_help else "")
    app.define_help_flags()
    for help_flag in (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag):
        flag = _exiting_with_success(help_flag)()
        flag.allow_override = True  # replaces absl's flag of the same name
        flags.DEFINE_flag(flag)
    app.run(main, flags_parser=flags_parser)
