"""Saved configs (JSON) back into typed ConfigDicts."""

from __future__ import annotations

import ml_collections


def merge_saved(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    """Writes saved `values` into `target` (the defaults), field by field, keeping its types.

    Lists become tuples where the default is a tuple (JSON has no tuples).

    Raises:
      ValueError: a field is unknown, or a value has the wrong type; the message names it.
    """
    for key, value in values.items():
        if key not in target:
            raise ValueError(f"{prefix}.{key} in the saved config is not a known field.")
        if isinstance(target[key], ml_collections.ConfigDict):
            merge_saved(target[key], value, f"{prefix}.{key}")
        elif isinstance(target[key], tuple) and isinstance(value, list):
            target[key] = tuple(value)
        else:
            _set_typed(target, key, value, prefix)


def _set_typed(target: ml_collections.ConfigDict, key: str, value, prefix: str) -> None:
    try:
        target[key] = value
    except TypeError as error:
        raise ValueError(
            f"{prefix}.{key} in the saved config is {value!r}, not a "
            f"{type(target[key]).__name__} as the field needs; the file was edited or written "
            "by another version. Fix the value or start a new workdir."
        ) from error
