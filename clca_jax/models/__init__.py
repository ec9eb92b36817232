"""Models: backbone registry, ViT with token reduction and the CLCA modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from clca_jax.models.config import default_model_config, validate_model_config
from clca_jax.models.registry import Backbone, get_backbone, list_backbones
from clca_jax.models.schedule import ClcaOptions, ReductionOptions, check_schedule
from clca_jax.models.vit import VisionTransformer

__all__ = [
    "Backbone",
    "VisionTransformer",
    "create_model",
    "default_model_config",
    "get_backbone",
    "list_backbones",
]


def create_model(model_config: ml_collections.ConfigDict) -> VisionTransformer:
    """Builds the model a `model` config section describes.

    The config is validated first, so a bad value fails here with a message rather than inside
    a compile. `model.apply(variables, images, train=False)` then returns `(logits, aux)`.
    """
    backbone = validate_model_config(model_config)
    model = VisionTransformer(
        backbone=backbone,
        img_size=model_config.img_size,
        num_classes=model_config.num_classes,
        reduction=ReductionOptions(
            method=model_config.reduction.method,
            keep_rate=float(model_config.reduction.keep_rate),
            locations=tuple(model_config.reduction.locations),
            ats_distance=model_config.reduction.ats_distance,
        ),
        clca=ClcaOptions(**model_config.clca.to_dict()),
        dtype=jnp.dtype(model_config.dtype),
    )
    for train in (False, True):
        check_schedule(model.token_schedule(train), model_config)
    return model
