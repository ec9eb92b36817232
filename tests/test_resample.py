"""Position-embedding resampling equals PyTorch's bicubic interpolation (spec 1.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clca_jax.convert.resample import resample_pos_embed, resize_grid


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(
    "in_size,out_size", [(14, 28), (14, 7), (24, 14), (7, 3), (14, 20), (5, 17)]
)
def test_resize_matches_torch(in_size, out_size, antialias):
    grid = np.random.default_rng(in_size * out_size).standard_normal((in_size, in_size, 6))
    grid = grid.astype(np.float32)
    expected = (
        F.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None],
            size=(out_size, out_size),
            mode="bicubic",
            antialias=antialias,
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(
        resize_grid(grid, (out_size, out_size), antialias), expected, atol=1e-5
    )


def test_kernels_differ_when_upsampling():
    """The two routes are not interchangeable: a = -0.5 vs a = -0.75 with clamping."""
    grid = np.random.default_rng(0).standard_normal((14, 14, 4)).astype(np.float32)
    gap = np.abs(resize_grid(grid, (28, 28), True) - resize_grid(grid, (28, 28), False)).max()
    assert gap > 1e-2


def test_prefix_rows_kept_and_grid_checked():
    table = np.random.default_rng(1).standard_normal((1, 1 + 16, 3)).astype(np.float32)
    out = resample_pos_embed(table, (8, 8), num_prefix=1)
    assert out.shape == (1, 65, 3)
    np.testing.assert_array_equal(out[:, :1], table[:, :1])
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(table[:, :-1], (8, 8), num_prefix=1)
