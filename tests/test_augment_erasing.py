"""Random erasing against timm's `RandomErasing` (mode `pixel`), draw for draw.

timm draws from Python's `random` and fills from torch; here both are replaced by our example
generator (`random.random/uniform/randint` -> `rng.random/uniform/integers`, the fill ->
`rng.standard_normal` in HWC order), so the two must give the same image bit for bit.
"""

import numpy as np
import pytest
import torch
from timm.data import random_erasing as timm_erasing

import clca_jax.data as data
from clca_jax.data import augment, pipeline, records


class _Replay:
    """timm's `random` calls answered by a NumPy generator in our order."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def random(self):
        return self.rng.random()

    def uniform(self, low, high):
        return self.rng.uniform(low, high)

    def randint(self, low, high):  # inclusive, as Python's
        return int(self.rng.integers(low, high + 1))


def _timm_erase(image_hwc, seed, monkeypatch, **kwargs):
    replay = _Replay(np.random.default_rng(seed))
    monkeypatch.setattr(timm_erasing, "random", replay)

    def fill(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        assert per_pixel and not rand_color
        channels, h, w = patch_size
        noise = replay.rng.standard_normal((h, w, channels), dtype=np.float32)
        return torch.from_numpy(noise.transpose(2, 0, 1).copy())

    monkeypatch.setattr(timm_erasing, "_get_pixels", fill)
    eraser = timm_erasing.RandomErasing(mode="pixel", device="cpu", **kwargs)
    out = eraser(torch.from_numpy(image_hwc.transpose(2, 0, 1).copy()))
    return out.numpy().transpose(1, 2, 0)


CASES = [
    dict(prob=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), count=1),
    dict(prob=1.0, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), count=3),
    dict(prob=0.7, area=(0.3, 0.9), aspect=(0.5, 4.0), count=1),  # many failed attempts
    dict(prob=1.0, area=(0.1, 0.4), aspect=(0.2, 0.6), count=2),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(32, 32, 3), (17, 29, 3)])
def test_random_erasing_equals_timm_given_the_same_draws(case, shape, monkeypatch):
    aug = augment.Augmentation(
        random_erasing_prob=case["prob"],
        random_erasing_area=case["area"],
        random_erasing_aspect=case["aspect"],
        random_erasing_count=case["count"],
    )
    base = np.random.default_rng(99).standard_normal(shape).astype(np.float32)
    erased = 0
    for seed in range(60):
        ours = augment.random_erase(base.copy(), np.random.default_rng(seed), aug)
        expected = _timm_erase(
            base.copy(),
            seed,
            monkeypatch,
            probability=case["prob"],
            min_area=case["area"][0],
            max_area=case["area"][1],
            min_aspect=case["aspect"][0],
            max_aspect=case["aspect"][1],
            max_count=case["count"],
        )
        np.testing.assert_array_equal(ours, expected, str(seed))
        erased += not np.array_equal(ours, base)
    assert 0 < erased <= 60  # some images were erased, so the comparison saw boxes
    if case["prob"] < 1:
        assert erased < 60


def test_erasing_runs_after_normalisation():
    """The box holds the standard normal draws themselves, not normalised noise."""
    image = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    record = records.ImageRecord(image, 0, "x")
    norm = pipeline.Normalizer(data.IMAGENET_MEAN, data.IMAGENET_STD)
    aug = augment.Augmentation(random_erasing_prob=1.0)
    for seed in range(5):
        got = pipeline.preprocess_train(record, 12, np.random.default_rng(seed), norm, aug)
        rng = np.random.default_rng(seed)
        pixels = pipeline.resize_square(records.decode_rgb(record), 13)
        expected = augment.random_erase(norm(pipeline.random_crop_flip(pixels, 12, rng)), rng, aug)
        np.testing.assert_array_equal(got, expected)
        plain = norm(pipeline.random_crop_flip(pixels, 12, np.random.default_rng(seed)))
        assert not np.array_equal(got, plain)


def test_erased_area_and_aspect_stay_in_range():
    aug = augment.Augmentation(random_erasing_prob=1.0)
    areas, aspects = [], []
    for seed in range(300):
        out = augment.random_erase(
            np.zeros((64, 64, 3), np.float32), np.random.default_rng(seed), aug
        )
        rows, cols = np.nonzero(out[..., 0])
        if rows.size:
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert h * w == rows.size  # one solid box
            areas.append(h * w / 64**2)
            aspects.append(h / w)
    assert len(areas) > 250
    # Rounding the sides moves the area and aspect a little past the sampled ranges.
    assert 0.015 <= min(areas) and max(areas) <= 1 / 3 + 0.03
    assert 0.25 <= min(aspects) and max(aspects) <= 1 / 0.3 * 1.15
