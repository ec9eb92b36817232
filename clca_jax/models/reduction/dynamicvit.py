"""DynamicViT: a learned predictor decides which tokens to keep (spec 5.5).

Before the block. Training keeps every token and masks the dropped ones out of every attention
(Gumbel-softmax decisions, so the predictor learns through them), plus a loss that pulls the
kept fraction of stage s towards `keep_rate**(s+1)`. Evaluation removes tokens: with the
Cross-Layer Cache `int((S - 1) * kr)` of the S current non-CLS tokens are kept at every stage,
without it `int(N0 * kr**(s+1))` of the N0 initial ones. Output: `[CLS, kept (descending keep
score)]`. A per-stage list of ratios replaces kr**(s+1) by its entries, as the reference's
`--keep_rate r1 r2 ...`; the reference's cache branch then keeps `int((S - 1) * r1)` at every
stage (it reads the first entry, which for a single rate is kr).
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
    gather_tokens,
    split,
    top_k_stable,
)

# The reference's `--ratio_weight`.
RATIO_WEIGHT = 2.0


def stage_ratio(keep_rate: float | tuple, stage: int) -> float:
    """Target kept fraction of stage `stage`: kr**(s+1), or the per-stage list's entry."""
    return keep_rate[stage] if isinstance(keep_rate, tuple) else keep_rate ** (stage + 1)


def eval_keep_count(context: PlanContext) -> int:
    if context.clc:
        first = context.keep_rate[0] if context.per_stage else context.keep_rate
        return int((context.candidates - 1) * first)
    initial = context.num_patches + (0 if context.protected else context.num_clr)
    return int(initial * context.compounded())


class Predictor(nn.Module):
    """Keep/drop log-probabilities of every token from its own and the kept tokens' features.

    LN -> Linear -> GELU; the second half of the channels is replaced by its mean over the
    tokens still kept; -> Linear -> GELU -> Linear -> GELU -> Linear(2) -> log-softmax.
    """

    @nn.compact
    def __call__(self, x: jax.Array, decision: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = lambda features, name: nn.Dense(features, kernel_init=trunc_normal, name=name)  # noqa: E731
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        h = gelu(dense(width, "proj_in")(h))
        half = width // 2
        weights = decision[..., None]
        pooled = jnp.sum(h[..., half:] * weights, axis=1, keepdims=True)
        pooled = pooled / jnp.sum(weights, axis=1, keepdims=True) + 1e-6
        h = jnp.concatenate([h[..., :half], jnp.broadcast_to(pooled, h[..., half:].shape)], -1)
        h = gelu(dense(width // 2, "fc1")(h))
        h = gelu(dense(width // 4, "fc2")(h))
        return jax.nn.log_softmax(dense(2, "fc3")(h), axis=-1)


def hard_gumbel_keep(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """Channel 0 of a hard Gumbel-softmax sample (tau 1), straight-through gradient."""
    gumbel = -jnp.log(-jnp.log(jax.random.uniform(key, log_probs.shape, minval=1e-20)))
    soft = jax.nn.softmax(log_probs + gumbel, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
    return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


class DynamicViT(Method, nn.Module):
    """DynamicViT token pruning with its per-stage predictor.

    Attributes:
      stage: the schedule's step; `stage.plan.count` is the evaluation keep count.
      keep_rate: the configured keep rate, one or per stage (the training target of stage s
        is kr**(s+1) or the list's entry s).
    """

    stage: Stage
    keep_rate: float | tuple = 1.0
    placement: ClassVar[str] = "before"
    kept_kind: ClassVar[str] = "positions"  # evaluation mode
    loss_weight: ClassVar[float] = RATIO_WEIGHT  # without options (`loss_weight_of`)
    official_prefix: ClassVar[str] = "score_predictor"
    official_names: ClassVar[dict] = {
        "predictor/norm": "in_conv.0",
        "predictor/proj_in": "in_conv.1",
        "predictor/fc1": "out_conv.0",
        "predictor/fc2": "out_conv.2",
        "predictor/fc3": "out_conv.4",
    }

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        keep = eval_keep_count(context)
        if context.train:
            return StagePlan(keep, context.tokens_in)
        return StagePlan(keep, 1 + keep + context.protected)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """The predictor: LN, proj_in, the kept mean, fc1, fc2, fc3."""
        body = stage.reducible
        predictor = body * width + body * width**2 + body * width // 2
        predictor += body * width * (width // 2) + body * (width // 2) * (width // 4)
        return predictor + body * (width // 4) * 2

    @classmethod
    def loss_weight_of(cls, options) -> float:
        """`model.reduction.dynamicvit_ratio_weight` (the reference's `--ratio_weight`)."""
        return options.dynamicvit_ratio_weight

    @classmethod
    def build(cls, stage: Stage, options, name: str) -> nn.Module:
        return cls(stage, keep_rate=options.keep_rate, name=name)

    @staticmethod
    def initial_tokens(x: jax.Array) -> Tokens:
        """Every token starts kept."""
        return Tokens(x=x, decision=jnp.ones(x.shape[:2]))

    @nn.compact
    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del attention
        protected = self.stage.protected
        cls, body, suffix = split(tokens.x, protected)
        end = tokens.length - protected
        decision = tokens.decision[:, 1:end]
        log_probs = Predictor(name="predictor")(body, decision)
        if train:
            keep = hard_gumbel_keep(self.make_rng("reduction"), log_probs) * decision
            new_decision = tokens.decision.at[:, 1:end].set(keep)
            target = stage_ratio(self.keep_rate, self.stage.index)
            loss = jnp.mean((jnp.mean(keep, axis=1) - target) ** 2)
            return Reduced(Tokens(x=tokens.x, decision=new_decision), keep, loss)
        order = top_k_stable(log_probs[..., 0], self.stage.plan.count)
        x = jnp.concatenate([cls, gather_tokens(body, order), suffix], axis=1)
        new_decision = jnp.concatenate(
            [tokens.decision[:, :1], gather_tokens(decision, order), tokens.decision[:, end:]],
            axis=1,
        )
        return Reduced(Tokens(x=x, decision=new_decision), order + 1)
