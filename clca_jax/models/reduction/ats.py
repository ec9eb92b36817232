"""ATS: adaptive token sampling by inverse transform sampling of CLS attention (spec 5.6).

Inside the block. Token significance is the CLS attention weighted by the norm of each token's
value, summed over heads and normalised; its cumulative sum over the token order is sampled at
K - 1 evenly spaced quantiles (K_s = int(kr**(s+1) * P) + 1), each picking the token with the
nearest cumulative value. The unique picks, ascending, follow CLS. Their number varies per
image, so the output has a fixed number of slots (one per quantile) and a validity mask that
later attentions apply exactly as the reference does (padding pairs filled with -finfo.max).
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


def quantile_points(samples: int) -> np.ndarray:
    """The reference's torch.arange(1/(2K), (2K-1)/(2K), 1/K) in float32."""
    start, end, step = 1 / (2 * samples), (2 * samples - 1) / (2 * samples), 1 / samples
    count = max(0, math.ceil((end - start) / step))
    return np.asarray([start + i * step for i in range(count)], np.float32)


def sample_count(context: PlanContext) -> int:
    return int(context.compounded() * context.num_patches) + 1


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


class ATS(Method, nn.Module):
    """Adaptive token sampling (no parameters).

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of samples K.
    """

    stage: Stage
    placement: ClassVar[str] = "inside"
    kept_kind: ClassVar[str] = "gathered"

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

    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del train
        _, body, suffix = split(tokens.x, self.stage.protected)
        end = 1 + body.shape[1]
        batch = body.shape[0]
        value_norm = jnp.linalg.norm(attention.values.astype(jnp.float32), axis=-1)
        significance = jnp.sum(attention.cls_probs[:, :, 1:end] * value_norm[:, :, 1:end], 1)
        significance = significance / (jnp.sum(significance, -1, keepdims=True) + 1e-6)
        cdf = jnp.cumsum(significance, axis=-1)
        if tokens.valid is not None:
            cdf = cdf + jnp.where(tokens.valid[:, 1:end], 0.0, 0.1)
        if tokens.present is not None:
            cdf = jnp.where(tokens.present[:, 1:end], cdf, _ABSENT)
        points = jnp.asarray(quantile_points(self.stage.plan.count))
        distance = jnp.abs(cdf[:, None, :] - points[None, :, None])
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
