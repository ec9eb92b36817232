"""Input pipeline: preprocessing of spec 6.2, determinism, sharding, evaluation, resume."""

import json

import numpy as np
import pytest
from PIL import Image

import clca_jax.data as data
from clca_jax.data import pipeline, records
from clca_jax.data.splits import DataError

SIZE = 8  # output side; the resize side is int(8 / 0.875) = 9


def _source(num_examples):
    """Distinct random images whose label is their index, so a batch says what it holds."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples, 7, 11, 3), dtype=np.uint8)
    return records.ArraySource(images, np.arange(num_examples), "fake")


def _train(num_examples=20, batch=4, seed=0, process_index=0, process_count=1):
    return pipeline.TrainLoader(
        _source(num_examples),
        img_size=SIZE,
        global_batch_size=batch,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=2,
    )


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def test_sizes_and_centre_offsets_follow_the_reference():
    assert (pipeline.resize_size(448), pipeline.resize_size(224)) == (512, 256)
    assert pipeline.center_offset(512, 448) == 32
    # torchvision rounds half to even through Python's round().
    assert (pipeline.center_offset(9, 8), pipeline.center_offset(11, 8)) == (0, 2)


def _reference_normalise(pixels):
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    return ((pixels / 255.0 - mean) / std).astype(np.float32)


def test_eval_view_is_bicubic_resize_then_centre_crop():
    image = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    record = records.ImageRecord(image, 0, "x")
    got = pipeline.preprocess_eval(
        record, 12, pipeline.Normalizer(data.IMAGENET_MEAN, data.IMAGENET_STD)
    )
    resized = np.asarray(Image.fromarray(image).resize((13, 13), Image.BICUBIC)).astype(np.float64)
    expected = _reference_normalise(resized[0:12, 0:12])  # round(0.5) = 0
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_train_view_is_resize_random_crop_and_flip(seed):
    image = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    record = records.ImageRecord(image, 0, "x")
    norm = pipeline.Normalizer(data.IMAGENET_MEAN, data.IMAGENET_STD)
    got = pipeline.preprocess_train(record, 12, np.random.default_rng(seed), norm)
    rng = np.random.default_rng(seed)
    top, left, flip = rng.integers(0, 2), rng.integers(0, 2), rng.random() < 0.5
    resized = np.asarray(Image.fromarray(image).resize((13, 13), Image.BICUBIC)).astype(np.float64)
    crop = resized[top : top + 12, left : left + 12]
    np.testing.assert_allclose(
        got, _reference_normalise(crop[:, ::-1] if flip else crop), atol=1e-5
    )


def test_both_flip_outcomes_occur():
    outcomes = {np.random.default_rng(s).random() < 0.5 for s in range(6)}
    assert outcomes == {True, False}


def test_batches_have_the_promised_shapes_and_types():
    batch = next(_train(batch=4, process_count=2))
    assert batch["image"].shape == (2, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches():
    first, second = _take(_train(seed=3), 3), _take(_train(seed=3), 3)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = _take(_train(seed=4), 3)
    assert any(
        not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other, strict=True)
    )


def test_process_shares_are_disjoint_and_make_up_the_global_batch():
    single = _take(_train(num_examples=22, batch=4), 5)
    shares = [
        _take(_train(num_examples=22, batch=4, process_index=p, process_count=2), 5)
        for p in range(2)
    ]
    seen = []
    for step in range(5):
        parts = [shares[p][step] for p in range(2)]
        assert not set(parts[0]["label"]) & set(parts[1]["label"])
        joined = np.concatenate([part["label"] for part in parts])
        np.testing.assert_array_equal(joined, single[step]["label"])
        # Augmentation depends on (seed, epoch, example) only, not on the process count.
        np.testing.assert_array_equal(
            np.concatenate([part["image"] for part in parts]), single[step]["image"]
        )
        seen.extend(joined.tolist())
    # One epoch: 5 full batches of 4 out of 22 examples, none twice (the remainder is dropped).
    assert len(seen) == len(set(seen)) == 20


def test_every_epoch_is_a_new_permutation_of_the_split():
    loader = _train(num_examples=20, batch=4)
    assert loader.steps_per_epoch == 5
    epochs = [np.concatenate([b["label"] for b in _take(loader, 5)]) for _ in range(2)]
    for labels in epochs:
        assert sorted(labels.tolist()) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1])
    assert loader.epoch == 2


def test_restored_state_continues_with_the_exact_next_batch():
    uninterrupted = _take(_train(), 8)
    interrupted = _train()
    _take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = _train()
    resumed.set_state(state)
    # Steps 3..7 cross the epoch boundary at step 5.
    for expected, got in zip(uninterrupted[3:], _take(resumed, 5), strict=True):
        np.testing.assert_array_equal(expected["label"], got["label"])
        np.testing.assert_array_equal(expected["image"], got["image"])


def test_state_restores_onto_a_different_process_count():
    single = _train()
    _take(single, 4)
    state = single.get_state()
    expected = next(single)["label"]
    halves = []
    for p in range(2):
        loader = _train(process_index=p, process_count=2)
        loader.set_state(state)
        halves.append(next(loader)["label"])
    np.testing.assert_array_equal(np.concatenate(halves), expected)


def test_state_from_other_settings_is_refused():
    state = _train(seed=1).get_state()
    with pytest.raises(DataError, match=r"other settings.*'seed': \(1, 0\)"):
        _train(seed=0).set_state(state)


@pytest.mark.parametrize("process_count, batch", [(1, 4), (2, 4), (3, 6)])
def test_evaluation_sees_every_example_exactly_once(process_count, batch):
    source = _source(10)
    seen, batches = [], []
    for p in range(process_count):
        loader = pipeline.EvalLoader(
            source,
            img_size=SIZE,
            global_batch_size=batch,
            process_index=p,
            process_count=process_count,
            num_threads=2,
        )
        got = list(loader)
        batches.append(len(got))
        for b in got:
            assert b["mask"].dtype == np.bool_ and b["image"].shape[0] == batch // process_count
            seen.extend(b["label"][b["mask"]].tolist())
            assert not b["image"][~b["mask"]].any()
    assert sorted(seen) == list(range(10))
    assert len(set(batches)) == 1 and batches[0] == len(loader) == -(-10 // batch)


def test_eval_images_are_deterministic_centre_crops():
    source = _source(3)
    loader = pipeline.EvalLoader(source, img_size=SIZE, global_batch_size=3, num_threads=2)
    norm = pipeline.Normalizer(data.IMAGENET_MEAN, data.IMAGENET_STD)
    batch = next(iter(loader))
    for i in range(3):
        np.testing.assert_array_equal(
            batch["image"][i], pipeline.preprocess_eval(source[i], SIZE, norm)
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch": 5, "process_count": 2}, "multiple of the process count 2"),
        ({"batch": 40}, "larger than the training split"),
        ({"process_index": 2, "process_count": 2}, "process_index=2"),
    ],
)
def test_bad_batch_settings_are_explained(kwargs, message):
    with pytest.raises(DataError, match=message):
        _train(**kwargs)


def test_normalisation_constants_by_name():
    assert data.normalization("imagenet") == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert data.normalization("clip")[0] == (0.48145466, 0.4578275, 0.40821073)
    assert data.normalization("inception") == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="unknown normalisation 'siglip'"):
        data.normalization("siglip")


def test_custom_mean_std_reach_the_batch():
    source = records.ArraySource(np.full((4, 9, 9, 3), 255, np.uint8), np.arange(4), "white")
    loader = pipeline.EvalLoader(
        source, img_size=SIZE, global_batch_size=4, mean=(0.5,) * 3, std=(0.5,) * 3, num_threads=1
    )
    np.testing.assert_allclose(next(iter(loader))["image"], 1.0, atol=1e-6)
