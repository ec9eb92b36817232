"""ViT model API: shapes, validation before compile, one trace per input shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax.models import create_model, default_model_config, vit


def tiny_config(**changes):
    config = default_model_config()
    config.backbone = "vit_tiny_patch16_224"
    config.img_size = 32
    config.embed_dim, config.depth, config.num_heads = 64, 2, 2
    config.num_classes = 5
    config.update(changes)
    return config


def test_apply_returns_logits_and_aux():
    model = create_model(tiny_config())
    images = jnp.ones((3, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    logits, aux = model.apply(variables, images, train=False)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert aux["pre_logits"].shape == (3, 64)


def test_apply_compiles_once_per_shape():
    model = create_model(tiny_config())
    images = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    traces = []

    @jax.jit
    def forward(variables, images):
        traces.append(1)
        return model.apply(variables, images)[0]

    forward(variables, images)
    forward(variables, images + 1.0)
    assert len(traces) == 1
    forward(variables, jnp.ones((4, 32, 32, 3)))  # a new batch size is a new shape
    assert len(traces) == 2


def test_bfloat16_compute_keeps_float32_params():
    model = create_model(tiny_config(dtype="bfloat16"))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    low, _ = model.apply(variables, images)
    full, _ = create_model(tiny_config()).apply(variables, images)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, full, atol=0.05)


def test_wrong_image_shape_is_a_clear_error():
    model = create_model(tiny_config())
    variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"Expected images of shape \[batch, 32, 32, 3\] \(NHWC\)"):
        model.apply(variables, jnp.ones((1, 3, 32, 32)))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("img_size", 40, "not divisible by the patch size 16"),
        ("num_classes", 0, "num_classes must be a positive integer"),
        ("dtype", "float8", "model.dtype must be one of"),
        ("reduction.method", "random", "model.reduction.method must be one of"),
        ("reduction.keep_rate", 0.0, r"keep_rate must be in \(0, 1\]"),
        ("reduction.keep_rate", 1.5, r"keep_rate must be in \(0, 1\]"),
        ("clca.head", "mlp", "model.clca.head must be one of"),
        ("clca.num_clr", -1, "num_clr must be an integer >= 0"),
        ("num_heads", 3, "must be divisible by model.num_heads"),
    ],
)
def test_bad_config_fails_before_building(field, value, message):
    config = tiny_config()
    section, _, leaf = field.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        create_model(config)


def test_reduction_location_outside_depth():
    config = tiny_config()
    config.reduction.method = "evit"
    config.reduction.locations = (1, 2)
    with pytest.raises(ValueError, match=r"locations \[2\] lie outside the 2 blocks"):
        create_model(config)


@pytest.mark.parametrize("method", ["evit", "tome", "ats", "dynamicvit"])
def test_batched_and_per_image_attention_agree(method):
    """Accelerators batch the attention, the CPU loops over images: same numbers."""
    config = tiny_config()
    config.img_size = 64
    config.reduction.method = method
    config.reduction.keep_rate = 0.5
    config.reduction.locations = (0, 1)
    config.clca.head, config.clca.clc, config.clca.num_clr = "cla", True, 1
    model = create_model(config)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64, 64, 3)), jnp.float32)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, images)
    outputs = {}
    for choice in ("batched", "per_image"):
        chosen = model.clone(attention=choice)
        run = jax.jit(
            lambda v, x, chosen=chosen: chosen.apply(
                v, x, train=True, rngs={"reduction": jax.random.key(1)}, mutable=["batch_stats"]
            )[0][0]
        )
        outputs[choice] = np.asarray(run(variables, images))
    np.testing.assert_allclose(outputs["batched"], outputs["per_image"], atol=1e-5)


def plain_attention(query, keys, values, bias):
    """Softmax attention through JAX autodiff, the reference for the hand-written backward."""
    logits = jnp.einsum("hqd,hkd->hqk", query, keys)
    probs = jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
    return jnp.einsum("hqk,hkd->hqd", probs, values), probs[:, 0, :]


@pytest.mark.parametrize("bias_shape", [None, (7,), (1, 1, 7), (3, 7, 7)])
def test_attention_backward_matches_autodiff(bias_shape):
    """Gradients reach queries, keys, values and the bias through both outputs."""
    rng = np.random.default_rng(0)
    query, keys, values = (jnp.asarray(rng.standard_normal((3, 7, 4)), jnp.float32) for _ in "qkv")
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    out_weights = jnp.asarray(rng.standard_normal((3, 7, 4)), jnp.float32)
    cls_weights = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)

    def loss(attention, *operands):
        out, cls_probs = attention(*operands)
        return jnp.sum(out * out_weights) + jnp.sum(jnp.sin(cls_probs) * cls_weights)

    def ours(q, k, v, b):
        return vit.softmax_attention(q, k, v, b, jnp.float32)

    arguments = (query, keys, values, bias)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    got = jax.grad(lambda *a: loss(ours, *a), argnums)(*arguments)
    want = jax.grad(lambda *a: loss(plain_attention, *a), argnums)(*arguments)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(
        ours(*arguments)[0], plain_attention(*arguments)[0], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("method", ["none", "tome"])
def test_bfloat16_training_gradients_follow_float32(method):
    """The recomputing attention backward also runs in bfloat16 (accelerator training)."""
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(dtype=dtype, img_size=64)
        config.reduction.method, config.reduction.keep_rate = method, 0.5
        config.reduction.locations = (0, 1)
        model = create_model(config)
        variables = model.init(jax.random.key(0), images)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, images, train=True)
            return jnp.sum(jnp.sin(logits))

        grads[dtype] = jax.jit(jax.grad(loss))(variables["params"])
    pairs = zip(jax.tree.leaves(grads["bfloat16"]), jax.tree.leaves(grads["float32"]), strict=True)
    for low, full in pairs:
        assert low.dtype == jnp.float32
        scale = float(jnp.linalg.norm(full)) + 1e-6
        assert float(jnp.linalg.norm(low - full)) / scale < 0.05  # measured: at most 0.014
