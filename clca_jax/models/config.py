"""The model section of a config: defaults, validation, and the resolved architecture."""

from __future__ import annotations

import ast
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from clca_jax import normalization
from clca_jax.models import registry
from clca_jax.models.reduction import METHODS, NO_REDUCTION, get_method
from clca_jax.models.reduction.ats import DISTANCES as ATS_DISTANCES

NO_HEAD = "none"
CLCA_HEADS = (NO_HEAD, "cla", "ifa")
# `auto`: bfloat16 on accelerators, float32 on the CPU (see `compute_dtype`).
DTYPES = ("auto", "float32", "bfloat16", "float16")
# `block`: each block's halves are recomputed in the backward pass (jax.checkpoint with
# nothing saved); a `jax.checkpoint_policies` name keeps what that policy saves.
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")
REMAT_CHOICES = ("none", "block", *REMAT_POLICIES)
# How attention runs: `per_image` loops over the images of a batch (each [heads, N, N] map stays
# in cache: about 2x faster for ViT-B at 448 px on a CPU), `batched` is one pass over the batch,
# `fused` calls jax.nn.dot_product_attention (cuDNN flash attention on GPUs) and computes the
# class token's probability row on the side; `auto` picks per_image on the CPU, fused elsewhere.
ATTENTION_CHOICES = ("auto", "per_image", "batched", "fused")


class _KeepRateType(type):
    def __instancecheck__(cls, value) -> bool:
        return isinstance(value, int | float | list | tuple) and not isinstance(value, bool)


class KeepRate(metaclass=_KeepRateType):
    """The type of `model.reduction.keep_rate`: a number or a list of numbers, so a config
    may hold either (a plain float field refuses a list) while a string is still refused."""


class _KeepRateParser(flags.ArgumentParser):
    """`--config.model.reduction.keep_rate=0.1` or `='(0.5, 0.3, 0.2)'` on the command line."""

    def parse(self, argument):
        if not isinstance(argument, str):
            return argument
        try:
            value = ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            raise ValueError(
                f"model.reduction.keep_rate must be a number or a list such as (0.5, 0.3, 0.2), "
                f"got {argument!r}."
            ) from None
        # One rate stays a float, as the field was before it took lists (`=1` is 1.0).
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


config_flags.register_flag_parser_for_type(KeepRate, _KeepRateParser())


def default_model_config() -> ml_collections.ConfigDict:
    """The `model` section with every field a user may set.

    `embed_dim`, `depth` and `num_heads` default to the backbone's own values; setting them
    builds a smaller or larger model of the same family (tests, laptop-sized runs).
    `reduction.keep_rate` takes one rate or a list with one entry per location (the official
    `--keep_rate r1 r2 ...`), so its field accepts either type.
    """
    return ml_collections.ConfigDict(
        {
            "backbone": "vit_base_patch16_224.orig_in21k",
            "img_size": 448,
            "num_classes": 1000,
            "dtype": "float32",
            "attention": "auto",
            "remat": "none",
            "normalization": normalization.DEFAULT,
            "embed_dim": config_dict.placeholder(int),
            "depth": config_dict.placeholder(int),
            "num_heads": config_dict.placeholder(int),
            "drop_path_rate": 0.0,
            "dropout_rate": 0.0,
            "reduction": {
                "method": NO_REDUCTION,
                "keep_rate": ml_collections.FieldReference(1.0, field_type=KeepRate),
                "locations": (3, 6, 9),
                "ats_distance": "torch_cdist",
                "dpcknn_k": 5,
                "dynamicvit_ratio_weight": 2.0,
            },
            "clca": {
                "head": NO_HEAD,
                "clc": False,
                "num_clr": 0,
                "include_gap": True,
                "recover_at_last": True,
                "pool_cls": False,
                "pool_clr": False,
                "protect_cache": False,
                "kernels_per_channel": 2,
            },
        }
    )


def resolve_backbone(model_config: ml_collections.ConfigDict) -> registry.Backbone:
    """The registry architecture with the config's size overrides applied and checked."""
    backbone = registry.get_backbone(model_config.backbone)
    overrides = {
        field: model_config.get(field)
        for field in ("embed_dim", "depth", "num_heads")
        if model_config.get(field) is not None
    }
    backbone = dataclasses.replace(backbone, **overrides)
    for field in ("embed_dim", "depth", "num_heads"):
        value = getattr(backbone, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{field} must be a positive integer, got {value!r}.")
    if backbone.embed_dim % backbone.num_heads:
        raise ValueError(
            f"model.embed_dim ({backbone.embed_dim}) must be divisible by model.num_heads "
            f"({backbone.num_heads})."
        )
    return backbone


def validate_model_config(model_config: ml_collections.ConfigDict) -> registry.Backbone:
    """Checks every model field once, before anything is built or compiled.

    Returns:
      The resolved backbone architecture.

    Raises:
      ValueError: a field is out of range or of the wrong type; the message names the field,
        the value seen and what is accepted.
    """
    backbone = resolve_backbone(model_config)
    img_size = model_config.img_size
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"model.img_size must be a positive integer, got {img_size!r}.")
    if img_size % backbone.patch_size:
        raise ValueError(
            f"model.img_size={img_size} is not divisible by the patch size {backbone.patch_size} "
            f"of {model_config.backbone}; use a multiple of {backbone.patch_size} "
            f"(e.g. {max(img_size // backbone.patch_size, 1) * backbone.patch_size})."
        )
    num_classes = model_config.num_classes
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model.num_classes must be a positive integer, got {num_classes!r}.")
    if model_config.dtype not in DTYPES:
        raise ValueError(
            f"model.dtype must be one of {', '.join(DTYPES)}, got {model_config.dtype!r}."
        )
    if model_config.remat not in REMAT_CHOICES:
        raise ValueError(
            f"model.remat must be one of {', '.join(REMAT_CHOICES)}, got {model_config.remat!r}."
        )
    if model_config.attention not in ATTENTION_CHOICES:
        raise ValueError(
            f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got "
            f"{model_config.attention!r}."
        )
    _validate_normalization(model_config)
    for field in ("drop_path_rate", "dropout_rate"):
        rate = model_config[field]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ValueError(f"model.{field} must be a number in [0, 1), got {rate!r}.")
    _validate_clca(model_config.clca)
    clca_used = clca_in_use(model_config.clca)
    _validate_reduction(model_config.reduction, backbone.depth, clca_used)
    return backbone


def _validate_normalization(model_config: ml_collections.ConfigDict) -> None:
    choice = model_config.normalization
    if choice not in normalization.CHOICES:
        raise ValueError(
            f"model.normalization must be one of {', '.join(normalization.CHOICES)}, got "
            f"{choice!r}."
        )
    if choice == normalization.BACKBONE:
        registry.pretrained_normalization(model_config.backbone)  # needs the tag


def input_normalization(model_config: ml_collections.ConfigDict) -> tuple[tuple, tuple]:
    """The (mean, std) the input pipeline normalises with, from `model.normalization`.

    `backbone` resolves to the constants of the weights `model.backbone`'s tag names.
    """
    choice = model_config.normalization
    if choice == normalization.BACKBONE:
        choice = registry.pretrained_normalization(model_config.backbone)
    return normalization.NORMALIZATION[choice]


def _validate_reduction(reduction: ml_collections.ConfigDict, depth: int, clca_used: bool) -> None:
    if not isinstance(reduction.method, str):
        raise ValueError(
            f"model.reduction.method must be one of {', '.join(METHODS)}; got {reduction.method!r}."
        )
    method = get_method(reduction.method)
    keep_rate = reduction.keep_rate
    locations = tuple(reduction.locations)
    if isinstance(keep_rate, list | tuple):
        _validate_keep_rates(tuple(keep_rate), method, locations)
    elif not _is_number(keep_rate):
        raise ValueError(
            f"model.reduction.keep_rate must be a number or a list with one entry per "
            f"location, got {keep_rate!r}."
        )
    elif not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"model.reduction.keep_rate must be in (0, 1], got {keep_rate}.")
    neighbours = reduction.dpcknn_k
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(
            f"model.reduction.dpcknn_k must be a positive integer, got {neighbours!r}."
        )
    weight = reduction.dynamicvit_ratio_weight
    if not _is_number(weight) or weight < 0:
        raise ValueError(
            f"model.reduction.dynamicvit_ratio_weight must be a number >= 0, got {weight!r}."
        )
    if reduction.ats_distance not in ATS_DISTANCES:
        raise ValueError(
            f"model.reduction.ats_distance must be one of {', '.join(ATS_DISTANCES)}; "
            f"got {reduction.ats_distance!r}."
        )
    if not all(isinstance(loc, int) and not isinstance(loc, bool) for loc in locations):
        raise ValueError(f"model.reduction.locations must be integers, got {locations!r}.")
    if not method.reduces and not clca_used:
        return  # Locations are unused.
    if not locations:
        raise ValueError("model.reduction.locations is empty; give at least one block index.")
    if list(locations) != sorted(set(locations)):
        raise ValueError(
            f"model.reduction.locations must be strictly increasing, got {list(locations)}."
        )
    bad = [loc for loc in locations if not 0 <= loc < depth]
    if bad:
        raise ValueError(
            f"model.reduction.locations {bad} lie outside the {depth} blocks of the backbone "
            f"(valid: 0..{depth - 1})."
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_keep_rates(keep_rates: tuple, method, locations: tuple) -> None:
    """A per-stage list: one entry per location, ratios or counts as the method reads them."""
    field = "model.reduction.keep_rate"
    if len(keep_rates) != len(locations):
        raise ValueError(
            f"{field} has {len(keep_rates)} entries {list(keep_rates)} but "
            f"model.reduction.locations has {len(locations)} {list(locations)}; give one "
            "entry per location, or a single rate."
        )
    if method.keep_rate_kind == "count":
        least = method.min_stage_count
        bad = [n for n in keep_rates if isinstance(n, bool) or not isinstance(n, int) or n < least]
        if bad:
            raise ValueError(
                f"{field} lists token counts for {method.__name__} (one per location); "
                f"{bad} in {list(keep_rates)} are not integers >= {least}."
            )
        return
    bad = [r for r in keep_rates if not _is_number(r) or not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(
            f"{field} lists keep ratios for {method.__name__} (one per location); {bad} in "
            f"{list(keep_rates)} are not numbers in (0, 1]."
        )


def keep_rate_option(keep_rate) -> float | tuple:
    """`model.reduction.keep_rate` as the model takes it: a float, or a tuple of the entries
    (floats for ratios, ints for counts) of a per-stage list."""
    if isinstance(keep_rate, list | tuple):
        return tuple(keep_rate)
    return float(keep_rate)


def clca_in_use(clca) -> bool:
    """Whether a `model.clca` section (or `ClcaOptions`) turns on the head or the cache."""
    return clca.head != NO_HEAD or clca.clc


def _validate_clca(clca: ml_collections.ConfigDict) -> None:
    if clca.head not in CLCA_HEADS:
        raise ValueError(f"model.clca.head must be one of {CLCA_HEADS}, got {clca.head!r}.")
    num_clr = clca.num_clr
    if isinstance(num_clr, bool) or not isinstance(num_clr, int) or num_clr < 0:
        raise ValueError(f"model.clca.num_clr must be an integer >= 0, got {num_clr!r}.")
    kernels = clca.kernels_per_channel
    if isinstance(kernels, bool) or not isinstance(kernels, int) or kernels < 1:
        raise ValueError(
            f"model.clca.kernels_per_channel must be a positive integer, got {kernels!r}."
        )
    for flag in ("clc", "include_gap", "recover_at_last", "pool_cls", "pool_clr", "protect_cache"):
        if not isinstance(clca[flag], bool):
            raise ValueError(f"model.clca.{flag} must be True or False, got {clca[flag]!r}.")
    if clca.clc and not clca.include_gap and num_clr == 0:
        raise ValueError(
            "model.clca.clc caches nothing with include_gap=False and num_clr=0; "
            "enable include_gap or set num_clr >= 1."
        )


def compute_dtype(dtype: str) -> jnp.dtype:
    """`model.dtype` as the matmul dtype: `auto` is bfloat16 on a GPU or TPU, float32 on the
    CPU. Parameters, LayerNorm, softmax and the loss stay float32 whatever the choice."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)
