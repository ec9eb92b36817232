"""Token reduction methods, one file each; `METHODS` maps config names to them.

Adding a method: a new file with a linen module that subclasses `base.Method` and declares what
the contract asks (placement, counts, MACs, token state, `kept` format, loss, checkpoint names),
plus one line in `METHODS` here (or `register_method` from outside the library). Nothing else in
the library names a method: the config validation, the model, the FLOPs counter, the pictures,
the optimizer and the converter all ask the class.
"""

from __future__ import annotations

from typing import ClassVar

from clca_jax.models.reduction.ats import ATS
from clca_jax.models.reduction.base import (
    Method,
    PlanContext,
    Reduced,
    Stage,
    StagePlan,
    Tokens,
)
from clca_jax.models.reduction.dpcknn import DPCKNN
from clca_jax.models.reduction.dynamicvit import DynamicViT
from clca_jax.models.reduction.evit import EViT
from clca_jax.models.reduction.patchmerger import PatchMerger
from clca_jax.models.reduction.sit import SiT
from clca_jax.models.reduction.tome import ToMe
from clca_jax.models.reduction.topk import TopK

NO_REDUCTION = "none"


class NoReduction(Method):
    """The plain ViT: no reduction step is planned."""

    placement: ClassVar[str] = "none"
    reduces: ClassVar[bool] = False
    # The reference's plain ViT decays its CLR tokens (a misspelt exclusion list); kept.
    decays_clr: ClassVar[bool] = True

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        raise AssertionError("no reduction is planned without a method")


METHODS: dict[str, type[Method]] = {
    NO_REDUCTION: NoReduction,
    "evit": EViT,
    "topk": TopK,
    "tome": ToMe,
    "dpcknn": DPCKNN,
    "dynamicvit": DynamicViT,
    "ats": ATS,
    "sit": SiT,
    "patchmerger": PatchMerger,
}
# What the benchmark times unless told otherwise: no reduction against EViT, the paper's main
# method.
COMPARED_BY_DEFAULT = (NO_REDUCTION, "evit")


def get_method(name: str) -> type[Method]:
    """The class of `model.reduction.method` name.

    Raises:
      ValueError: unknown name; the message lists the known ones.
    """
    if name not in METHODS:
        raise ValueError(
            f"model.reduction.method must be one of {', '.join(METHODS)}; got {name!r}."
        )
    return METHODS[name]


def register_method(name: str, method: type[Method]) -> None:
    """Makes `method` available as `model.reduction.method=name` (a method of your own)."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"{method!r} is not a subclass of clca_jax.models.reduction.Method.")
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"a reduction method named {name!r} is already registered.")
    METHODS[name] = method


__all__ = [
    "COMPARED_BY_DEFAULT",
    "METHODS",
    "NO_REDUCTION",
    "Method",
    "PlanContext",
    "Reduced",
    "Stage",
    "StagePlan",
    "Tokens",
    "get_method",
    "register_method",
]
