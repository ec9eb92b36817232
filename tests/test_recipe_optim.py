"""Training-recipe optimizer fields: optimizer by name, schedule unit, short runs, layer-wise
rates, backbone freezing, and the weight average."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.utils.model_ema import ModelEmaV3

from clca_jax.configs import demo
from clca_jax.training import ema, optim
from clca_jax.training.config import default_config, validate_config

DEPTH = 3


def params_tree():
    rng = np.random.default_rng(0)

    def leaf(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    tree = {f"blocks_{i}": {"mlp": {"fc1": {"kernel": leaf(4, 4)}}} for i in range(DEPTH)}
    tree.update(
        patch_embed={"proj": {"kernel": leaf(2, 2, 3, 4)}},
        cls_token=leaf(1, 1, 4),
        pos_embed=leaf(1, 5, 4),
        norm={"scale": leaf(4)},
        head={"kernel": leaf(4, 3)},
        cla_head={"conv": {"kernel": leaf(3, 4, 4)}},
        clr=leaf(1, 1, 4),
    )
    return tree


def grads_like(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves = [
        jax.random.normal(k, leaf.shape)
        for k, leaf in zip(keys, jax.tree.leaves(params), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def run_steps(tx, params, steps=3):
    state = tx.init(params)
    for step in range(steps):
        updates, state = tx.update(grads_like(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params


def optim_config(**fields):
    config = default_config()
    config.optim.update(fields)
    return config.optim


def lr_schedule(step):
    return 0.01


@pytest.mark.parametrize(
    "name, reference",
    [
        ("lamb", lambda o, mask: optax.lamb(0.01, 0.9, 0.999, 1e-8, weight_decay=0.05, mask=mask)),
        ("lion", lambda o, mask: optax.lion(0.01, 0.9, 0.999, weight_decay=0.05, mask=mask)),
        ("adamw", lambda o, mask: optim.adamw(o, lr_schedule)),
    ],
)
def test_each_optimizer_name_is_optax_own(name, reference):
    config = optim_config(name=name)
    params = params_tree()
    ours = run_steps(optim.make_optimizer(config, lr_schedule, DEPTH), params)
    theirs = run_steps(reference(config, optim.weight_decay_mask), params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_sgd_with_momentum_and_weight_decay(nesterov):
    config = optim_config(name="sgd", momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)}
    ours = run_steps(optim.make_optimizer(config, lr_schedule, DEPTH), params)
    weight = torch.nn.Parameter(torch.tensor(np.array(params["w"])))
    sgd = torch.optim.SGD([weight], lr=0.01, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    for step in range(3):
        weight.grad = torch.tensor(np.array(grads_like(params, step)["w"]))
        sgd.step()
    np.testing.assert_allclose(ours["w"], weight.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_layer_decay_and_backbone_scale_give_the_expected_per_block_rates():
    config = optim_config(
        name="sgd", momentum=0.0, weight_decay=0.0, layer_decay=0.5, backbone_lr_scale=0.1
    )
    params = params_tree()
    tx = optim.make_optimizer(config, lambda step: 1.0, DEPTH)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    rate = {k: -float(np.unique(np.asarray(v))[0]) for k, v in _flat(updates).items()}
    for i in range(DEPTH):
        assert rate[f"blocks_{i}/mlp/fc1/kernel"] == pytest.approx(0.1 * 0.5 ** (DEPTH - i))
    for name in ("patch_embed/proj/kernel", "cls_token", "pos_embed"):
        assert rate[name] == pytest.approx(0.1 * 0.5 ** (DEPTH + 1))
    assert rate["norm/scale"] == pytest.approx(0.1)
    for name in ("head/kernel", "cla_head/conv/kernel", "clr"):
        assert rate[name] == 1.0


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


BACKBONE = ("blocks_0", "blocks_2", "patch_embed", "cls_token", "pos_embed", "norm")
TRAINABLE = ("head", "cla_head", "clr")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_frozen_backbone_is_bit_identical_for_n_steps_then_trains(name):
    config = optim_config(name=name, freeze_backbone_steps=2, weight_decay=0.1)
    params = params_tree()
    tx = optim.make_optimizer(config, lr_schedule, DEPTH)
    after_two, after_three = run_steps(tx, params, 2), run_steps(tx, params, 3)
    for key in BACKBONE:
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(after_two[key]), strict=True):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(
            jax.tree.leaves(params[key])[0], jax.tree.leaves(after_three[key])[0]
        )
    for key in TRAINABLE:
        assert not np.array_equal(
            jax.tree.leaves(params[key])[0], jax.tree.leaves(after_two[key])[0]
        )


def test_always_frozen_backbone_never_moves():
    config = optim_config(freeze_backbone_steps=optim.ALWAYS_FROZEN)
    params = params_tree()
    after = run_steps(optim.make_optimizer(config, lr_schedule, DEPTH), params, 4)
    for key in BACKBONE:
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(after[key]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(params["clr"], after["clr"])


def test_step_schedule_follows_the_epoch_curve_at_fractional_epochs():
    config = optim_config(schedule_unit="step")
    schedule = optim.learning_rate_schedule(config, 10, 4)
    for step in (0, 3, 5, 9, 30):
        expected = optim.epoch_learning_rate(config, 10, step / 4)
        assert float(schedule(step)) == pytest.approx(float(expected), rel=1e-6)
    assert float(schedule(5)) != float(schedule(4))  # it moves within an epoch


def test_a_run_shorter_than_warmup_and_cooldown_shortens_them():
    config = demo.get_config()
    config.train.epochs = 1
    validate_config(config)  # no longer refused
    assert optim.fitted_warmup_cooldown(config.optim, 1) == (0, 0)
    note = optim.shortened_schedule_note(config.optim, 1)
    assert "shortened to 0 warm-up and 0 cool-down" in note
    long = optim_config(warmup_epochs=2, cooldown_epochs=5)
    assert optim.fitted_warmup_cooldown(long, 7) == (2, 5)
    assert optim.shortened_schedule_note(long, 50) is None
    assert optim.fitted_warmup_cooldown(long, 4) == (1, 2)  # 2*4//7, 5*4//7
    schedule = optim.learning_rate_schedule(config.optim, 1, 3)
    assert float(schedule(0)) == pytest.approx(config.optim.lr)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optim.name", "adam", r"optim.name must be one of \('adamw', 'sgd', 'lamb', 'lion'\)"),
        ("optim.schedule_unit", "epochs", r"optim.schedule_unit must be one of"),
        ("optim.layer_decay", 0.0, r"optim.layer_decay must be in \(0, 1\]"),
        ("optim.backbone_lr_scale", 0.0, r"optim.backbone_lr_scale must be a finite number > 0"),
        ("optim.freeze_backbone_steps", -2, r"optim.freeze_backbone_steps must be an integer"),
        ("train.label_smoothing", 1.0, r"train.label_smoothing must be a number in \[0, 1\)"),
        ("train.ema_decay", 1.5, r"train.ema_decay must be a number in \[0, 1\)"),
        ("eval.select", "ema", r"eval.select='ema' needs the weight average"),
    ],
)
def test_recipe_fields_are_validated_up_front(field, value, message):
    config = demo.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_ema_with_decay_zero_equals_the_weights_and_one_step_has_the_closed_form():
    start, new = params_tree(), grads_like(params_tree(), 5)
    zero = ema.update(start, new, ema.decay_at(1, 0.0, False))
    for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(a, b)
    decay = 0.9
    one = ema.update(start, new, ema.decay_at(1, decay, False))
    for a, s, n in zip(*(jax.tree.leaves(t) for t in (one, start, new)), strict=True):
        np.testing.assert_allclose(
            a, decay * np.asarray(s) + (1 - decay) * np.asarray(n), rtol=1e-6, atol=1e-7
        )


def test_ema_warmup_follows_timm_model_ema_v3():
    reference = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.99, use_warmup=True)
    for step in (1, 2, 3, 10, 1000, 10**6):
        expected = reference.get_decay(step)
        assert float(ema.decay_at(step, 0.99, True)) == pytest.approx(expected, rel=1e-6, abs=0)
