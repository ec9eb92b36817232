"""Starting a run from a converted checkpoint (`config.init.checkpoint`).

The converted variables are mapped onto the freshly initialised ones of the model being
trained, leaf by leaf (spec 1.3 and 3.1):

* a leaf with the same path and shape is copied;
* the classifier `head` stays fresh when the class count differs;
* `pos_embed` of another grid is resampled to the model's grid (PyTorch's antialiased bicubic,
  the timm route); CLR rows the checkpoint lacks are drawn from N(0, 0.02^2);
* CLR tokens (`clr`) the checkpoint lacks become copies of its class token (these two rules
  are the converter's own, from `clca_jax.convert.adapt`);
* leaves the checkpoint lacks (the CLA head, DynamicViT predictors, batch statistics) stay
  fresh, and checkpoint leaves the model lacks are dropped; both are reported;
* any other shape disagreement is an error naming the leaf.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from clca_jax.convert.adapt import Report, adapt_pos_embed
from clca_jax.models.clca import clr_from_class_token


def warm_start(
    target: dict, source: dict, *, grid: int, no_embed_class: bool, seed: int
) -> tuple[dict, Report]:
    """Maps converted variables onto freshly initialised ones.

    Args:
      target: the model's fresh variables (`params`, maybe `batch_stats`); leaves that stay
        fresh are returned as the very same objects.
      source: the converted variables (arrays of any kind; read as NumPy).
      grid: patches per side of the model's input (`model.grid`).
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
    report = Report()
    rng = np.random.default_rng(seed)
    merged = {}
    for key, fresh in flat_target.items():
        merged[key] = _take(key, fresh, flat_source, report, grid, no_embed_class, rng)
    for key in sorted(k for k in flat_source if k not in flat_target):
        report.drop(key)
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
        return clr_from_class_token(source["params/cls_token"], shape[1])
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
    """The checkpoint's embedding on the model's grid, with the model's CLR rows."""
    num_prefix = 0 if no_embed_class else 1
    clr = source.get("params/clr")
    source_clr = 0 if no_embed_class or clr is None else clr.shape[1]
    try:
        adapted, how = adapt_pos_embed(
            value,
            grid=grid,
            num_prefix=num_prefix,
            source_clr=source_clr,
            target_clr=shape[1] - num_prefix - grid * grid,
            antialias=True,
            rng=rng,
        )
    except ValueError as error:
        raise ValueError(f"init.checkpoint leaf 'params/pos_embed': {error}") from error
    if adapted.shape != shape:
        raise ValueError(
            f"init.checkpoint leaf 'params/pos_embed' has shape {value.shape}; the model "
            f"expects {shape}."
        )
    report.adapted["params/pos_embed"] = "; ".join(how)
    return adapted
