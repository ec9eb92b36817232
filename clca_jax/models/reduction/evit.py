"""EViT: keep the tokens the class token attends to most, fuse the rest into one token.

Spec 5.1. Inside the block, after the attention residual. With N the current length,
`left = ceil(keep_rate * (N - 1))` tokens are kept, ordered by descending head-mean CLS
attention; the others are summed, weighted by their raw CLS attention, into one fused token at
the end: `[CLS, kept..., fused]`. Nothing happens when `left == N - 1`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from clca_jax.models.reduction.base import (
    Method,
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
    gather_tokens,
    top_k_stable,
)


def plan_keep(context: PlanContext, extra_tokens: int) -> StagePlan:
    """ceil(kr * candidates) kept, plus CLS, `extra_tokens` fused tokens and the suffix.

    A per-stage list gives each stage its own kr (the reference: not compounded either way).
    """
    candidates = context.candidates
    left = math.ceil(context.stage_rate() * candidates)
    if left == candidates:
        return StagePlan(count=left, tokens_out=context.tokens_in, active=False)
    if left < 1:
        raise ValueError(f"EViT/Top-K would keep {left} of {candidates} tokens.")
    return StagePlan(left, 1 + left + extra_tokens + context.protected)


def keep_attended(
    x: jax.Array, cls_attention: jax.Array, keep: int, protected: int, fuse: bool
) -> tuple[jax.Array, jax.Array]:
    """Keeps the `keep` most attended tokens, optionally fusing the others.

    Args:
      x: tokens [B, N, D] (after the attention residual).
      cls_attention: head-mean attention of CLS to every token [B, N].
      keep: tokens to keep among the reducible ones.
      protected: trailing tokens kept as they are, after everything else.
      fuse: append the attention-weighted sum of the dropped tokens (EViT) or not (Top-K).

    Returns:
      The new sequence and the kept positions [B, keep] in output order.
    """
    length = x.shape[1]
    end = length - protected
    scores = cls_attention[:, 1:end]
    positions = top_k_stable(scores, keep) + 1  # in the whole sequence (CLS = 0)
    # Indexing the whole sequence (not a sliced copy) keeps this step cheap.
    parts = [x[:, :1], gather_tokens(x, positions)]
    if fuse:
        # Weights over the whole sequence: the dropped tokens' scores, zero elsewhere. The
        # membership comes from one-hot sums, not a scatter (much faster on CPU).
        kept = jax.nn.one_hot(positions, length, dtype=scores.dtype).sum(axis=1)
        weights = jnp.pad(scores, ((0, 0), (1, protected))) * (1.0 - kept)
        parts.append(jnp.einsum("bn,bnd->bd", weights, x)[:, None])
    parts.append(x[:, end:])
    return jnp.concatenate(parts, axis=1), positions


class EViT(Method, nn.Module):
    """EViT token reduction (no parameters).

    Attributes:
      stage: the schedule's step (counts, protected suffix).
    """

    stage: Stage
    placement: ClassVar[str] = "inside"
    kept_kind: ClassVar[str] = "positions"
    fuse: ClassVar[bool] = True

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        return plan_keep(context, extra_tokens=1)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """Head mean of the CLS attention, plus the fused token's weighting."""
        return stage.reducible + (stage.reducible - stage.plan.count) * width

    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del train
        cls_attention = attention.cls_probs.mean(axis=1)
        x, kept = keep_attended(
            tokens.x, cls_attention, self.stage.plan.count, self.stage.protected, self.fuse
        )
        return Reduced(Tokens(x=x), kept)
