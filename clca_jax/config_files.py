"""Config files, named or by path, and the `--config` flag of the commands built on them.

A config file is a Python file whose `get_config(arg=None)` returns an
`ml_collections.ConfigDict`. A spec says which, with an optional `:VARIANT` that is passed to
`get_config` (`tiny` shrinks the shipped configs to seconds on a CPU):

    soyglobal              a config shipped in `clca_jax/configs/` (`names()` lists them)
    soygene:tiny           the same, as `get_config("tiny")`
    configs/demo.py        a file: relative to the working directory, absolute, or `~/...`
    runs/demo              a training workdir: the config its run saved (`config.json`), so
                           that a run can go on with changed fields

A spec ending in `.py` or holding a path separator is a path, anything else a name. Config
files import only installed packages (the shipped ones start from `clca_jax.configs.common`),
so a file loads the same from any working directory:

    python -m clca_jax.main --config=soyglobal:tiny --workdir=runs/tiny
    python -m clca_jax.flops --config=~/experiments/mine.py --config.model.img_size=224

`load(spec)` is the one loader; `DEFINE_config` is the `--config` flag of `clca_jax.main`,
`clca_jax.evaluate`, `clca_jax.flops` and `tools/benchmark.py`, with ml_collections'
`--config.FIELD=VALUE` overrides; the converter's `--config` calls `load`.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The module name a config file runs under (dataclasses and pickle look modules up by name).
_MODULE_NAME = "clca_jax_config_file"

# The flag below belongs to the command that defines it (and so shows in its --help).
flags.disclaim_key_flags()


def names() -> list[str]:
    """The shipped configs' names (the files of `clca_jax/configs/`)."""
    return sorted(
        f[: -len(".py")]
        for f in os.listdir(SHIPPED_DIR)
        if f.endswith(".py") and not f.startswith("_")
    )


def resolve(spec: str) -> tuple[str, str | None]:
    """The config file and the variant a spec names.

    Args:
      spec: `NAME[:VARIANT]` or `PATH[:VARIANT]` (see the module docstring).

    Returns:
      The file's absolute path and the variant (None without one).

    Raises:
      ValueError: no shipped config has that name, or no file is at that path.
    """
    source, _, variant = spec.partition(":")
    if source.endswith(".py") or os.sep in source or "/" in source:
        path = os.path.abspath(os.path.expanduser(source))
        saved = os.path.join(path, _run_config_file())
        if os.path.isdir(path) and os.path.isfile(saved):
            if variant:
                raise ValueError(f"{source} is a workdir; its saved config takes no variant.")
            return saved, None
        if not os.path.isfile(path):
            raise ValueError(
                f"config file {source} not found (looked for {path}); give the path of a "
                f"config file or the name of a shipped config ({', '.join(names())})."
            )
    elif source in names():
        path = os.path.join(SHIPPED_DIR, f"{source}.py")
    else:
        raise ValueError(
            f"{source!r} is not the name of a shipped config ({', '.join(names())}); a path "
            "to a config file ends in .py."
        )
    return path, variant or None


def _run_config_file() -> str:
    from clca_jax.training.workdirs import RUN_CONFIG_FILE  # imports jax: only when needed

    return RUN_CONFIG_FILE


def load(spec: str) -> ml_collections.ConfigDict:
    """The config a spec names: its file's `get_config()`, or `get_config(VARIANT)`.

    Raises:
      ValueError: the spec names nothing (see `resolve`), the file has no `get_config`, it
        imports a module that cannot be imported here, or `get_config` refuses the variant.
    """
    path, variant = resolve(spec)
    if os.path.basename(path) == _run_config_file():
        from clca_jax.training import workdirs

        return workdirs.read_run_config(os.path.dirname(path))
    get_config = getattr(_run_file(path), "get_config", None)
    if get_config is None:
        raise ValueError(
            f"{path} has no get_config(); a config file defines get_config(arg=None) "
            "returning an ml_collections.ConfigDict."
        )
    return get_config(variant) if variant else get_config()


def _run_file(path: str):
    """Executes a config file as a fresh module."""
    module_spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_MODULE_NAME] = module
    try:
        module_spec.loader.exec_module(module)
    except ImportError as error:
        raise ValueError(
            f"{path} imports what cannot be imported here ({error}). Config files import "
            "only installed packages, so that they load from any folder: "
            "`from clca_jax.configs import common`, not `from configs import common`."
        ) from error
    return module


class _SpecParser(flags.ArgumentParser):
    """Parses a config flag's value with `load`."""

    def __init__(self, lock_config: bool):
        self._lock_config = lock_config

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        config = load(argument)
        if self._lock_config:
            config.lock()
        return config

    def flag_type(self) -> str:
        return "config name or file"


def DEFINE_config(
    name: str, default: str | None, help_string: str, lock_config: bool = True
) -> flags.FlagHolder:
    """A flag whose value is the config a spec names, with `--NAME.FIELD=VALUE` overrides.

    It is ml_collections' `DEFINE_config_file` flag (overrides, their types and checks),
    loading through `load`, so a name works as well as a path.

    Args:
      name: the flag's name (`config`).
      default: a spec used when the flag is not given, or None.
      help_string: the flag's help.
      lock_config: lock the config, so that an override cannot add a field.

    Returns:
      The flag's holder; `.value` is the ConfigDict (None when absent without a default).
    """
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=lock_config)
    flags.FLAGS[name].parser = _SpecParser(lock_config)
    if default is not None:
        flags.FLAGS.set_default(name, default)
    return holder
