"""What every token reduction method shares: its planning context, its token state and helpers.

A method is a linen module in its own file with

* `placement`: "before" (acts on the input of its block: DPC-KNN, DynamicViT, SiT,
  PatchMerger) or "inside" (between the attention residual and the MLP: EViT, Top-K, ToMe, ATS);
* `plan(context) -> StagePlan`: its static counts, from the spec's float64 formulas;
* `__call__(tokens, attention, train) -> Reduced(tokens, kept, loss)`: the reduction itself,
  with the stage's counts given as the module's `stage` attribute, so every shape is static.

`kept` describes what survived, for visualisation: kept token positions, or where each token
went (see each method's docstring).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """Everything a method's count formula may read.

    Attributes:
      stage: index of this reduction among the reduction locations.
      num_stages: number of reduction locations.
      keep_rate: the configured keep rate.
      num_patches: patch tokens P of the image.
      num_registers: CLR tokens.
      tokens_in: current sequence length (CLS included).
      protected: trailing tokens the method must leave alone.
      train: training mode (DynamicViT keeps every token while training).
      clc: the Cross-Layer Cache is on (DynamicViT's evaluation count depends on it).
    """

    stage: int
    num_stages: int
    keep_rate: float
    num_patches: int
    num_registers: int
    tokens_in: int
    protected: int
    train: bool
    clc: bool

    @property
    def candidates(self) -> int:
        """Tokens the method may reduce: all but CLS and the protected suffix."""
        return self.tokens_in - 1 - self.protected

    def compounded(self) -> float:
        """keep_rate ** (stage + 1), the per-stage ratio relative to P of most methods."""
        return self.keep_rate ** (self.stage + 1)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Static counts of one reduction step.

    Attributes:
      count: the method's own number (kept tokens, merges, clusters or samples).
      tokens_out: sequence length after the step (an upper bound for ATS).
      active: False when the step leaves the sequence as it is.
    """

    count: int
    tokens_out: int
    active: bool = True


@dataclasses.dataclass(frozen=True)
class Stage:
    """One reduction step as the model executes it.

    Attributes:
      index: stage number (0-based, in block order).
      block: the block it belongs to.
      plan: the method's counts (`count`, `tokens_out`, `active`).
      tokens_in: sequence length entering the reduction (CLS included).
      protected: trailing tokens the reduction leaves untouched (DPC-KNN's CLR and cache
        suffix; every method's with `protect_cache`).
    """

    index: int
    block: int
    plan: StagePlan
    tokens_in: int
    protected: int


@flax.struct.dataclass
class Tokens:
    """The token sequence and the per-token state some methods carry through the blocks.

    Attributes:
      x: tokens [B, N, D], float32.
      size: ToMe's merged-token sizes [B, N] (1 for unmerged tokens), or None.
      valid: ATS slot validity [B, N] (False for padding slots), or None.
      decision: DynamicViT's keep decisions [B, N] (CLS = 1), or None.
      present: ATS slots that exist in the reference model [B, N], or None. The reference pads
        its samples to the batch's largest count; static shapes pad to the largest possible
        count, so slots beyond the batch's largest count are excluded from attention, sampling
        and the cache's GAP, which makes the results equal.
    """

    x: jax.Array
    size: jax.Array | None = None
    valid: jax.Array | None = None
    decision: jax.Array | None = None
    present: jax.Array | None = None

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def attention_bias(self) -> jax.Array | None:
        """Additive logit bias [B, 1, N, N] or [B, 1, 1, N] implied by the state."""
        bias = None
        if self.size is not None:
            bias = jnp.log(self.size)[:, None, None, :]
        if self.valid is not None:
            pair = self.valid[:, None, :, None] & self.valid[:, None, None, :]
            # Same as masked_fill(-finfo.max): a padding query attends uniformly.
            fill = jnp.where(pair, 0.0, -jnp.finfo(jnp.float32).max)
            if self.present is not None:
                fill = jnp.where(self.present[:, None, None, :], fill, -jnp.inf)
            bias = fill if bias is None else bias + fill
        return bias

    def append(self, extra: jax.Array, decision_value: float) -> Tokens:
        """Appends cache tokens; they enter as unmerged, valid tokens.

        Args:
          extra: [B, M, D] tokens.
          decision_value: DynamicViT decision given to them (1 in training, 0 at evaluation,
            as in the reference).
        """
        batch, count = extra.shape[:2]

        def extend(state, value):
            if state is None:
                return None
            return jnp.concatenate([state, jnp.full((batch, count), value, state.dtype)], axis=1)

        return Tokens(
            x=jnp.concatenate([self.x, extra], axis=1),
            size=extend(self.size, 1.0),
            valid=extend(self.valid, True),
            decision=extend(self.decision, decision_value),
            present=extend(self.present, True),
        )


class Reduced(NamedTuple):
    """What a reduction step returns.

    Attributes:
      tokens: the new sequence and state.
      kept: what survived (method-specific, for visualisation and tests).
      loss: an auxiliary loss of the step (DynamicViT's keep ratio), or None.
    """

    tokens: Tokens
    kept: jax.Array
    loss: jax.Array | None = None


def split(x: jax.Array, protected: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(CLS [B,1,D], reducible tokens, protected suffix) of a sequence."""
    end = x.shape[1] - protected
    return x[:, :1], x[:, 1:end], x[:, end:]


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x[b, indices[b]] for [B, N, ...] and integer [B, K]."""
    expanded = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, expanded, axis=1)


def top_k_stable(scores: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest scores, descending, ties broken towards the lower index."""
    return jax.lax.top_k(scores, k)[1]
