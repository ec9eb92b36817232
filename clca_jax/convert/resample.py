"""Position-embedding resampling that reproduces PyTorch's bicubic interpolation exactly.

Two PyTorch routes are in play (spec 1.3):

* `F.interpolate(mode='bicubic', antialias=True, align_corners=False)`: timm's
  `resample_abs_pos_embed`, used for every timm-format checkpoint. Keys cubic with a = -0.5,
  taps stretched by the scale when shrinking, and the weights of each output pixel normalised
  over the taps that fall inside the image (the PIL algorithm).
* `F.interpolate(mode='bicubic', antialias=False, align_corners=False)`: the CLIP conversion
  route. Keys cubic with a = -0.75, four taps, out-of-range source indices clamped to the edge.

Both are separable, so each is a pair of [out, in] weight matrices applied along the two grid
axes. The weights are computed in float64 and the result is returned in float32.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(distance: np.ndarray, a: float) -> np.ndarray:
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def antialiased_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of PyTorch's antialiased bicubic (a = -0.5)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size))
    for out_index in range(out_size):
        center = scale * (out_index + 0.5)
        # int() truncation as in PyTorch's kernel; center - support + 0.5 may be negative.
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, last)
        tap_weights = _cubic((taps - center + 0.5) * inv_scale, a=-0.5)
        total = tap_weights.sum()
        if total != 0.0:
            tap_weights = tap_weights / total
        weights[out_index, first:last] = tap_weights
    return weights


def clamped_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of PyTorch's non-antialiased bicubic (a = -0.75)."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    for out_index in range(out_size):
        source = scale * (out_index + 0.5) - 0.5
        base = math.floor(source)
        fraction = source - base
        for offset in (-1, 0, 1, 2):
            tap = min(max(base + offset, 0), in_size - 1)
            weights[out_index, tap] += _cubic(np.array(offset - fraction), a=-0.75)
    return weights


def resize_grid(grid: np.ndarray, out_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resizes a [H, W, C] grid to [out_h, out_w, C] as PyTorch's bicubic would."""
    in_h, in_w, _ = grid.shape
    make = antialiased_weights if antialias else clamped_weights
    rows, cols = make(in_h, out_hw[0]), make(in_w, out_hw[1])
    out = np.einsum("oh,hwc->owc", rows, grid.astype(np.float64))
    out = np.einsum("pw,owc->opc", cols, out)
    return out.astype(np.float32)


def resample_pos_embed(
    pos_embed: np.ndarray,
    new_grid: tuple[int, int],
    num_prefix: int,
    antialias: bool = True,
) -> np.ndarray:
    """Resamples a [1, prefix + h*w, C] position embedding to a new square or rectangular grid.

    Args:
      pos_embed: the table, prefix rows (class token) first, then the row-major patch grid.
      new_grid: target (rows, cols) of patches.
      num_prefix: leading rows kept unchanged (1 for a class-token row, 0 for DeiT-3).
      antialias: True for timm's route (a = -0.5, antialiased), False for the CLIP route.

    Returns:
      The resampled table [1, prefix + rows*cols, C], float32.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
    old_side = math.isqrt(patches.shape[0])
    if old_side * old_side != patches.shape[0]:
        raise ValueError(
            f"Position embedding has {patches.shape[0]} patch rows, which is not a square grid."
        )
    if (old_side, old_side) == tuple(new_grid):
        return pos_embed.astype(np.float32)
    grid = patches.reshape(old_side, old_side, -1)
    resized = resize_grid(grid, new_grid, antialias).reshape(1, -1, grid.shape[-1])
    return np.concatenate([prefix.astype(np.float32), resized], axis=1)
