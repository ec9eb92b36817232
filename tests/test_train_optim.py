"""The optimizer: spec 6.1's per-epoch schedule and AdamW's weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clca_jax.training import optim
from clca_jax.training.config import default_config


def test_schedule_reproduces_the_reference_per_epoch_values():
    config = default_config()
    steps_per_epoch = 3
    schedule = optim.learning_rate_schedule(config.optim, 50, steps_per_epoch)

    def at_epoch(epoch):
        values = {float(schedule(epoch * steps_per_epoch + k)) for k in range(steps_per_epoch)}
        assert len(values) == 1  # constant within the epoch
        return values.pop()

    assert at_epoch(0) == pytest.approx(1e-6)
    assert at_epoch(1) == pytest.approx(5.05e-5)
    for epoch in (2, 10, 30, 44):
        cosine = 1e-5 + 0.5 * 9e-5 * (1 + np.cos(np.pi * epoch / 45))
        assert at_epoch(epoch) == pytest.approx(cosine, rel=1e-6)
    for epoch in range(45, 50):
        assert at_epoch(epoch) == pytest.approx(1e-5)


def test_decay_mask_spares_one_dimensional_leaves_biases_and_embeddings():
    params = {
        "cls_token": jnp.zeros((1, 1, 8)),
        "clr": jnp.zeros((1, 1, 8)),
        "pos_embed": jnp.zeros((1, 5, 8)),
        "patch_embed": {"proj": {"kernel": jnp.zeros((4, 4, 3, 8)), "bias": jnp.zeros(8)}},
        "blocks_0": {"norm1": {"scale": jnp.zeros(8), "bias": jnp.zeros(8)}},
        "sit": {"scale": jnp.zeros((1, 1, 1))},
        "head": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)},
    }
    mask = optim.weight_decay_mask(params)
    decayed = {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, value in jax.tree_util.tree_leaves_with_path(mask)
        if value
    }
    assert decayed == {"patch_embed/proj/kernel", "sit/scale", "head/kernel"}
    # The reference's plain ViT decays CLR (its exclusion list misspells the name).
    plain = optim.weight_decay_mask(params, decay_clr=True)
    assert plain["clr"] and not plain["cls_token"] and not plain["pos_embed"]


def test_adamw_decays_only_masked_leaves_by_lr_times_decay():
    config = default_config()
    config.optim.weight_decay = 0.5
    tx = optim.adamw(config.optim, lambda step: 0.1)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)


def test_gradient_clipping_is_off_by_default_and_runs_first_when_set():
    config = default_config()
    params = {"w": jnp.ones((3, 3))}
    plain = optim.adamw(config.optim, lambda s: 1e-3).init(params)
    config.optim.grad_clip_norm = 1.0
    clipped = optim.adamw(config.optim, lambda s: 1e-3).init(params)
    assert len(clipped) == 2
    assert jax.tree.structure(clipped[1]) == jax.tree.structure(plain)
