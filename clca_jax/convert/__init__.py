"""Checkpoint conversion: timm / OpenCLIP state dicts -> Flax variables."""

from clca_jax.convert.adapt import Report
from clca_jax.convert.resample import resample_pos_embed
from clca_jax.convert.timm import (
    ConversionError,
    convert_state_dict,
    is_openclip,
    load_state_dict,
)

__all__ = [
    "ConversionError",
    "convert_state_dict",
    "is_openclip",
    "load_state_dict",
    "Report",
    "resample_pos_embed",
]
