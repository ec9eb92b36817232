"""What conversion and warm start share: fitting checkpoint values to a model, and the report.

Both routes into a model, `convert.timm` (a PyTorch state dict -> a converted model) and
`training.warm_start` (a converted model -> the variables of a run), adapt the same two things
the same way:

* the position embedding of another patch grid is resampled with PyTorch's bicubic kernel
  (`resample.py`); CLR rows the checkpoint lacks are drawn from N(0, CLR_POS_STD^2);
* CLR tokens the checkpoint lacks become copies of its class token
  (`models.clca.clr_from_class_token`, as the model initialises them).

Both account for every entry in one `Report`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from clca_jax.convert.resample import resample_pos_embed

# Standard deviation of the position-embedding rows of new CLR tokens (timm's init of new
# position rows).
CLR_POS_STD = 0.02


@dataclasses.dataclass
class Report:
    """What happened to every entry of a checkpoint and every leaf of the model.

    Attributes:
      copied: entries taken as they are (up to PyTorch -> Flax layout).
      adapted: leaves computed from checkpoint values, with how.
      fresh: leaves left at (or given) a new initial value, with why.
      dropped: checkpoint entries the model has no use for.
      why_dropped: the reason of each dropped entry that has one.
    """

    copied: list[str] = dataclasses.field(default_factory=list)
    adapted: dict[str, str] = dataclasses.field(default_factory=dict)
    fresh: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    why_dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    def drop(self, key: str, why: str | None = None) -> None:
        self.dropped.append(key)
        if why is not None:
            self.why_dropped[key] = why

    def lines(self) -> list[str]:
        """A readable account: one line per group and per adapted, fresh or dropped entry."""
        out = [f"copied {len(self.copied)} tensors from the checkpoint"]
        out += [f"adapted {key}: {how}" for key, how in self.adapted.items()]
        out += [f"fresh {key}: {why}" for key, why in self.fresh.items()]
        for key in self.dropped:
            why = self.why_dropped.get(key, "not in this model")
            out.append(f"dropped {key}: {why}")
        return out

    def summary(self) -> str:
        return "\n".join(self.lines())


def adapt_pos_embed(
    value: np.ndarray,
    *,
    grid: int,
    num_prefix: int,
    source_clr: int,
    target_clr: int,
    antialias: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[str]]:
    """A checkpoint's position embedding fitted to a model's grid and CLR count.

    Args:
      value: [1, num_prefix + side^2 + source_clr, D].
      grid: patches per side of the model.
      num_prefix: class- and register-token rows (0 with `no_embed_class`).
      source_clr: CLR rows at the end of `value`.
      target_clr: CLR rows the model needs.
      antialias: PyTorch's antialiased kernel (timm route) or not (OpenCLIP route).
      rng: draws the rows of new CLR tokens.

    Returns:
      The embedding [1, num_prefix + grid^2 + target_clr, D] (float32) and what was
      done, one phrase per change (empty when nothing changed).

    Raises:
      ValueError: the rows are not prefix + a square grid + CLR rows.
    """
    table = value[:, : value.shape[1] - source_clr]
    clr_rows = value[:, value.shape[1] - source_clr :]
    patches = table.shape[1] - num_prefix
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches or target_clr < 0:
        raise ValueError(
            f"pos_embed has shape {tuple(value.shape)}, which is not {num_prefix} class/register "
            f"token row(s) + a square grid + {source_clr} CLR row(s); the checkpoint is of "
            "another architecture (check the backbone name and the size overrides)."
        )
    resampled = resample_pos_embed(table, (grid, grid), num_prefix, antialias)
    how = []
    if side != grid:
        kernel = "antialiased a=-0.5" if antialias else "non-antialiased a=-0.75"
        how.append(f"{side}x{side} -> {grid}x{grid} grid, bicubic {kernel}")
    if target_clr == source_clr:
        rows = clr_rows
    elif target_clr == 0:
        rows = clr_rows[:, :0]
        how.append(f"{source_clr} CLR rows dropped (the model has no CLR tokens)")
    else:
        width = value.shape[2]
        rows = rng.normal(0.0, CLR_POS_STD, (1, target_clr, width))
        how.append(f"{target_clr} CLR rows drawn from N(0, {CLR_POS_STD}^2)")
    return np.concatenate([resampled, rows.astype(np.float32)], axis=1), how
