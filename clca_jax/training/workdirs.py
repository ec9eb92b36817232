"""A training workdir's saved config: written once a run starts, read to resume, evaluate,
draw or count it, and compared on restart so a workdir never mixes two models.

    WORKDIR/config.json    the whole training config of the run (RUN_CONFIG_FILE)

(A converted model directory has its own `config.json`, holding the `model` section only:
`clca_jax.pretrained.MODEL_CONFIG_FILE`.)
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from clca_jax.training.config import config_from_dict

RUN_CONFIG_FILE = "config.json"
# Model fields that change how the model runs, not its parameters: a run may resume with others.
RUNTIME_FIELDS = frozenset({"model.attention"})


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
