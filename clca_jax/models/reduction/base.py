"""What every token reduction method shares: the `Method` contract, its token state and helpers.

A method is a linen module in its own file that subclasses `Method` and declares everything the
rest of the library asks about it (see `Method`): when it acts, its static counts, its MACs, the
per-token state it starts, how its `kept` output maps tokens for pictures, whether it merges,
its extra loss, and the names of its parameters in the reference checkpoints. The model loop,
the FLOPs counter, the pictures, the optimizer's decay mask and the converter read these
declarations; none of them knows a method by its name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    import flax.linen as nn

    from clca_jax.models.schedule import ReductionOptions


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """Everything a method's count formula may read.

    Attributes:
      stage: index of this reduction among the reduction locations.
      num_stages: number of reduction locations.
      keep_rate: `model.reduction.keep_rate` as configured: one rate, or a tuple with one
        entry per location (ratios or token counts, as the method's `keep_rate_kind` says;
        read it through `stage_rate`, `compounded` and `stage_count`).
      num_patches: patch tokens P of the image.
      num_clr: CLR tokens.
      tokens_in: current sequence length (CLS included).
      protected: trailing tokens the method must leave alone.
      train: training mode (DynamicViT keeps every token while training).
      clc: the Cross-Layer Cache is on (DynamicViT's evaluation count depends on it).
      options: the whole `model.reduction` section, for method-specific settings (DPC-KNN's
        neighbour count); None where a caller plans without one.
    """

    stage: int
    num_stages: int
    keep_rate: float | tuple
    num_patches: int
    num_clr: int
    tokens_in: int
    protected: int
    train: bool
    clc: bool
    options: ReductionOptions | None = None

    @property
    def candidates(self) -> int:
        """Tokens the method may reduce: all but CLS and the protected suffix."""
        return self.tokens_in - 1 - self.protected

    @property
    def per_stage(self) -> bool:
        """The keep rate is a list with one entry per location (the reference's `--keep_rate
        r1 r2 ...`) rather than one rate."""
        return isinstance(self.keep_rate, tuple)

    def stage_rate(self) -> float:
        """This stage's ratio relative to the current tokens (EViT, Top-K): the single keep
        rate at every stage, or the list's entry."""
        return self.keep_rate[self.stage] if self.per_stage else self.keep_rate

    def compounded(self) -> float:
        """This stage's ratio relative to P: keep_rate ** (stage + 1), or the list's entry
        (the reference compounds a single rate only)."""
        if self.per_stage:
            return self.keep_rate[self.stage]
        return self.keep_rate ** (self.stage + 1)

    def stage_count(self) -> int | None:
        """The token count a list gives this stage (methods whose `keep_rate_kind` is
        "count"), or None for a single keep rate, which the method's formula turns into one."""
        return self.keep_rate[self.stage] if self.per_stage else None


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

    @property
    def reducible(self) -> int:
        """Tokens the step may reduce: all but CLS and the protected suffix."""
        return self.tokens_in - 1 - self.protected


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
            fill = jnp.broadcast_to(jnp.asarray(value, state.dtype), (batch, count))
            return jnp.concatenate([state, fill], axis=1)

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


# ----------------------------------------------------------------------------------------------
# The contract of a method.

KEPT_KINDS = ("positions", "destinations", "clusters", "gathered", "mixing")


class Method:
    """What a token reduction method declares, beside its `__call__`.

    Subclass it together with `flax.linen.Module` (`class EViT(Method, nn.Module)`), give the
    module a `stage: Stage` attribute, and override what differs from the defaults below.

    Class attributes:
      placement: "before" (acts on the input of its block: DPC-KNN, DynamicViT, SiT,
        PatchMerger) or "inside" (between the attention residual and the MLP: EViT, Top-K,
        ToMe, ATS).
      reduces: False only for the plain ViT, which plans no reduction step.
      kept_kind: what the `kept` output of `__call__` holds (see `destinations`):
        "positions" [B, keep] input positions of the kept tokens, in output order after CLS;
        "destinations" [B, N - protected] the output slot of every input token;
        "clusters" [B, n] the cluster of the tokens at positions 1..n;
        "gathered" [B, 1 + slots] the input position of every output slot, -1 for padding;
        "mixing" [B, K, n] the weight of the tokens at positions 1..n in each new token.
      merges: several input tokens become one (the pictures colour patches by their token).
      protects_suffix: the method never touches the CLR tokens and the cache's returned tokens
        (DPC-KNN), as `model.clca.protect_cache` makes every method do.
      keep_rate_kind: how a per-stage list in `model.reduction.keep_rate` reads, as in the
        reference code: "ratio" (one keep ratio per location, in (0, 1]) or "count" (one
        absolute token count per location; the single-rate formula is then bypassed).
      min_stage_count: the smallest count a "count" list may give a stage.
      loss_weight: weight of the mean of the stages' `Reduced.loss` in the training loss
        (`loss_weight_of` may read it from the options instead).
      decays_clr: the reference model class of this method applies weight decay to the CLR
        tokens (only its plain ViT does, through a misspelt exclusion list).
      official_prefix: the reference checkpoint's module list of the per-stage parameters
        (`{official_prefix}.{stage}.*`), for methods that have parameters.
      official_names: Flax submodule path -> reference submodule name, where they differ.

    Where the counts come from: `plan(context)` turns the configured keep rate into the static
    `StagePlan` of one stage, with the reference's float64 formulas; the model receives it as
    `stage.plan`, so every shape is known before tracing.
    """

    placement: ClassVar[str] = "inside"
    reduces: ClassVar[bool] = True
    kept_kind: ClassVar[str] = "positions"
    merges: ClassVar[bool] = False
    protects_suffix: ClassVar[bool] = False
    keep_rate_kind: ClassVar[str] = "ratio"
    min_stage_count: ClassVar[int] = 1
    loss_weight: ClassVar[float] = 0.0
    decays_clr: ClassVar[bool] = False
    official_prefix: ClassVar[str | None] = None
    official_names: ClassVar[dict[str, str]] = {}

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        """The static counts of one stage."""
        raise NotImplementedError

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """Multiply-accumulates of the reduction step itself, in the paper's convention
        (`clca_jax.flops`: matmuls, linear layers, element-wise multiplies, LayerNorm and means
        count; adds, softmax, GELU, gathers, sorts and sums are free)."""
        raise NotImplementedError

    @classmethod
    def loss_weight_of(cls, options: ReductionOptions) -> float:
        """Weight of the stages' mean `Reduced.loss` under these options (`loss_weight`)."""
        del options
        return cls.loss_weight

    @classmethod
    def build(cls, stage: Stage, options: ReductionOptions, name: str) -> nn.Module:
        """The module of one stage; `options` carries method-specific settings."""
        del options
        return cls(stage, name=name)

    @staticmethod
    def initial_tokens(x: jax.Array) -> Tokens:
        """The token state the method carries, neutral at the embedding."""
        return Tokens(x=x)

    @classmethod
    def destinations(cls, stage: Stage, kept: np.ndarray) -> np.ndarray:
        """The output slot of every token entering the stage, from its `kept` output.

        Returns:
          int [B, stage.tokens_in]: the slot in the stage's output sequence of each input
          token, -1 where it was dropped (EViT's tokens fused into one count as dropped).
          Merging methods send several tokens to one slot.
        """
        return kept_destinations(cls.kept_kind, stage, kept)

    @classmethod
    def checkpoint_key(cls, stage: str, module_path: tuple[str, ...], leaf: str) -> str:
        """The reference checkpoint key of a parameter of stage `stage`.

        Args:
          stage: the stage index, as in the module name `reduction_{stage}`.
          module_path: the Flax submodules below the stage's module (empty for a parameter
            of the method's module itself, e.g. SiT's `scale`).
          leaf: the reference's leaf name (`weight`, `bias`, ...).
        """
        if cls.official_prefix is None:
            raise ValueError(
                f"{cls.__name__} declares no official_prefix, so its parameters have no "
                "checkpoint names."
            )
        prefix = f"{cls.official_prefix}.{stage}"
        if not module_path:
            return f"{prefix}.{leaf}"
        inner = "/".join(module_path)
        inner = cls.official_names.get(inner, inner.replace("/", "."))
        return f"{prefix}.{inner}.{leaf}"


def kept_destinations(kind: str, stage: Stage, kept: np.ndarray) -> np.ndarray:
    """`Method.destinations` for each `kept_kind` (NumPy, after the forward pass)."""
    if kind not in KEPT_KINDS:
        raise ValueError(f"unknown kept_kind {kind!r}; known: {', '.join(KEPT_KINDS)}")
    kept = np.asarray(kept)
    batch, length, protected = kept.shape[0], stage.tokens_in, stage.protected
    end = length - protected
    dest = np.full((batch, length), -1, np.int64)
    rows = np.arange(batch)[:, None]
    if kind == "positions":
        dest[:, 0] = 0
        dest[rows, kept] = 1 + np.arange(kept.shape[1])
    elif kind == "destinations":
        dest[:, :end] = kept
    elif kind == "clusters":
        dest[:, 0] = 0
        dest[:, 1:end] = 1 + kept
    elif kind == "gathered":
        slots = np.broadcast_to(np.arange(kept.shape[1]), kept.shape)
        real = kept >= 0
        dest[np.broadcast_to(rows, kept.shape)[real], kept[real]] = slots[real]
    elif kept.shape[1]:  # mixing weights; with no new token everything but CLS is gone
        dest[:, 0] = 0
        dest[:, 1:end] = 1 + np.argmax(kept, axis=1)
    else:
        dest[:, 0] = 0
    # The protected suffix (CLR and cache tokens) moves as a block to the end.
    dest[:, end:] = stage.plan.tokens_out - protected + np.arange(protected)
    return dest
