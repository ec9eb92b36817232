"""PatchMerger: K learned queries pool all non-CLS tokens (spec 5.8).

Before the block. K_s = int(P * kr**(s+1)), as SiT. `y = LN(x)`; the new tokens are
`softmax_over_tokens(Q y^T) y` with learned queries Q [K, D] (initialised N(0, 1)).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from clca_jax.models.reduction.base import Method, Reduced, Stage, Tokens, split
from clca_jax.models.reduction.sit import plan_slim


class PatchMerger(Method, nn.Module):
    """Query pooling with its own queries and LayerNorm per stage.

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of queries K.
    """

    stage: Stage
    placement: ClassVar[str] = "before"
    kept_kind: ClassVar[str] = "mixing"
    merges: ClassVar[bool] = True
    keep_rate_kind: ClassVar[str] = "count"
    min_stage_count: ClassVar[int] = 0  # the reference slims to CLS only at K = 0
    official_prefix: ClassVar[str] = "cluster_layers"

    plan: ClassVar = staticmethod(plan_slim)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """LN, the query-token products and the weighted sum."""
        return stage.reducible * width + 2 * stage.plan.count * stage.reducible * width

    @nn.compact
    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del attention, train
        cls, body, suffix = split(tokens.x, self.stage.protected)
        count = self.stage.plan.count
        queries = self.param("queries", nn.initializers.normal(1.0), (count, body.shape[-1]))
        normed = nn.LayerNorm(epsilon=1e-5, name="norm")(body)
        weights = jax.nn.softmax(jnp.einsum("kd,bsd->bks", queries, normed), axis=-1)
        merged = jnp.einsum("bks,bsd->bkd", weights, normed)
        return Reduced(Tokens(x=jnp.concatenate([cls, merged, suffix], axis=1)), weights)
