"""Converted-model directories: an orbax checkpoint of the variables plus the model config.

Layout of a directory written by `save_pretrained` (and `tools/convert_timm_weights.py`):

    DIR/config.json       the `model` config section (JSON)
    DIR/variables/        orbax checkpoint of the Flax variables
    DIR/conversion.txt    what the converter mapped, resampled, re-created or dropped
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from clca_jax.config_values import merge_saved
from clca_jax.models import create_model, default_model_config
from clca_jax.models.vit import VisionTransformer

# The `model` section only; a training workdir's config.json is the whole run config
# (`clca_jax.training.workdirs.RUN_CONFIG_FILE`).
MODEL_CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def model_config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A `model` config from plain values (e.g. JSON), typed by the defaults.

    Raises:
      ValueError: a field is unknown or of the wrong type; the message names it.
    """
    config = default_model_config()
    merge_saved(config, values, "model")
    return config


def save_pretrained(
    directory: str, variables: dict, model_config: ml_collections.ConfigDict, notes: str = ""
) -> None:
    """Writes variables and config to `directory` (created; must not hold a checkpoint yet)."""
    directory = os.path.abspath(directory)
    target = os.path.join(directory, VARIABLES_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose another --out or remove it.")
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        f.write(model_config.to_json(indent=2))
    if notes:
        with open(os.path.join(directory, "conversion.txt"), "w") as f:
            f.write(notes + "\n")


def load_pretrained(directory: str) -> tuple[VisionTransformer, dict]:
    """Loads a directory written by `save_pretrained` or the conversion CLI.

    Returns:
      (model, variables), ready for `model.apply(variables, images, train=False)`.

    Raises:
      FileNotFoundError: the directory lacks the config or the checkpoint.
      ValueError: the stored variables do not fit the stored config.
    """
    directory = os.path.abspath(directory)
    model = create_model(read_model_config(directory))
    expected = model.abstract_variables()
    target = os.path.join(directory, VARIABLES_DIR)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{target} not found: the conversion did not finish.")
    try:
        restored = ocp.StandardCheckpointer().restore(target)
    except Exception as error:  # orbax raises assorted types for damaged checkpoints
        raise ValueError(f"Cannot read the checkpoint in {target}: {error}") from error
    check_tree_matches(restored, expected, what=f"checkpoint in {target}")
    return model, jax.tree.map(jnp.asarray, restored)


def read_model_config(directory: str) -> ml_collections.ConfigDict:
    """The `model` config of a converted model directory.

    Raises:
      FileNotFoundError: the directory has no config.
      ValueError: the file is not valid JSON or has unknown fields or wrong types.
    """
    path = os.path.join(os.path.abspath(directory), MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; is {directory} a directory written by "
            "tools/convert_timm_weights.py?"
        )
    try:
        with open(path) as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); convert the model again.") from error
    return model_config_from_dict(values)


def check_tree_matches(actual: dict, expected: dict, what: str) -> None:
    """Raises ValueError naming every missing, extra or mis-shaped leaf."""
    actual_leaves = _shapes(actual)
    expected_leaves = _shapes(expected)
    problems = [f"missing {k}" for k in sorted(expected_leaves.keys() - actual_leaves.keys())]
    problems += [f"unexpected {k}" for k in sorted(actual_leaves.keys() - expected_leaves.keys())]
    problems += [
        f"{k}: shape {actual_leaves[k]}, expected {expected_leaves[k]}"
        for k in sorted(actual_leaves.keys() & expected_leaves.keys())
        if actual_leaves[k] != expected_leaves[k]
    ]
    if problems:
        shown = "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        raise ValueError(f"The {what} does not fit the model config: {shown}")


def _shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(p, "key", p)) for p in path): tuple(np.shape(leaf))
        for path, leaf in leaves
    }
