"""ToMe: merge similar tokens by bipartite soft matching (spec 5.3).

Inside the block, after the attention residual. Per-stage targets `t_s = int(P * kr**(s+1))`
request `r_s = t_{s-1} - t_s` merges (t_{-1} = P), clipped to half the current tokens. Tokens are
split by position parity (A = even positions, CLS first; B = odd); each A token's best match in B
is scored with the cosine similarity of the head-mean keys; the r best-scoring A tokens are merged
into their matches by size-weighted averaging. Output: `[unmerged A (by position), all B]`.
Sizes are carried to later blocks, whose attention adds log(size) to every key.
"""

from __future__ import annotations

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
)


def merge_target(context: PlanContext, stage: int) -> int:
    """Patch tokens left after stage `stage` (P before the first): int(P * kr**(s+1)), or the
    count a per-stage list gives (the reference's `--keep_rate t1 t2 ...` for ToMe)."""
    if stage < 0:
        return context.num_patches
    if context.per_stage:
        return context.keep_rate[stage]
    return int(context.num_patches * context.keep_rate ** (stage + 1))


def bipartite_merge(
    x: jax.Array, size: jax.Array, keys: jax.Array, merges: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merges `merges` even-position tokens into their most similar odd-position tokens.

    Args:
      x: tokens [B, N, D]; position 0 is CLS and is never merged.
      size: token sizes [B, N].
      keys: head-mean attention keys [B, N, K] (the similarity metric).
      merges: r, static.

    Returns:
      (x [B, N - r, D], size [B, N - r], destination [B, N]: output slot of every input token).
    """
    batch, length, _ = x.shape
    metric = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    metric = jax.lax.stop_gradient(metric)
    scores = jnp.einsum("bik,bjk->bij", metric[:, ::2], metric[:, 1::2])
    scores = scores.at[:, 0, :].set(-jnp.inf)
    best_score = scores.max(axis=-1)
    best_match = scores.argmax(axis=-1)
    # Stable descending sort: equal scores keep position order.
    order = jnp.argsort(-best_score, axis=-1, stable=True)
    merged_a, kept_a = order[:, :merges], jnp.sort(order[:, merges:], axis=-1)
    target_b = jnp.take_along_axis(best_match, merged_a, axis=-1)

    weighted = x * size[..., None]
    rows = jax.lax.broadcasted_iota(jnp.int32, (batch, 1), 0)
    b_sum = weighted[:, 1::2].at[rows, target_b].add(gather_tokens(weighted[:, ::2], merged_a))
    b_size = size[:, 1::2].at[rows, target_b].add(gather_tokens(size[:, ::2], merged_a))
    new_size = jnp.concatenate([gather_tokens(size[:, ::2], kept_a), b_size], axis=1)
    new_sum = jnp.concatenate([gather_tokens(weighted[:, ::2], kept_a), b_sum], axis=1)

    num_kept_a = kept_a.shape[1]
    destination_a = jnp.zeros((batch, (length + 1) // 2), jnp.int32)
    destination_a = destination_a.at[rows, kept_a].set(jnp.arange(num_kept_a, dtype=jnp.int32))
    destination_a = destination_a.at[rows, merged_a].set(num_kept_a + target_b)
    destination_b = num_kept_a + jnp.broadcast_to(jnp.arange(length // 2), (batch, length // 2))
    destination = jnp.zeros((batch, length), jnp.int32)
    destination = destination.at[:, ::2].set(destination_a).at[:, 1::2].set(destination_b)
    return new_sum / new_size[..., None], new_size, destination


class ToMe(Method, nn.Module):
    """Token merging (no parameters).

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of merges r.
    """

    stage: Stage
    placement: ClassVar[str] = "inside"
    kept_kind: ClassVar[str] = "destinations"
    merges: ClassVar[bool] = True
    keep_rate_kind: ClassVar[str] = "count"
    min_stage_count: ClassVar[int] = 0

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        requested = merge_target(context, context.stage - 1) - merge_target(context, context.stage)
        merges = min(requested, context.candidates // 2)
        if merges <= 0:
            return StagePlan(count=0, tokens_out=context.tokens_in, active=False)
        return StagePlan(count=merges, tokens_out=context.tokens_in - merges)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """Head mean of the keys, the A-B similarities, and the size weighting."""
        tokens, head_dim = stage.tokens_in, width // heads
        half_a, half_b = (tokens + 1) // 2, tokens // 2
        return tokens * head_dim + half_a * half_b * head_dim + tokens * width

    @staticmethod
    def initial_tokens(x: jax.Array) -> Tokens:
        """Every token starts with size 1."""
        return Tokens(x=x, size=jnp.ones(x.shape[:2]))

    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del train
        protected = self.stage.protected
        end = tokens.length - protected
        size = tokens.size if tokens.size is not None else jnp.ones(tokens.x.shape[:2])
        keys = attention.keys.mean(axis=1).astype(jnp.float32)
        x, new_size, destination = bipartite_merge(
            tokens.x[:, :end], size[:, :end], keys[:, :end], self.stage.plan.count
        )
        x = jnp.concatenate([x, tokens.x[:, end:]], axis=1)
        new_size = jnp.concatenate([new_size, size[:, end:]], axis=1)
        return Reduced(Tokens(x=x, size=new_size), destination)
