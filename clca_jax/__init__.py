"""clca_jax: Cross-Layer Cache Aggregation token reduction for Vision Transformers in JAX."""

from clca_jax.models import create_model, default_model_config
from clca_jax.pretrained import load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = ["create_model", "default_model_config", "load_pretrained", "save_pretrained"]
