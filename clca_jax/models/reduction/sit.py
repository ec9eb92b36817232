"""SiT token slimming: K learned soft groupings of all non-CLS tokens (spec 5.7).

Before the block. K_s = int(P * kr**(s+1)); at K = 0 only the class token remains. Logits
`Linear(D/2 -> K)(GELU(Linear(D -> D/2)(LN(x))))` are scaled by a learned scalar and
soft-maxed over the tokens; each new token is the weighted sum of the old ones.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from clca_jax.models.activations import gelu
from clca_jax.models.initializers import trunc_normal
from clca_jax.models.reduction.base import (
    Method,
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
    split,
)


def plan_slim(context: PlanContext) -> StagePlan:
    """K_s = int(P * kr**(s+1)) new tokens after CLS (shared with PatchMerger), or the count a
    per-stage list gives."""
    count = context.stage_count()
    if count is None:
        count = int(context.num_patches * context.compounded())
    return StagePlan(count, 1 + count + context.protected)


class SiT(Method, nn.Module):
    """Token slimming with its own layers per stage.

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of new tokens K.
    """

    stage: Stage
    placement: ClassVar[str] = "before"
    kept_kind: ClassVar[str] = "mixing"
    merges: ClassVar[bool] = True
    keep_rate_kind: ClassVar[str] = "count"
    min_stage_count: ClassVar[int] = 0  # the reference slims to CLS only at K = 0
    official_prefix: ClassVar[str] = "cluster_layers"
    official_names: ClassVar[dict] = {"norm": "weight.0", "fc1": "weight.1", "fc2": "weight.3"}

    plan: ClassVar = staticmethod(plan_slim)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """LN, fc1, fc2 and the scaled weights, and the weighted sum of the tokens."""
        body, count = stage.reducible, stage.plan.count
        return (
            body * width
            + body * width * (width // 2)
            + body * (width // 2) * count * 2
            + (count * body * width)
        )

    @nn.compact
    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del attention, train
        cls, body, suffix = split(tokens.x, self.stage.protected)
        count = self.stage.plan.count
        width = body.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (1, 1, 1))
        # At K = 0 the layers still exist (as in the reference) and produce no token.
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(body)
        h = gelu(nn.Dense(width // 2, kernel_init=trunc_normal, name="fc1")(h))
        logits = nn.Dense(count, kernel_init=trunc_normal, name="fc2")(h)
        weights = jax.nn.softmax(logits * scale, axis=1).transpose(0, 2, 1)  # [B, K, S]
        merged = jnp.einsum("bks,bsd->bkd", weights, body)
        return Reduced(Tokens(x=jnp.concatenate([cls, merged, suffix], axis=1)), weights)
