"""ATS: adaptive token sampling by inverse transform sampling of CLS attention (spec 5.6).

Inside the block. Token significance is the CLS attention weighted by the norm of each token's
value, summed over heads and normalised; its cumulative sum over the token order is sampled at
K - 1 evenly spaced quantiles (K_s = int(kr**(s+1) * P) + 1), each picking the token with the
nearest cumulative value. The unique picks, ascending, follow CLS. Their number varies per
image, so the output has a fixed number of slots (one per quantile) and a validity mask that
later attentions apply exactly as the reference does (padding pairs filled with -finfo.max).

"Nearest" is measured as the reference measures it, with `torch.cdist`, whose matrix-product
formula rounds enough to change which token a quantile picks (`cdist_matmul`);
`distance="exact"` uses |cdf - point| instead (an opt-in deviation).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clca_jax.models.reduction.base import (
    Method,
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
    gather_tokens,
    split,
)

# Cumulative value given to slots that do not exist in the reference model: never sampled.
_ABSENT = 1e9
DISTANCES = ("torch_cdist", "exact")
# torch.cdist (p=2, default compute mode) uses its matrix-product formula when either input
# has more rows than this, and the direct |a - b| otherwise.
_CDIST_DIRECT_MAX_ROWS = 25


def quantile_points(samples: int) -> np.ndarray:
    """The reference's torch.arange(1/(2K), (2K-1)/(2K), 1/K): float32, made on the CPU.

    torch (x86 builds) counts ceil((end - start) / step) points in float64 and fills them in
    chunks of 16, each as two vectors of 8 that step from a base rounded to float32 first
    (value = base + j * step, base = start + step * i); the remaining points are
    start + step * i. Sums are float64, every value is rounded to float32; the base's rounding
    moves some points by an ulp from the directly computed ones.
    """
    start, end, step = 1 / (2 * samples), (2 * samples - 1) / (2 * samples), 1 / samples
    count = max(0, math.ceil((end - start) / step))
    index = np.arange(count)
    base = np.where(index < count - count % 16, index - index % 8, index)
    rounded_base = (start + step * base).astype(np.float32).astype(np.float64)
    return (rounded_base + step * (index - base)).astype(np.float32)


def sample_count(context: PlanContext) -> int:
    """K_s = int(kr**(s+1) * P) + 1, or the count a per-stage list gives (taken as is)."""
    count = context.stage_count()
    if count is None:
        count = int(context.compounded() * context.num_patches) + 1
    return count


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a + b as the rounded sum and its exact rounding error (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def cumsum_float64(x: jax.Array) -> jax.Array:
    """Cumulative sum over the last axis as torch computes it for float32 on the CPU.

    torch accumulates in float64 and rounds each prefix to float32. Without float64, the
    prefixes are carried as float32 pairs (value and rounding error, ~48 bits), which round
    to the same float32 except for a prefix within ~1e-14 (relative) of a rounding boundary.
    """

    def combine(left, right):
        value, error = _two_sum(left[0], right[0])
        return _two_sum(value, error + (left[1] + right[1]))

    value, _ = jax.lax.associative_scan(combine, (x, jnp.zeros_like(x)), axis=x.ndim - 1)
    return value


def unique_ascending(picks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unique values of each row, ascending, padded with 0; and the mask of real entries."""
    ordered = jnp.sort(picks, axis=-1)
    first = jnp.concatenate(
        [jnp.ones_like(ordered[:, :1], bool), ordered[:, 1:] != ordered[:, :-1]], axis=-1
    )
    big = jnp.iinfo(ordered.dtype).max
    unique = jnp.sort(jnp.where(first, ordered, big), axis=-1)
    real = unique != big
    return jnp.where(real, unique, 0), real


def cdist_matmul(points: np.ndarray, cdf: jax.Array) -> jax.Array:
    """Distances of 1-D points to each row of `cdf` as torch.cdist's matrix-product formula.

    torch computes sqrt(max(x1_ @ x2_^T, 0)) with x1_ = [-2a, a^2, 1] and x2_ = [b, 1, b^2], in
    float32, the three terms summed in that order. Near the minimum that sum has lost most of
    its digits (distances are off by up to ~3e-4, more than the spacing of a cumulative
    distribution over hundreds of tokens), so its rounding decides which token a quantile
    picks. It is computed here as the same matrix product: written element-wise, XLA:CPU
    contracts multiplications into the following additions (fused multiply-adds) and so skips
    roundings of -2ab, a^2 or b^2 that torch performs. Square roots on the CPU (torch's and
    XLA's vectorised ones) can be one ulp off, how often depends on the CPU: that changes a pick
    only where it makes or breaks an exact tie.

    Args:
      points: quantile points [Q], float32.
      cdf: [B, N] float32.

    Returns:
      [B, Q, N] distances.
    """
    return jnp.sqrt(jnp.maximum(cdist_squared(points, cdf), 0.0))


def cdist_squared(points: np.ndarray, cdf: jax.Array) -> jax.Array:
    """x1_ @ x2_^T of `cdist_matmul`, before the clamp and the square root: [B, Q, N]."""
    left = np.stack([-2 * points, points * points, np.ones_like(points)], axis=-1)
    right = jnp.stack([cdf, jnp.ones_like(cdf), cdf * cdf], axis=-1)
    return jnp.einsum("qk,bnk->bqn", left, right, precision=jax.lax.Precision.HIGHEST)


def torch_cdist(points: np.ndarray, cdf: jax.Array, rows: int | jax.Array) -> jax.Array:
    """torch.cdist(points[None, :, None], cdf[:, :, None]) in float32 (p=2, default mode).

    Args:
      points: quantile points [Q], float32.
      cdf: [B, N] float32.
      rows: tokens in the reference's `cdf` (traced where slots may be absent, else N); with
        the point count it selects torch's formula.

    Returns:
      [B, Q, N] distances.
    """
    direct = jnp.abs(points[None, :, None] - cdf[:, None, :])
    if len(points) == 0 or max(len(points), cdf.shape[1]) <= _CDIST_DIRECT_MAX_ROWS:
        return direct
    if len(points) > _CDIST_DIRECT_MAX_ROWS:
        return cdist_matmul(points, cdf)
    return jnp.where(rows > _CDIST_DIRECT_MAX_ROWS, cdist_matmul(points, cdf), direct)


class ATS(Method, nn.Module):
    """Adaptive token sampling (no parameters).

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of samples K.
      distance: how "nearest" is measured: "torch_cdist" (as the reference) or "exact".
    """

    stage: Stage
    distance: str = "torch_cdist"
    placement: ClassVar[str] = "inside"
    kept_kind: ClassVar[str] = "gathered"
    keep_rate_kind: ClassVar[str] = "count"

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        """`count` is K; the output has one slot per quantile point (K - 1 in most cases)."""
        samples = sample_count(context)
        slots = len(quantile_points(samples))
        return StagePlan(samples, 1 + slots + context.protected)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """Value-norm weighting of the CLS attention and its normalisation."""
        return heads * stage.reducible + stage.reducible

    @staticmethod
    def initial_tokens(x: jax.Array) -> Tokens:
        """Every slot starts valid."""
        return Tokens(x=x, valid=jnp.ones(x.shape[:2], bool))

    @classmethod
    def build(cls, stage: Stage, options, name: str) -> nn.Module:
        return cls(stage, distance=options.ats_distance, name=name)

    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del train
        _, body, suffix = split(tokens.x, self.stage.protected)
        end = 1 + body.shape[1]
        batch = body.shape[0]
        value_norm = jnp.linalg.norm(attention.values.astype(jnp.float32), axis=-1)
        significance = jnp.sum(attention.cls_probs[:, :, 1:end] * value_norm[:, :, 1:end], 1)
        total = jnp.sum(significance, -1, keepdims=True) + 1e-6
        # XLA turns division by a broadcast value into multiplication by its reciprocal, which
        # rounds differently from torch's division; the barrier keeps the division.
        total = jax.lax.optimization_barrier(jnp.broadcast_to(total, significance.shape))
        significance = significance / total
        cdf = cumsum_float64(significance)
        if tokens.valid is not None:
            cdf = cdf + jnp.where(tokens.valid[:, 1:end], 0.0, 0.1)
        if tokens.present is not None:
            cdf = jnp.where(tokens.present[:, 1:end], cdf, _ABSENT)
        rows = body.shape[1]
        if tokens.present is not None:  # the reference's sequence holds only the present slots
            rows = jnp.sum(tokens.present[0, 1:end])
        points = quantile_points(self.stage.plan.count)
        if self.distance == "exact":
            distance = jnp.abs(points[None, :, None] - cdf[:, None, :])
        else:
            distance = torch_cdist(points, cdf, rows)
        picks = jnp.argmin(distance, axis=-1) + 1  # first minimum, as torch
        ids, real = unique_ascending(jax.lax.stop_gradient(picks))
        ids = jnp.concatenate([jnp.zeros((batch, 1), ids.dtype), ids], axis=1)
        real = jnp.concatenate([jnp.ones((batch, 1), bool), real], axis=1)
        present = jnp.arange(ids.shape[1])[None, :] <= jnp.max(jnp.sum(real[:, 1:], -1))
        present = jnp.broadcast_to(present, real.shape)
        x = jnp.concatenate([gather_tokens(tokens.x[:, :end], ids), suffix], axis=1)
        keep_state = jnp.ones(suffix.shape[:2], bool)
        new = Tokens(
            x=x,
            valid=jnp.concatenate([real, keep_state], axis=1),
            present=jnp.concatenate([present, keep_state], axis=1),
        )
        return Reduced(new, jnp.where(real, ids, -1))
