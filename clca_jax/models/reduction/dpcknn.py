"""DPC-KNN: cluster tokens by density peaks and merge each cluster (spec 5.4).

Before the block. Only the tokens between CLS and a protected suffix are clustered: the suffix
holds the CLR tokens and every token the Cross-Layer Cache has returned, so those are never
merged. Cluster counts `c_s = int(P * kr**(s+1))`, raised to 5 on non-final stages when <= 5 and
to 1 on the final stage when 0; a per-stage list gives the counts as they are (the reference
adjusts only the counts it computes). The density uses the `neighbours` nearest tokens (the
reference's `--k_neighbors`, default 5). Output: `[CLS, clusters (centre-score order), suffix]`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from clca_jax.models.initializers import trunc_normal
from clca_jax.models.reduction.base import (
    Method,
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
    top_k_stable,
)

# The reference's default `--k_neighbors`.
NEIGHBOURS = 5
# The smallest count the reference gives a non-final stage from a single keep rate; it is 5
# whatever `--k_neighbors` is.
MIN_CLUSTERS = 5


def cluster_count(context: PlanContext) -> int:
    if context.per_stage:
        return context.stage_count()
    count = int(context.num_patches * context.compounded())
    last = context.stage + 1 == context.num_stages
    if not last and count <= MIN_CLUSTERS:
        return MIN_CLUSTERS
    if last and count == 0:
        return 1
    return count


def density_peaks(
    x: jax.Array, clusters: int, noise: jax.Array, neighbours: int = NEIGHBOURS
) -> tuple[jax.Array, jax.Array]:
    """Assigns every token to a density-peak centre.

    Args:
      x: tokens to cluster [B, n, D].
      clusters: number of centres c.
      noise: [B, n] added to the density (tie breaking, as the reference's U(0,1) * 1e-6).
      neighbours: k, the nearest tokens (the token itself included) whose mean squared
        distance sets the density.

    Returns:
      (assignment [B, n] in 0..c-1, centres [B, c] token indices in centre-score order).
    """
    batch, count, width = x.shape
    squared = jnp.sum(x * x, axis=-1)
    dist2 = squared[:, :, None] + squared[:, None, :] - 2 * jnp.einsum("bid,bjd->bij", x, x)
    dist = jnp.sqrt(jnp.maximum(dist2, 0.0)) / math.sqrt(width)
    nearest = -jax.lax.top_k(-dist, neighbours)[0]
    density = jnp.exp(-jnp.mean(nearest**2, axis=-1)) + noise
    higher = density[:, None, :] > density[:, :, None]  # [b, i, j]: j denser than i
    dist_max = dist.max(axis=(1, 2))[:, None, None]
    delta = jnp.where(higher, dist, dist_max).min(axis=-1)
    centres = top_k_stable(delta * density, clusters)
    to_centres = jnp.take_along_axis(dist, centres[:, :, None], axis=1)  # [B, c, n]
    assignment = jnp.argmin(to_centres, axis=1)
    rows = jax.lax.broadcasted_iota(jnp.int32, (batch, 1), 0)
    assignment = assignment.at[rows, centres].set(jnp.arange(clusters))
    return assignment, centres


def merge_clusters(x: jax.Array, weight: jax.Array, assignment: jax.Array, clusters: int):
    """Per cluster: sum_i x_i w_i / (sum_i w_i + 1e-6).

    The sums over each cluster's members are products with the one-hot assignment rather than
    a scatter-add: the same sums (to float32 rounding), a plain matrix product for XLA, and
    an operation that ONNX expresses (`clca_jax.export`).
    """
    exact = jax.lax.Precision.HIGHEST  # no bf16 passes on TPUs: these are sums, not features
    members = jax.nn.one_hot(assignment, clusters, dtype=x.dtype)  # [B, N, c]
    total = jnp.einsum("bn,bnc->bc", weight, members, precision=exact) + 1e-6
    share = weight / jnp.take_along_axis(total, assignment, axis=1)
    return jnp.einsum("bnc,bnd->bcd", members, x * share[..., None], precision=exact)


class DPCKNN(Method, nn.Module):
    """DPC-KNN clustering with a learned merge weight `exp(score(x))`.

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the number of clusters.
      neighbours: k of the density (`model.reduction.dpcknn_k`).
    """

    stage: Stage
    neighbours: int = NEIGHBOURS
    placement: ClassVar[str] = "before"
    kept_kind: ClassVar[str] = "clusters"
    merges: ClassVar[bool] = True
    protects_suffix: ClassVar[bool] = True
    # Parameter names of the reference checkpoints: cluster_layers.{stage}.score.*
    official_prefix: ClassVar[str] = "cluster_layers"
    keep_rate_kind: ClassVar[str] = "count"

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        clusters = cluster_count(context)
        if clusters > context.candidates:
            raise ValueError(
                f"DPC-KNN stage {context.stage} needs {clusters} clusters but only "
                f"{context.candidates} tokens can be clustered; raise the image size or lower "
                "model.reduction.keep_rate."
            )
        neighbours = context.options.dpcknn_k if context.options else NEIGHBOURS
        if neighbours > context.candidates:
            raise ValueError(
                f"model.reduction.dpcknn_k={neighbours} is more than the {context.candidates} "
                f"tokens DPC-KNN stage {context.stage} clusters; lower it or keep more tokens "
                "at the stage before."
            )
        return StagePlan(clusters, 1 + clusters + context.protected)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """The score layer and the weighted merge."""
        return 2 * stage.reducible * width

    @classmethod
    def build(cls, stage: Stage, options, name: str) -> nn.Module:
        return cls(stage, neighbours=options.dpcknn_k, name=name)

    @nn.compact
    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del attention, train
        clusters = self.stage.plan.count
        end = tokens.length - self.stage.protected
        body = tokens.x[:, 1:end]
        # Reference: trunc-normal(0.02) weight and zero bias (timm init of new layers).
        score = nn.Dense(1, kernel_init=trunc_normal, name="score")(body)[..., 0]
        if self.has_rng("reduction"):
            noise = jax.random.uniform(self.make_rng("reduction"), score.shape) * 1e-6
        else:
            noise = jnp.zeros(score.shape)
        assignment, centres = density_peaks(
            jax.lax.stop_gradient(body), clusters, noise, self.neighbours
        )
        merged = merge_clusters(body, jnp.exp(score), assignment, clusters)
        x = jnp.concatenate([tokens.x[:, :1], merged, tokens.x[:, end:]], axis=1)
        return Reduced(Tokens(x=x), assignment)
