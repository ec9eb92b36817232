"""Models: backbone registry, ViT with token reduction and the CLCA modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from clca_jax.models.config import default_model_config, validate_model_config
from clca_jax.models.registry import Backbone, get_backbone, list_backbones
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
    return VisionTransformer(
        backbone=backbone,
        img_size=model_config.img_size,
        num_classes=model_config.num_classes,
        num_registers=model_config.clca.num_clr,
        dtype=jnp.dtype(model_config.dtype),
    )
