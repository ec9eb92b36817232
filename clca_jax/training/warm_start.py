"""Starting a run from a converted checkpoint (`config.init.checkpoint`).

The converted variables are mapped onto the freshly initialised ones of the model being
trained, leaf by leaf (spec 1.3 and 3.1):

* a leaf with the same path and shape is copied;
* the classifier `head` stays fresh when the class count differs;
* `pos_embed` of another grid is resampled to the model's grid (PyTorch's antialiased bicubic,
  the timm route); CLR rows the checkpoint lacks are drawn from N(0, 0.02^2);
* CLR tokens (`clr`) the checkpoint lacks become copies of its class token;
* leaves the checkpoint lacks (the CLA head, DynamicViT predictors, batch statistics) stay
  fresh, and checkpoint leaves the model lacks are dropped; both are reported;
* any other shape disagreement is an error naming the leaf.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import traverse_util

from clca_jax.convert.resample import resample_pos_embed

CLR_POS_STD = 0.02


@dataclasses.dataclass
class WarmStartReport:
    """What happened to each leaf, by '/'-joined path.

    Attributes:
      copied: leaves taken unchanged from the checkpoint.
      adapted: leaves computed from checkpoint values, with how.
      fresh: leaves left at their fresh initialisation, with why.
      dropped: checkpoint leaves the model has no place for.
    """

    copied: list[str] = dataclasses.field(default_factory=list)
    adapted: dict[str, str] = dataclasses.field(default_factory=dict)
    fresh: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """A readable account, one line per group and per adapted/fresh leaf."""
        out = [f"copied {len(self.copied)} leaves from the checkpoint"]
        out += [f"adapted {key}: {how}" for key, how in self.adapted.items()]
        out += [f"fresh {key}: {why}" for key, why in self.fresh.items()]
        if self.dropped:
            out.append(f"dropped (not in this model): {', '.join(self.dropped)}")
        return out


def warm_start(
    target: dict, source: dict, *, grid: int, no_embed_class: bool, seed: int
) -> tuple[dict, WarmStartReport]:
    """Maps converted variables onto freshly initialised ones.

    Args:
      target: the model's fresh variables (`params`, maybe `batch_stats`); leaves that stay
        fresh are returned as the very same objects.
      source: the converted variables (arrays of any kind; read as NumPy).
      grid: patches per side of the model's input (img_size // patch_size).
      no_embed_class: DeiT-3 layout (position embedding over patches only).
      seed: seed of the N(0, 0.02^2) rows added for CLR tokens.

    Returns:
      (variables, report): the target tree with checkpoint values (NumPy) where they fit.

    Raises:
      ValueError: a leaf exists in both with shapes that no rule reconciles; names the leaf.
    """
    flat_target = traverse_util.flatten_dict(target, sep="/")
    flat_source = {
        key: np.asarray(value) for key, value in traverse_util.flatten_dict(source, sep="/").items()
    }
    report = WarmStartReport()
    rng = np.random.default_rng(seed)
    merged = {}
    for key, fresh in flat_target.items():
        merged[key] = _take(key, fresh, flat_source, report, grid, no_embed_class, rng)
    report.dropped = sorted(k for k in flat_source if k not in flat_target)
    return traverse_util.unflatten_dict(merged, sep="/"), report


def _take(key, fresh, source, report, grid, no_embed_class, rng):
    """The value of one target leaf."""
    shape = tuple(fresh.shape)
    value = source.get(key)
    if value is not None and value.shape == shape:
        report.copied.append(key)
        return value
    if key == "params/clr" and value is None and "params/cls_token" in source:
        report.adapted[key] = f"{shape[1]} copies of the checkpoint's cls_token"
        return np.tile(source["params/cls_token"], (1, shape[1], 1))
    if value is None:
        report.fresh[key] = "not in the checkpoint"
        return fresh
    if key.startswith("params/head/"):
        report.fresh[key] = f"checkpoint head has shape {value.shape}, this model {shape}"
        return fresh
    if key == "params/pos_embed":
        return _pos_embed(value, shape, source, report, grid, no_embed_class, rng)
    raise ValueError(
        f"init.checkpoint leaf {key!r} has shape {value.shape} but the model expects {shape}; "
        "the checkpoint was converted for another architecture (check model.backbone and the "
        "size overrides embed_dim/depth/num_heads)."
    )


def _pos_embed(value, shape, source, report, grid, no_embed_class, rng):
    """Resamples the patch rows to the model's grid and fits the CLR rows."""
    num_prefix = 0 if no_embed_class else 1
    source_clr = 0 if no_embed_class else _num_clr(source)
    target_rows = shape[1]
    table = value[:, : value.shape[1] - source_clr]
    clr_rows = value[:, value.shape[1] - source_clr :]
    patches = table.shape[1] - num_prefix
    side = math.isqrt(patches)
    target_clr = target_rows - num_prefix - grid * grid
    if side * side != patches or target_clr < 0 or (no_embed_class and target_clr):
        raise ValueError(
            f"init.checkpoint leaf 'params/pos_embed' has shape {value.shape}, which is not "
            f"{num_prefix} prefix row(s) + a square grid + {source_clr} CLR row(s); the model "
            f"expects {shape}."
        )
    resampled = resample_pos_embed(table, (grid, grid), num_prefix, antialias=True)
    how = [f"{side}x{side} -> {grid}x{grid} grid (bicubic, antialiased)"]
    if target_clr == source_clr:
        rows = clr_rows.astype(np.float32)
    else:
        rows = rng.normal(0.0, CLR_POS_STD, (1, target_clr, shape[2])).astype(np.float32)
        how.append(f"{target_clr} CLR rows drawn from N(0, {CLR_POS_STD}^2)")
    report.adapted["params/pos_embed"] = "; ".join(how)
    return np.concatenate([resampled, rows], axis=1)


def _num_clr(source: dict) -> int:
    clr = source.get("params/clr")
    return 0 if clr is None else clr.shape[1]
