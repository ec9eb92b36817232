"""Training-recipe regularisation: label smoothing, stochastic depth, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from clca_jax.models import create_model, default_model_config
from clca_jax.models.registry import get_backbone
from clca_jax.models.vit import Block
from clca_jax.training import losses

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 5)).astype(np.float32) * 3
LABELS = RNG.integers(0, 5, size=6).astype(np.int32)
SOFT = RNG.dirichlet(np.ones(5), size=6).astype(np.float32)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch_with_label_smoothing(eps):
    ours = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), eps)
    theirs = torch.nn.functional.cross_entropy(
        torch.from_numpy(LOGITS), torch.from_numpy(LABELS).long(), label_smoothing=eps,
        reduction="none",
    )  # fmt: skip
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
    soft = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(SOFT), eps)
    theirs_soft = torch.nn.functional.cross_entropy(
        torch.from_numpy(LOGITS), torch.from_numpy(SOFT), label_smoothing=eps, reduction="none"
    )
    np.testing.assert_allclose(soft, theirs_soft.numpy(), rtol=1e-6, atol=1e-6)


def test_label_smoothing_changes_the_loss_by_the_closed_form():
    eps = 0.2
    log_probs = LOGITS - np.log(np.exp(LOGITS).sum(-1, keepdims=True))
    plain = -log_probs[np.arange(6), LABELS]
    expected = (1 - eps) * plain + eps * -log_probs.mean(-1)
    smoothed = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), eps)
    np.testing.assert_allclose(smoothed, expected, rtol=1e-5)
    assert np.all(np.abs(np.asarray(smoothed) - plain) > 1e-4)


def test_soft_label_of_the_batch_is_the_target_when_present():
    batch = {"label": jnp.asarray(LABELS)}
    assert losses.targets_of(batch) is batch["label"]
    batch["soft_label"] = jnp.asarray(SOFT)
    assert losses.targets_of(batch) is batch["soft_label"]


def tiny_model(**model_fields):
    config = default_model_config()
    config.backbone = "vit_tiny_patch16_224"
    config.update(img_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    config.update(model_fields)
    return create_model(config)


def test_drop_path_rates_rise_over_depth_like_timm():
    model = tiny_model(drop_path_rate=0.3)
    expected = [float(x) for x in torch.linspace(0, 0.3, 4)]
    np.testing.assert_allclose(model.drop_path_rates(), expected, rtol=1e-6)
    assert model.drop_path_rates()[0] == 0.0


def test_dropout_and_drop_path_are_the_identity_at_evaluation():
    plain = tiny_model()
    regularised = tiny_model(drop_path_rate=0.5, dropout_rate=0.5)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = plain.init(jax.random.key(0), images)
    expected, _ = plain.apply(variables, images)
    logits, _ = regularised.apply(variables, images, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(logits, expected)
    # In training they act: the logits differ from the plain model's.
    trained, _ = regularised.apply(
        variables, images, train=True, rngs={"dropout": jax.random.key(3)}
    )
    assert not np.allclose(trained, plain.apply(variables, images, train=True)[0], atol=1e-3)


def test_drop_path_keeps_or_drops_whole_samples_and_scales_kept_ones():
    rate = 0.5
    block = Block(get_backbone("vit_tiny_patch16_224"), drop_path=rate)
    x = jax.random.normal(jax.random.key(0), (64, 5, 192))
    variables = block.init(jax.random.key(1), x, method=Block.feed_forward)
    branch = block.apply(variables, x, method=Block.feed_forward) - x
    out = block.apply(
        variables, x, True, method=Block.feed_forward, rngs={"dropout": jax.random.key(2)}
    )
    delta = np.asarray(out - x)
    dropped = np.all(delta == 0, axis=(1, 2))
    kept = ~dropped
    assert 10 < dropped.sum() < 54, dropped.sum()  # about half of 64, per sample
    np.testing.assert_allclose(
        delta[kept], np.asarray(branch)[kept] / (1 - rate), rtol=1e-5, atol=1e-5
    )


def test_model_rates_are_validated():
    with pytest.raises(ValueError, match=r"model.drop_path_rate must be a number in \[0, 1\)"):
        tiny_model(drop_path_rate=1.0)
    with pytest.raises(ValueError, match=r"model.dropout_rate must be a number in \[0, 1\), got"):
        tiny_model(dropout_rate=-0.1)
