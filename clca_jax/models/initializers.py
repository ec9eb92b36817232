"""Parameter initialisers matching the reference (timm and PyTorch defaults)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# timm initialises ViT linears and embeddings with a truncated normal of std 0.02.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
