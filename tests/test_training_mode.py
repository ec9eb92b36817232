"""Training mode of every method: one trace per step, finite gradients, BatchNorm statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clca_jax.models import create_model, default_model_config
from clca_jax.models.reduction import METHODS as METHODS_BY_NAME
from clca_jax.models.reduction import PlanContext, Stage, Tokens
from clca_jax.models.vit import AttentionOutput

METHODS = ["none", "evit", "topk", "tome", "dpcknn", "dynamicvit", "ats", "sit", "patchmerger"]
IMG = 64


def tiny_config(method, keep_rate=0.5, **clca):
    config = default_model_config()
    config.backbone = "vit_tiny_patch16_224"
    config.img_size = IMG
    config.embed_dim, config.depth, config.num_heads = 32, 5, 2
    config.num_classes = 4
    config.reduction.method = method
    config.reduction.keep_rate = keep_rate
    config.reduction.locations = (1, 2)
    config.clca.head, config.clca.clc, config.clca.num_clr = "cla", True, 1
    config.clca.update(clca)
    return config


def batch(seed, size=4):
    generator = np.random.default_rng(seed)
    images = generator.standard_normal((size, IMG, IMG, 3)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(generator.integers(0, 4, size))


def init(model):
    images, _ = batch(0)
    rngs = {"params": jax.random.key(0), "reduction": jax.random.key(1)}
    return jax.jit(model.init)(rngs, images)


def make_steps(model):
    traces = {"train": 0, "eval": 0}

    @jax.jit
    def train_step(variables, images, labels, key):
        traces["train"] += 1

        def loss_fn(params):
            (logits, aux), updates = model.apply(
                {**variables, "params": params}, images, train=True,
                rngs={"reduction": key}, mutable=["batch_stats"],
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss + aux["extra_loss"], (updates, aux)

        (loss, (updates, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        return loss, grads, updates, aux

    @jax.jit
    def eval_step(variables, images, key):
        traces["eval"] += 1
        return model.apply(variables, images, rngs={"reduction": key})[0]

    return train_step, eval_step, traces


@pytest.mark.parametrize("method", METHODS)
def test_steps_trace_once_and_gradients_are_finite(method):
    model = create_model(tiny_config(method))
    variables = init(model)
    train_step, eval_step, traces = make_steps(model)
    for seed in (1, 2):
        images, labels = batch(seed)
        loss, grads, updates, aux = train_step(variables, images, labels, jax.random.key(seed))
        eval_step(variables, images, jax.random.key(seed))
    assert traces == {"train": 1, "eval": 1}
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in leaves)
    # The reduction's own layers learn too (through DynamicViT's Gumbel straight-through, the
    # DPC-KNN merge weights, SiT's and PatchMerger's mixing).
    for path, grad in leaves:
        name = jax.tree_util.keystr(path)
        if "reduction_0" in name:
            assert np.abs(np.asarray(grad)).sum() > 0, name
    # CLA's BatchNorm statistics move in training.
    before = variables["batch_stats"]["cla_head"]["norm_in"]["mean"]
    after = updates["batch_stats"]["cla_head"]["norm_in"]["mean"]
    assert not np.allclose(before, after)
    if method == "dynamicvit":
        assert float(aux["extra_loss"]) > 0.0


@pytest.mark.parametrize("method", ["evit", "dynamicvit", "sit"])
def test_evaluation_uses_running_statistics(method):
    """At evaluation an image's logits do not depend on the rest of the batch."""
    model = create_model(tiny_config(method))
    variables = init(model)
    images, _ = batch(3, size=4)
    apply = jax.jit(model.apply, static_argnames="train")
    together = apply(variables, images)[0]
    alone = apply(variables, images[:1])[0]
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(together[0]), atol=1e-5)
    # ... whereas training normalises with the batch's statistics.
    train_together = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, rngs={"reduction": jax.random.key(0)}, mutable=["batch_stats"]
        )[0][0]
    )(variables, images)
    assert not np.allclose(np.asarray(train_together[0]), np.asarray(together[0]), atol=1e-3)


def test_dynamicvit_trains_at_full_length_and_prunes_at_evaluation():
    model = create_model(tiny_config("dynamicvit"))
    variables = init(model)
    images, _ = batch(4)
    _, train_aux = model.apply(
        variables, images, train=True, rngs={"reduction": jax.random.key(0)},
        mutable=["batch_stats"],
    )[0]  # fmt: skip
    _, eval_aux = model.apply(variables, images)
    train_counts, eval_counts = (
        np.asarray(train_aux["token_counts"]),
        np.asarray(eval_aux["token_counts"]),
    )
    assert train_counts[2][0] > eval_counts[2][0]
    assert train_aux["kept"][0].shape == (4, 16 + 1)  # a decision for every non-CLS token


@pytest.mark.parametrize("method", METHODS[1:])
def test_protected_suffix_passes_reduction_untouched(method):
    """`protect_cache` (opt-in deviation): CLR and recovered cache tokens are never reduced."""
    module_type = METHODS_BY_NAME[method]
    length, protected, width = 30, 3, 16
    context = PlanContext(
        stage=0, num_stages=2, keep_rate=0.3, num_patches=26, num_clr=1,
        tokens_in=length, protected=protected, train=False, clc=True,
    )  # fmt: skip
    stage = Stage(0, 0, module_type.plan(context), length, protected)
    generator = np.random.default_rng(0)
    x = jnp.asarray(generator.standard_normal((2, length, width)), jnp.float32)
    tokens = Tokens(
        x=x,
        size=jnp.ones((2, length)) if method == "tome" else None,
        valid=jnp.ones((2, length), bool) if method == "ats" else None,
        decision=jnp.ones((2, length)) if method == "dynamicvit" else None,
    )
    logits = generator.standard_normal((2, 2, length, length))
    attention = AttentionOutput(
        cls_probs=jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)[:, :, 0],
        keys=jnp.asarray(generator.standard_normal((2, 2, length, 8)), jnp.float32),
        values=jnp.asarray(generator.standard_normal((2, 2, length, 8)), jnp.float32),
    )
    module = module_type(stage)
    variables = module.init(jax.random.key(0), tokens, attention, False)
    out = module.apply(variables, tokens, attention, False).tokens.x
    assert out.shape[1] == stage.plan.tokens_out
    np.testing.assert_array_equal(np.asarray(out[:, -protected:]), np.asarray(x[:, -protected:]))
    np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(x[:, 0]))


def test_protect_cache_schedule():
    model = create_model(tiny_config("evit", protect_cache=True))
    schedule = model.token_schedule()
    protected = [plan.stage.protected for plan in schedule.blocks if plan.stage]
    assert protected == [1, 1 + schedule.blocks[1].recovered]  # CLR, then CLR + recovered
    reference = create_model(tiny_config("evit")).token_schedule()
    assert [plan.stage.protected for plan in reference.blocks if plan.stage] == [0, 0]
