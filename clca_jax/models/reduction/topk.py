"""Top-K: EViT without the fused token, `[CLS, kept...]` (the reference code's `topk.py`)."""

from __future__ import annotations

from typing import ClassVar

from clca_jax.models.reduction.base import PlanContext, Stage, StagePlan
from clca_jax.models.reduction.evit import EViT, plan_keep


class TopK(EViT):
    """Keeps the most attended tokens and drops the rest (no parameters)."""

    fuse: ClassVar[bool] = False

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        return plan_keep(context, extra_tokens=0)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        """Head mean of the CLS attention."""
        return stage.reducible
