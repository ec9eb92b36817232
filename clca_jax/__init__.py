"""clca_jax: Cross-Layer Cache Aggregation token reduction for Vision Transformers in JAX."""

__version__ = "0.1.0"
