"""Checkpoint conversion: timm / OpenCLIP state dicts -> Flax variables."""

from clca_jax.convert.resample import resample_pos_embed
from clca_jax.convert.timm import (
    ConversionError,
    ConversionReport,
    convert_state_dict,
    is_openclip,
    load_state_dict,
)

__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_state_dict",
    "is_openclip",
    "load_state_dict",
    "resample_pos_embed",
]
