"""Mixup and CutMix of the global batch (training.mixup) against timm's `Mixup` rules.

The CutMix box and its lambda correction are compared with timm's own `cutmix_bbox_and_lam`
given the same centre; the blends with NumPy formulas; whole-batch mixing with the properties
timm's batch mode has (one lambda, the flipped batch as partner, `prob`, `switch_prob`); and the
train step with mixing on with the soft-target cross-entropy computed by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from timm.data import mixup as timm_mixup

from clca_jax import train
from clca_jax.data import augment
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import mixup
from clca_jax.training.config import default_config, validate_config

B, H, W, C, CLASSES = 6, 12, 10, 3, 5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((B, H, W, C)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 2], np.int32)  # example i and B-1-i differ
    return images, labels


def test_default_config_is_off():
    assert mixup.from_config(mixup.default_mixup_config()) is None
    assert mixup.from_config(default_config().train.mixup) is None


@pytest.mark.parametrize("field", ["prob", "alpha"])
def test_no_mixing_is_bit_identical(field):
    images, labels = _batch()
    settings = (
        mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0)
        if field == "prob"
        else mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    )
    step = jax.jit(lambda key: mixup.mix_batch(images, labels, CLASSES, key, settings))
    for seed in range(10):
        out, targets = step(jax.random.key(seed))
        if field == "prob":
            np.testing.assert_array_equal(out, images)
            np.testing.assert_array_equal(targets, np.eye(CLASSES, dtype=np.float32)[labels])
        else:  # cutmix only: every step is a CutMix, never a blend
            changed = np.any(np.asarray(out) != images, axis=-1)
            assert np.all(changed[0] == changed[1])  # one box for the batch


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_fixed_lambda_blend_and_targets_are_exact(lam):
    images, labels = _batch()
    lam32 = np.float32(lam)
    out = np.asarray(mixup.mixup_images(jnp.asarray(images), lam32))
    np.testing.assert_array_equal(out, images * lam32 + images[::-1] * (np.float32(1) - lam32))
    targets = np.asarray(mixup.mix_targets(jnp.asarray(labels), CLASSES, lam32))
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    np.testing.assert_array_equal(targets, one_hot * lam32 + one_hot[::-1] * (1 - lam32))
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=0, atol=1e-7)


def _timm_box(lam, cy, cx, height, width, monkeypatch):
    draws = iter([cy, cx])
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: next(draws))
    return timm_mixup.cutmix_bbox_and_lam((B, C, height, width), float(lam), correct_lam=True)


@pytest.mark.parametrize("size", [(12, 10), (32, 32), (17, 29)])
def test_cutmix_box_and_lambda_equal_timm(size, monkeypatch):
    height, width = size
    rng = np.random.default_rng(0)
    box_fn = jax.jit(lambda lam, cy, cx: mixup.cutmix_box(lam, cy, cx, height, width))
    lams = np.concatenate([[0.0, 1.0, 0.75, 0.5], rng.beta(1.0, 1.0, 200)]).astype(np.float32)
    for lam in lams:
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        (yl, yh, xl, xh), expected_lam = _timm_box(lam, cy, cx, height, width, monkeypatch)
        box, got_lam = box_fn(lam, cy, cx)
        assert tuple(int(v) for v in box) == (yl, yh, xl, xh), (lam, cy, cx)
        np.testing.assert_allclose(float(got_lam), expected_lam, rtol=0, atol=1e-7)


def test_cutmix_pastes_the_flipped_batch_inside_the_box_only():
    images, _ = _batch()
    out = np.asarray(mixup.cutmix_images(jnp.asarray(images), (2, 7, 3, 9)))
    expected = images.copy()
    expected[:, 2:7, 3:9] = images[::-1, 2:7, 3:9]
    np.testing.assert_array_equal(out, expected)


def _recovered_lambda(targets, labels):
    return float(targets[0, labels[0]])  # labels[0] != labels[-1]


def test_whole_batch_mixing_follows_timm_batch_mode():
    images, labels = _batch()
    settings = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3)
    step = jax.jit(lambda key: mixup.mix_batch(images, labels, CLASSES, key, settings))
    counts = {"none": 0, "cutmix": 0, "mixup": 0}
    for seed in range(400):
        out, targets = (np.asarray(a) for a in step(jax.random.key(seed)))
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=0, atol=1e-6)
        lam = _recovered_lambda(targets, labels)
        one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
        np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], atol=1e-6)
        if np.array_equal(out, images) and lam == 1.0:
            counts["none"] += 1
            continue
        changed = np.any(out != images, axis=-1)  # [B, H, W]
        box = changed[0]
        rows, cols = np.nonzero(box)
        is_box = rows.size == 0 or rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        if is_box and np.array_equal(out[:, box], images[::-1][:, box]):
            counts["cutmix"] += 1
            np.testing.assert_allclose(lam, 1 - box.sum() / (H * W), atol=1e-6)
            np.testing.assert_array_equal(out[:, ~box], images[:, ~box])
        else:
            counts["mixup"] += 1
            np.testing.assert_allclose(
                out, lam * images + (1 - lam) * images[::-1], rtol=1e-6, atol=1e-6
            )
    # Binomial counts, seeded: within about 4 standard deviations of prob and switch_prob.
    assert abs(counts["none"] - 400 * 0.4) < 4 * np.sqrt(400 * 0.4 * 0.6), counts
    mixed = counts["cutmix"] + counts["mixup"]
    assert abs(counts["cutmix"] - mixed * 0.3) < 4 * np.sqrt(mixed * 0.3 * 0.7), counts


def test_lambda_follows_beta_alpha():
    images, labels = _batch()
    settings = mixup.Mixup(mixup_alpha=0.4, cutmix_alpha=0.0)
    step = jax.jit(lambda key: mixup.mix_batch(images, labels, CLASSES, key, settings)[1])
    lams = np.array(
        [_recovered_lambda(np.asarray(step(jax.random.key(s))), labels) for s in range(600)]
    )
    # Beta(0.4, 0.4): mean 1/2, variance 1/(4 (2 alpha + 1)) = 0.1389.
    assert abs(lams.mean() - 0.5) < 0.05 and abs(lams.var() - 0.1389) < 0.02, (
        lams.mean(),
        lams.var(),
    )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("mixup_alpha", -0.1, r"train.mixup.mixup_alpha must be a finite number >= 0 \(0 = off\)"),
        ("cutmix_alpha", float("inf"), "train.mixup.cutmix_alpha must be a finite number"),
        ("prob", 1.5, r"train.mixup.prob must be a probability in \[0, 1\], got 1.5"),
        ("switch_prob", -0.5, r"train.mixup.switch_prob must be a probability in \[0, 1\]"),
    ],
)
def test_bad_mixup_fields_are_named(field, value, message):
    config = default_config()
    config.data.dir = "/nonexistent"
    config.init.checkpoint = ""
    config.train.mixup[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_train_step_learns_from_the_mixed_batch_and_soft_targets():
    """The step's loss is the soft-target cross-entropy of the model on the mixed images, with
    the draws of `fold_in(step key, MIX_STREAM)`."""
    from tests.test_train_loop import tiny_config

    config = tiny_config("/unused")
    model = validate_config(config).clone(num_classes=CLASSES)
    tx, schedule = train.optimizer_and_schedule(config, model, steps_per_epoch=3)
    variables = model.init(
        {"params": jax.random.key(0), "reduction": jax.random.key(1)}, model.example_images()
    )
    state = train._new_state(variables, tx, seed=1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 8).astype(np.int32)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    settings = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
    _, metrics = jax.jit(
        lambda s, b: train.train_step(s, b, model=model, tx=tx, schedule=schedule, mixup=settings)
    )(state, batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mixed, soft = mixup.mix_batch(
        batch["image"], batch["label"], CLASSES, jax.random.fold_in(key, train.MIX_STREAM), settings
    )
    forward = jax.jit(lambda x: model.apply(variables, x, train=True, rngs={"reduction": key})[0])
    logits = forward(mixed)
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    expected = float(-(np.asarray(soft) * log_probs).sum(-1).mean())
    plain_logits = forward(batch["image"])
    plain_log_probs = np.asarray(jax.nn.log_softmax(plain_logits.astype(jnp.float32)))
    plain = float(-plain_log_probs[np.arange(8), labels].mean())
    got = metrics_lib.to_floats(metrics)["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert abs(plain - got) > 1e-4  # mixing changed the loss


def test_deit_variant_turns_the_augmentation_on_and_validates():
    from clca_jax import config_files

    config = config_files.load("soyglobal:deit")
    assert config.data.augment.rand_augment_ops == 2
    assert config.data.augment.rand_augment_magnitude == 9
    assert config.data.augment.random_erasing_prob == 0.25
    assert mixup.from_config(config.train.mixup) == mixup.Mixup(0.8, 1.0, 1.0, 0.5)
    assert config.train.label_smoothing == 0.1 and config.model.drop_path_rate == 0.1
    paper = config_files.load("soyglobal")
    assert paper.train.label_smoothing == 0.0 and paper.model.drop_path_rate == 0.0
    assert augment.from_config(paper.data.augment) is None
    assert mixup.from_config(paper.train.mixup) is None
    tiny = config_files.load("soyglobal:deit,tiny")
    tiny.data.dir = "/data"
    assert tiny.model.img_size == 64 and tiny.train.mixup.cutmix_alpha == 1.0
    validate_config(tiny)
    with pytest.raises(ValueError, match="unknown config variant 'big'"):
        config_files.load("soyglobal:deit,big")
