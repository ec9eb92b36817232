"""Token reduction methods, one file each; `METHODS` maps config names to them.

Adding a method: a new file with a linen module following `base.py`, plus one line here.
"""

from clca_jax.models.reduction.ats import ATS
from clca_jax.models.reduction.base import PlanContext, Reduced, Stage, StagePlan, Tokens
from clca_jax.models.reduction.dpcknn import DPCKNN
from clca_jax.models.reduction.dynamicvit import DynamicViT
from clca_jax.models.reduction.evit import EViT
from clca_jax.models.reduction.patchmerger import PatchMerger
from clca_jax.models.reduction.sit import SiT
from clca_jax.models.reduction.tome import ToMe
from clca_jax.models.reduction.topk import TopK


class NoReduction:
    """The plain ViT: no reduction step is planned."""

    placement = "none"

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        raise AssertionError("no reduction is planned without a method")


METHODS = {
    "none": NoReduction,
    "evit": EViT,
    "topk": TopK,
    "tome": ToMe,
    "dpcknn": DPCKNN,
    "dynamicvit": DynamicViT,
    "ats": ATS,
    "sit": SiT,
    "patchmerger": PatchMerger,
}

__all__ = ["METHODS", "PlanContext", "Reduced", "Stage", "StagePlan", "Tokens"]
