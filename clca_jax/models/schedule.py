"""The static token schedule: how many tokens every block sees, computed before tracing.

All counts follow the reference code's Python float64 arithmetic (spec sections 3 and 5), so the
model, the FLOPs counter and the tests read one table. The per-method count formulas live with
each method (`reduction/<method>.py`, function `plan`); this module walks the blocks, applies
them at the reduction locations and adds the Cross-Layer Cache.
"""

from __future__ import annotations

import dataclasses

from clca_jax.models.config import NO_HEAD
from clca_jax.models.reduction import NO_REDUCTION, get_method
from clca_jax.models.reduction.base import PlanContext, Stage


@dataclasses.dataclass(frozen=True)
class ClcaOptions:
    """The CLCA fields that shape the token sequence (see `model.clca` in the config)."""

    head: str = NO_HEAD
    clc: bool = False
    num_clr: int = 0
    include_gap: bool = True
    recover_at_last: bool = True
    pool_cls: bool = False
    pool_clr: bool = False
    protect_cache: bool = False
    kernels_per_channel: int = 2


@dataclasses.dataclass(frozen=True)
class ReductionOptions:
    """The `model.reduction` fields.

    Attributes:
      keep_rate: one rate, or a tuple with one entry per location (ratios or token counts,
        as the method's `keep_rate_kind` says).
    """

    method: str = NO_REDUCTION
    keep_rate: float | tuple = 1.0
    locations: tuple[int, ...] = (3, 6, 9)
    ats_distance: str = "torch_cdist"
    dpcknn_k: int = 5
    dynamicvit_ratio_weight: float = 2.0


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What happens in and after one block.

    Attributes:
      attn_tokens: length seen by the attention.
      mlp_tokens: length seen by the MLP.
      stage: the reduction step at this block, if any.
      recovered: cache tokens appended after the block.
      cached: tokens put into the cache after the block (after any recovery).
      pool_end: the cached GAP averages tokens [pool_start, pool_end) of the sequence.
      collect_cls: the class token after this block feeds the CLA / IFA head.
    """

    attn_tokens: int
    mlp_tokens: int
    stage: Stage | None
    recovered: int
    cached: int
    pool_end: int
    collect_cls: bool


@dataclasses.dataclass(frozen=True)
class TokenSchedule:
    """Per-block token counts of one model in one mode (train or eval).

    Attributes:
      blocks: one plan per block.
      num_patches: patch tokens P.
      recovery_layers: blocks after which the cache is emptied into the sequence.
      pool_start: first token of the GAP range (0 with `pool_cls`, else the first token
        after the class and register tokens).
      include_gap: the cache holds a GAP token.
      num_registers: the backbone's register tokens after CLS (DINOv2), hidden from the
        reduction steps: a `Stage`'s counts leave them out.
    """

    blocks: tuple[BlockPlan, ...]
    num_patches: int
    recovery_layers: tuple[int, ...]
    pool_start: int
    include_gap: bool
    num_registers: int = 0

    @property
    def empty_gap_blocks(self) -> tuple[int, ...]:
        """Blocks whose cached GAP token would average an empty range (all but CLS gone)."""
        return tuple(
            index
            for index, plan in enumerate(self.blocks)
            if plan.cached and self.include_gap and plan.pool_end <= self.pool_start
        )

    @property
    def tokens_out(self) -> int:
        last = self.blocks[-1]
        return last.mlp_tokens + last.recovered

    def table(self) -> list[dict]:
        """Rows for printing: block, attention / MLP length, recovered and cached tokens."""
        return [
            {
                "block": index,
                "attn_tokens": plan.attn_tokens,
                "mlp_tokens": plan.mlp_tokens,
                "recovered": plan.recovered,
                "cached": plan.cached,
                "reduction": plan.stage.plan.count if plan.stage else None,
            }
            for index, plan in enumerate(self.blocks)
        ]


def recovery_layers(depth: int, locations, clca: ClcaOptions) -> tuple[int, ...]:
    """Blocks after which cached tokens return: the reduction locations, plus depth-2."""
    if not clca.clc:
        return ()
    layers = tuple(locations)
    return layers + (depth - 2,) if clca.recover_at_last else layers


def build_schedule(
    depth: int,
    num_patches: int,
    reduction: ReductionOptions,
    clca: ClcaOptions,
    train: bool,
    num_registers: int = 0,
) -> TokenSchedule:
    """Walks the blocks once, in Python, exactly as the reference forward pass does.

    Register tokens (`num_registers`, after CLS) attend and feed forward like any token but
    are never reduced: each reduction step sees the sequence without them (its `Stage` counts
    exclude them), and they are put back after CLS.

    Raises:
      ValueError: a method asked for more tokens than exist.
    """
    method = get_method(reduction.method)
    locations = tuple(reduction.locations) if method.reduces else ()
    cls_locations = tuple(reduction.locations) + (depth - 1,)
    recovery = recovery_layers(depth, reduction.locations, clca)
    pool_start = 0 if clca.pool_cls else 1 + num_registers
    num_clr = clca.num_clr
    protect = clca.protect_cache or method.protects_suffix
    keep_rate = reduction.keep_rate
    if not isinstance(keep_rate, tuple):
        keep_rate = float(keep_rate)

    length = 1 + num_registers + num_patches + num_clr
    pool_end = length - num_clr if (num_clr and not clca.pool_clr) else length
    protected = num_clr if protect else 0
    pending = 0  # tokens waiting in the cache
    blocks = []
    for index in range(depth):
        stage = None
        if index in locations:
            context = PlanContext(
                stage=locations.index(index),
                num_stages=len(locations),
                keep_rate=keep_rate,
                num_patches=num_patches,
                num_clr=num_clr,
                tokens_in=length - num_registers,
                protected=protected,
                train=train,
                clc=clca.clc,
                options=reduction,
            )
            plan = method.plan(context)
            stage = Stage(context.stage, index, plan, length - num_registers, protected)
        if stage and method.placement == "before":
            length = stage.plan.tokens_out + num_registers
        attn_tokens = length
        if stage and method.placement == "inside":
            length = stage.plan.tokens_out + num_registers
        mlp_tokens = length

        recovered = 0
        if index in recovery:
            pool_end = length
            recovered, pending = pending, 0
            length += recovered
            if protect:
                protected += recovered
        cached = 0
        if recovery and index < recovery[-1]:
            cached = int(clca.include_gap) + num_clr
            pending += cached
        blocks.append(
            BlockPlan(
                attn_tokens=attn_tokens,
                mlp_tokens=mlp_tokens,
                stage=stage,
                recovered=recovered,
                cached=cached,
                pool_end=pool_end,
                collect_cls=clca.head != NO_HEAD and index in cls_locations,
            )
        )
    return TokenSchedule(
        tuple(blocks), num_patches, recovery, pool_start, clca.include_gap, num_registers
    )


def check_schedule(schedule: TokenSchedule, model_config) -> None:
    """Rejects a configuration whose cache would average an empty range.

    The reference code produces NaN logits there: after the last reduction only the class token
    is left (SiT / PatchMerger / ATS at very low keep rates) and the GAP token of the cache is a
    mean over nothing. The token schedule itself stays available (e.g. for the FLOPs table).
    """
    blocks = schedule.empty_gap_blocks
    if blocks:
        raise ValueError(
            f"With model.reduction.method={model_config.reduction.method!r} at keep_rate "
            f"{model_config.reduction.keep_rate} only the class token is left after block "
            f"{blocks[0]}, so the cache's GAP token would average nothing (the reference code "
            "gives NaN logits here). Raise model.reduction.keep_rate, set "
            "model.clca.recover_at_last=False, or set model.clca.include_gap=False."
        )
