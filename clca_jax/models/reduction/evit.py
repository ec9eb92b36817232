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
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
    gather_tokens,
    split,
    top_k_stable,
)


def plan_keep(context: PlanContext, extra_tokens: int) -> StagePlan:
    """ceil(kr * candidates) kept, plus CLS, `extra_tokens` fused tokens and the suffix."""
    candidates = context.candidates
    left = math.ceil(context.keep_rate * candidates)
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
    cls, body, suffix = split(x, protected)
    scores = cls_attention[:, 1 : 1 + body.shape[1]]
    order = top_k_stable(scores, keep)
    parts = [cls, gather_tokens(body, order)]
    if fuse:
        dropped = jnp.ones_like(scores).at[jnp.arange(scores.shape[0])[:, None], order].set(0.0)
        parts.append(jnp.einsum("bn,bnd->bd", dropped * scores, body)[:, None])
    parts.append(suffix)
    return jnp.concatenate(parts, axis=1), order + 1


class EViT(nn.Module):
    """EViT token reduction (no parameters).

    Attributes:
      stage: the schedule's step (counts, protected suffix).
    """

    stage: Stage
    placement: ClassVar[str] = "inside"
    fuse: ClassVar[bool] = True

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        return plan_keep(context, extra_tokens=1)

    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del train
        cls_attention = attention.probs[:, :, 0, :].mean(axis=1)
        x, kept = keep_attended(
            tokens.x, cls_attention, self.stage.plan.count, self.stage.protected, self.fuse
        )
        return Reduced(Tokens(x=x), kept)
