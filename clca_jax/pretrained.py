"""Converted-model directories: an orbax checkpoint of the variables plus the model config.

Layout of a directory written by `save_pretrained` (and `clca-convert`):

    DIR/config.json       the `model` config section (JSON)
    DIR/variables/        orbax checkpoint of the Flax variables
    DIR/conversion.txt    what the converter mapped, resampled, re-created or dropped

`save_pretrained` writes into a hidden folder beside DIR (`.DIR.partial-<host>-<pid>`) and
renames it to DIR only when complete, so DIR never holds a half-written model, also when the
process is killed; the next save to DIR removes what a killed one left. It refuses a DIR that
is a file, lies below a file, or is a non-empty folder other than a converted model, and
replaces a converted model only when asked to (`overwrite`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable

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
NOTES_FILE = "conversion.txt"


def model_config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A `model` config from plain values (e.g. JSON), typed by the defaults.

    Raises:
      ValueError: a field is unknown or of the wrong type; the message names it.
    """
    config = default_model_config()
    merge_saved(config, values, "model")
    return config


def save_pretrained(
    directory: str,
    variables: dict,
    model_config: ml_collections.ConfigDict,
    notes: str = "",
    overwrite: bool = False,
) -> None:
    """Writes variables and config to `directory`, complete or not at all.

    Args:
      directory: the model directory: new, or an empty folder, or (with `overwrite`) a
        converted model directory, which is replaced.
      variables: the Flax variables.
      model_config: the `model` config section they belong to.
      notes: text for `conversion.txt` (none when empty).
      overwrite: replace a converted model directory at `directory`.

    Raises:
      FileExistsError, NotADirectoryError: `directory` cannot be written; see
        `check_output_dir`.
    """
    directory = check_output_dir(directory, overwrite)

    def write(partial: str) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(partial, VARIABLES_DIR), jax.tree.map(np.asarray, variables))
        checkpointer.wait_until_finished()
        with open(os.path.join(partial, MODEL_CONFIG_FILE), "w") as f:
            f.write(model_config.to_json(indent=2))
        if notes:
            with open(os.path.join(partial, NOTES_FILE), "w") as f:
                f.write(notes + "\n")

    write_directory(directory, write, lambda: check_output_dir(directory, overwrite))


def write_directory(directory: str, write: Callable[[str], None], check: Callable[[], object]):
    """Fills `directory` by `write(folder)` complete or not at all.

    `write` fills a hidden folder beside `directory` (`.NAME.partial-<host>-<pid>`); `check()`
    runs again before the rename (it raises when `directory` may no longer be written); then
    the folder replaces `directory` (an empty folder, or a previous output, which is restored
    when anything fails). Leftovers of killed writes to the same place are removed first.
    """
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_leftovers(parent, name)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    partial = os.path.join(parent, f".{name}.partial-{tag}")
    replaced = os.path.join(parent, f".{name}.replaced-{tag}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.makedirs(partial)
        write(partial)
        check()  # again: something may have appeared meanwhile
        if os.path.isdir(directory) and os.listdir(directory):
            os.rename(directory, replaced)
            os.rename(partial, directory)
            shutil.rmtree(replaced)
        else:
            os.rename(partial, directory)  # replaces an empty folder
    except BaseException:
        if os.path.isdir(replaced) and not os.path.exists(directory):
            os.rename(replaced, directory)  # the output it was to replace, back in place
        shutil.rmtree(partial, ignore_errors=True)
        raise


def check_output_dir(
    directory: str,
    overwrite: bool = False,
    kind: str = "converted model",
    recognise: Callable[[str], bool] | None = None,
) -> str:
    """Checks that a converted model (or another `kind` of output) may be written to
    `directory`; nothing is written.

    Args:
      directory: the intended model directory (`--out`).
      overwrite: whether an existing converted model there may be replaced.
      kind: what is written, for the messages.
      recognise: tells a folder of that kind; `is_model_directory` by default.

    Returns:
      The directory's absolute path (links resolved).

    Raises:
      NotADirectoryError: a folder above `directory` is a file.
      FileExistsError: `directory` is a file, a non-empty folder that is not a converted
        model, or (without `overwrite`) a converted model.
    """
    directory = os.path.realpath(directory)
    above = os.path.dirname(directory)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(
            f"cannot create {directory}: {above} is a file, not a folder; choose an output "
            "folder outside it."
        )
    if not os.path.exists(directory):
        return directory
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory} already exists and is a file; choose another output.")
    entries = sorted(os.listdir(directory))
    if entries and not (recognise or is_model_directory)(directory):
        raise FileExistsError(
            f"{directory} already exists and holds files of something other than a {kind} "
            f"(e.g. {entries[:3]}); nothing was changed. Choose a new or empty folder."
        )
    if entries and not overwrite:
        raise FileExistsError(
            f"{directory} already exists and holds a {kind}; pass --overwrite "
            "(overwrite=True) to replace it, or choose another folder."
        )
    return directory


def is_converted_model(directory: str) -> bool:
    """True for a converted model directory, as opposed to a training workdir (both have a
    `config.json`; only a converted model has `variables/`)."""
    return os.path.isdir(os.path.join(directory, VARIABLES_DIR))


def is_model_directory(directory: str) -> bool:
    """True for a folder holding exactly what `save_pretrained` writes (notes optional)."""
    entries = set(os.listdir(directory))
    return (
        {MODEL_CONFIG_FILE, VARIABLES_DIR}
        <= entries
        <= {MODEL_CONFIG_FILE, VARIABLES_DIR, NOTES_FILE}
        and os.path.isfile(os.path.join(directory, MODEL_CONFIG_FILE))
        and os.path.isdir(os.path.join(directory, VARIABLES_DIR))
    )


def _remove_stale_leftovers(parent: str, name: str) -> None:
    """Deletes the temporary folders of killed saves to `parent/name` made on this host; the
    previous output of a save killed between its two renames (`parent/name` missing, only its
    `.replaced-` folder left) is put back in place instead."""
    pattern = re.compile(
        rf"\.{re.escape(name)}\.(partial|replaced)-{re.escape(socket.gethostname())}-(\d+)"
    )
    directory = os.path.join(parent, name)
    for entry in sorted(os.listdir(parent)):
        match = pattern.fullmatch(entry)
        if not match or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == "replaced" and not os.path.exists(directory):
            os.rename(os.path.join(parent, entry), directory)
        else:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


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
            f"{path} not found; is {directory} a directory written by clca-convert?"
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
