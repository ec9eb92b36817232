"""Activations written the way PyTorch computes them."""

from __future__ import annotations

import jax
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it: x / 2 * (1 + erf(x / sqrt(2))).

    `jax.nn.gelu(approximate=False)` goes through `erfc`, which XLA expands into exponentials
    and branches; `erf` is one clamped rational polynomial. For the ViT-B/16 MLP at 448 px on a
    CPU this makes forward plus backward 1.6x faster, with the same accuracy as PyTorch's
    float32 GELU (largest error against float64 on N(0, 16) inputs: 1.1e-6 here, 1.2e-6 torch).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF.astype(x.dtype)))
