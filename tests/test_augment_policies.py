"""RandAugment and TrivialAugmentWide against torchvision, and their place in the pipeline.

torchvision is the reference: every operation at every magnitude of both tables (and both
signs) gives the same pixels as `torchvision.transforms.autoaugment._apply_op` on the same PIL
image; the tables equal torchvision's float32 tensors; and the whole policies equal
torchvision's `RandAugment` / `TrivialAugmentWide` when torch's `randint` replays our draws.
All comparisons are exact (uint8 images, identical floats).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, autoaugment

import clca_jax.data as data
from clca_jax.data import augment, pipeline, records
from clca_jax.data.splits import DataError


def _image(height=37, width=53, seed=0) -> Image.Image:
    """A gradient plus noise in 30..219: not full range, so AutoContrast and Equalize act."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 40, height)[:, None, None]
    noise = rng.integers(0, 60, (height, width, 3))
    return Image.fromarray((30 + ramp + noise).astype(np.uint8))


def _tables(height, width, bins):
    return {
        "rand": (
            augment.rand_augment_space(bins, height, width),
            autoaugment.RandAugment()._augmentation_space(bins, (height, width)),
        ),
        "trivial": (
            augment.trivial_augment_space(bins),
            autoaugment.TrivialAugmentWide()._augmentation_space(bins),
        ),
    }


@pytest.mark.parametrize("bins", [2, 10, 31])
@pytest.mark.parametrize("size", [(37, 53), (224, 224), (448, 448)])
def test_magnitude_tables_equal_torchvision(bins, size):
    for ours, reference in _tables(*size, bins).values():
        assert [name for name, _, _ in ours] == list(reference)
        for name, magnitudes, signed in ours:
            expected, expected_signed = reference[name]
            assert signed == expected_signed, name
            if magnitudes is None:
                assert expected.ndim == 0, name
            else:
                np.testing.assert_array_equal(magnitudes, expected.numpy(), err_msg=name)


@pytest.mark.parametrize("table", ["rand", "trivial"])
@pytest.mark.parametrize("op", list(augment.OPERATIONS))
def test_every_operation_equals_torchvision_at_every_magnitude(op, table):
    image = _image()
    space = dict((name, (m, s)) for name, m, s in _tables(image.height, image.width, 31)[table][0])
    magnitudes, signed = space[op]
    values = [0.0] if magnitudes is None else [float(v) for v in magnitudes]
    values += [-v for v in values] if signed else []
    changed = False
    for value in values:
        ours = np.asarray(augment.OPERATIONS[op](image, value))
        expected = autoaugment._apply_op(image, op, value, InterpolationMode.NEAREST, None)
        np.testing.assert_array_equal(ours, np.asarray(expected), err_msg=f"{op} {value}")
        changed |= not np.array_equal(ours, np.asarray(image))
    assert changed == (op != "Identity"), op  # the comparison saw the operation act


def _replaying_randint(rng: np.random.Generator):
    """torch.randint(high, size) answering with `rng.integers(high)`, as our code draws."""

    def randint(high, size, dtype=None):
        return torch.tensor([int(rng.integers(high))], dtype=torch.long)

    return randint


@pytest.mark.parametrize("num_ops,magnitude", [(1, 0), (2, 9), (3, 30), (4, 15)])
def test_rand_augment_equals_torchvision_given_the_same_draws(monkeypatch, num_ops, magnitude):
    policy = autoaugment.RandAugment(num_ops=num_ops, magnitude=magnitude)
    for seed in range(40):
        image = _image(seed=seed)
        ours = augment.rand_augment(image, np.random.default_rng(seed), num_ops, magnitude, 31)
        monkeypatch.setattr(torch, "randint", _replaying_randint(np.random.default_rng(seed)))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(policy(image)), str(seed))


def test_trivial_augment_equals_torchvision_given_the_same_draws(monkeypatch):
    policy = autoaugment.TrivialAugmentWide()
    for seed in range(80):
        image = _image(seed=seed)
        ours = augment.trivial_augment(image, np.random.default_rng(seed), 31)
        monkeypatch.setattr(torch, "randint", _replaying_randint(np.random.default_rng(seed)))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(policy(image)), str(seed))


def test_draws_follow_torchvision_rules():
    """RandAugment: per op an index in 0..13, then a sign only for signed ops; TrivialAugment:
    an index, a bin in 0..bins-1 only for ops with magnitudes, then a sign only if signed."""
    image = _image()
    signed = {name for name, _, s in augment.trivial_augment_space(31) if s}
    has_bins = {name for name, m, _ in augment.trivial_augment_space(31) if m is not None}
    names = list(augment.OPERATIONS)
    seen = set()
    for seed in range(200):
        rng, replay = np.random.default_rng(seed), np.random.default_rng(seed)
        augment.trivial_augment(image, rng, 31)
        op = names[replay.integers(14)]
        seen.add(op)
        if op in has_bins:
            replay.integers(31)
        if op in signed:
            replay.integers(2)
        assert rng.random() == replay.random(), (seed, op)  # both consumed the same draws
    assert seen == set(names)
    for seed in range(50):
        rng, replay = np.random.default_rng(seed), np.random.default_rng(seed)
        augment.rand_augment(image, rng, 2, 9, 31)
        for _ in range(2):
            if names[replay.integers(14)] in signed:
                replay.integers(2)
        assert rng.random() == replay.random(), seed


# ----------------------------------------------------------------------------------------------
# In the pipeline.


def _record(seed=0):
    return records.ImageRecord(np.asarray(_image(30, 20, seed)), 0, "x")


NORM = pipeline.Normalizer(data.IMAGENET_MEAN, data.IMAGENET_STD)


def test_default_config_is_off_and_the_view_is_unchanged():
    assert augment.from_config(augment.default_augment_config()) is None
    for seed in range(4):
        rng_off, rng_old = np.random.default_rng(seed), np.random.default_rng(seed)
        off = pipeline.preprocess_train(_record(), 12, rng_off, NORM, None)
        pixels = pipeline.resize_square(records.decode_rgb(_record()), 13)
        old = NORM(pipeline.random_crop_flip(pixels, 12, rng_old))
        np.testing.assert_array_equal(off, old)
        assert rng_off.random() == rng_old.random()  # no extra draws


@pytest.mark.parametrize("trivial", [False, True])
def test_policy_runs_after_crop_and_flip_and_before_normalisation(trivial):
    aug = augment.Augmentation(rand_augment_ops=0 if trivial else 2, trivial_augment=trivial)
    for seed in range(6):
        got = pipeline.preprocess_train(_record(), 12, np.random.default_rng(seed), NORM, aug)
        rng = np.random.default_rng(seed)
        pixels = pipeline.resize_square(records.decode_rgb(_record()), 13)
        crop = Image.fromarray(np.ascontiguousarray(pipeline.random_crop_flip(pixels, 12, rng)))
        if trivial:
            expected = augment.trivial_augment(crop, rng, 31)
        else:
            expected = augment.rand_augment(crop, rng, 2, 9, 31)
        np.testing.assert_array_equal(got, NORM(np.asarray(expected)))


def _loader(augment_fields, process_index=0, process_count=1, batch=4):
    source = records.ArraySource(
        np.stack([np.asarray(_image(7, 11, s)) for s in range(12)]), np.arange(12), "fake"
    )
    section = augment.default_augment_config()
    section.update(augment_fields)
    return pipeline.TrainLoader(
        source,
        img_size=8,
        global_batch_size=batch,
        seed=3,
        process_index=process_index,
        process_count=process_count,
        num_threads=2,
        augmentation=augment.from_config(section),
    )


ON = {"rand_augment_ops": 2, "random_erasing_prob": 0.5}


def test_augmented_batches_are_the_same_for_any_process_count_and_after_resume():
    loader = _loader(ON)
    batches = [next(loader) for _ in range(5)]
    assert not np.array_equal(batches[0]["image"], next(_loader({}))["image"])  # it acts
    halves = [_loader(ON, p, 2) for p in range(2)]
    for step in range(5):
        joined = np.concatenate([next(h)["image"] for h in halves])
        np.testing.assert_array_equal(joined, batches[step]["image"], str(step))
    np.testing.assert_array_equal(next(_loader(ON))["image"], batches[0]["image"])
    resumed = _loader(ON)
    resumed.set_state({**loader.get_state(), "step": 3})
    for step in (3, 4):
        np.testing.assert_array_equal(next(resumed)["image"], batches[step]["image"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rand_augment_ops", -1, "data.augment.rand_augment_ops must be an integer >= 0, got -1"),
        ("rand_augment_magnitude", 31, r"rand_augment_magnitude must be an integer bin in 0..30"),
        ("num_magnitude_bins", 1, "num_magnitude_bins must be an integer >= 2, got 1"),
        ("trivial_augment", None, "trivial_augment must be True or False, got None"),
        ("random_erasing_prob", 1.5, r"random_erasing_prob must be in \[0, 1\], got 1.5"),
        ("random_erasing_area", (0.5, 0.2), r"random_erasing_area must be \(min, max\)"),
        ("random_erasing_area", (0.1, 2.0), r"0 < min <= max <= 1, got \(0.1, 2.0\)"),
        ("random_erasing_aspect", (0.0, 1.0), r"random_erasing_aspect must be \(min, max\)"),
        ("random_erasing_count", 0, "random_erasing_count must be an integer >= 1, got 0"),
    ],
)
def test_bad_augment_fields_are_named(field, value, message):
    config = data.default_data_config("demo")
    config.augment[field] = value
    with pytest.raises(DataError, match=message):
        data.validate_data_config(config)


def test_two_policies_at_once_are_refused():
    config = data.default_data_config("demo")
    config.augment.update(rand_augment_ops=2, trivial_augment=True)
    with pytest.raises(DataError, match="both choose a policy"):
        data.validate_data_config(config)
