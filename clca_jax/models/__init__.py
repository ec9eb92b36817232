"""Models: backbone registry, ViT with token reduction and the CLCA modules."""

from __future__ import annotations

import ml_collections

from clca_jax.models.config import (
    compute_dtype,
    default_model_config,
    input_normalization,
    keep_rate_option,
    validate_model_config,
)
from clca_jax.models.reduction import METHODS, NO_REDUCTION, Method, get_method, register_method
from clca_jax.models.registry import Backbone, get_backbone, list_backbones
from clca_jax.models.schedule import ClcaOptions, ReductionOptions, check_schedule
from clca_jax.models.vit import VisionTransformer

__all__ = [
    "METHODS",
    "NO_REDUCTION",
    "Backbone",
    "Method",
    "VisionTransformer",
    "create_model",
    "default_model_config",
    "get_backbone",
    "get_method",
    "list_backbones",
    "register_method",
]


def create_model(
    model_config: ml_collections.ConfigDict, check_cache: bool = True
) -> VisionTransformer:
    """Builds the model a `model` config section describes; the one place a config is resolved.

    The config is validated first, so a bad value fails here with a message rather than inside
    a compile. `model.apply(variables, images, train=False)` then returns `(logits, aux)`. The
    model knows its backbone, image size, patch grid and token schedule: pass it, not the
    config, to what needs them (FLOPs, warm start, pictures, export).

    Args:
      model_config: the `model` section of a config.
      check_cache: refuse a schedule whose cache would average an empty range (such a model
        gives NaN logits); False still builds it, for its FLOPs table.
    """
    backbone = validate_model_config(model_config)
    model = VisionTransformer(
        backbone=backbone,
        img_size=model_config.img_size,
        num_classes=model_config.num_classes,
        reduction=ReductionOptions(
            method=model_config.reduction.method,
            keep_rate=keep_rate_option(model_config.reduction.keep_rate),
            locations=tuple(model_config.reduction.locations),
            ats_distance=model_config.reduction.ats_distance,
            dpcknn_k=model_config.reduction.dpcknn_k,
            dynamicvit_ratio_weight=float(model_config.reduction.dynamicvit_ratio_weight),
        ),
        clca=ClcaOptions(**model_config.clca.to_dict()),
        dtype=compute_dtype(model_config.dtype),
        attention=model_config.attention,
        remat=model_config.remat,
        input_normalization=input_normalization(model_config),
        drop_path_rate=float(model_config.drop_path_rate),
        dropout_rate=float(model_config.dropout_rate),
    )
    if check_cache:
        for train in (False, True):
            check_schedule(model.token_schedule(train), model_config)
    return model
