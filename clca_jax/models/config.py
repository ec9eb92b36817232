"""The model section of a config: defaults, validation, and the resolved architecture."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from clca_jax import normalization
from clca_jax.models import registry
from clca_jax.models.reduction import METHODS, NO_REDUCTION, get_method
from clca_jax.models.reduction.ats import DISTANCES as ATS_DISTANCES

NO_HEAD = "none"
CLCA_HEADS = (NO_HEAD, "cla", "ifa")
DTYPES = ("float32", "bfloat16", "float16")
# How attention runs: `per_image` loops over the images of a batch (each [heads, N, N] map stays
# in cache: about 2x faster for ViT-B at 448 px on a CPU), `batched` is one pass over the batch
# (accelerators); `auto` picks per_image on the CPU and batched elsewhere.
ATTENTION_CHOICES = ("auto", "per_image", "batched")


def default_model_config() -> ml_collections.ConfigDict:
    """The `model` section with every field a user may set.

    `embed_dim`, `depth` and `num_heads` default to the backbone's own values; setting them
    builds a smaller or larger model of the same family (tests, laptop-sized runs).
    """
    return ml_collections.ConfigDict(
        {
            "backbone": "vit_base_patch16_224.orig_in21k",
            "img_size": 448,
            "num_classes": 1000,
            "dtype": "float32",
            "attention": "auto",
            "normalization": normalization.DEFAULT,
            "embed_dim": config_dict.placeholder(int),
            "depth": config_dict.placeholder(int),
            "num_heads": config_dict.placeholder(int),
            "drop_path_rate": 0.0,
            "dropout_rate": 0.0,
            "reduction": {
                "method": NO_REDUCTION,
                "keep_rate": 1.0,
                "locations": (3, 6, 9),
                "ats_distance": "torch_cdist",
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
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {model_config.dtype!r}.")
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
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, int | float):
        raise ValueError(f"model.reduction.keep_rate must be a number, got {keep_rate!r}.")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"model.reduction.keep_rate must be in (0, 1], got {keep_rate}.")
    if reduction.ats_distance not in ATS_DISTANCES:
        raise ValueError(
            f"model.reduction.ats_distance must be one of {', '.join(ATS_DISTANCES)}; "
            f"got {reduction.ats_distance!r}."
        )
    locations = tuple(reduction.locations)
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


def clca_in_use(clca) -> bool:
    """Whether a `model.clca` section (or `ClcaOptions`) turns on the head or the cache."""
    return clca.head != NO_HEAD or clca.clc


def _validate_clca(clca: ml_collections.ConfigDict) -> None:
    if clca.head not in CLCA_HEADS:
        raise ValueError(f"model.clca.head must be one of {CLCA_HEADS}, got {clca.head!r}.")
    num_clr = clca.num_clr
    if isinstance(num_clr, bool) or not isinstance(num_clr, int) or num_clr < 0:
        raise ValueError(f"model.clca.num_clr must be an integer >= 0, got {num_clr!r}.")
    for flag in ("clc", "include_gap", "recover_at_last", "pool_cls", "pool_clr", "protect_cache"):
        if not isinstance(clca[flag], bool):
            raise ValueError(f"model.clca.{flag} must be True or False, got {clca[flag]!r}.")
    if clca.clc and not clca.include_gap and num_clr == 0:
        raise ValueError(
            "model.clca.clc caches nothing with include_gap=False and num_clr=0; "
            "enable include_gap or set num_clr >= 1."
        )
