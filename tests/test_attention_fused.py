"""The fused attention path (`model.attention="fused"`, jax.nn.dot_product_attention with the
class token's row computed on the side) gives the per-image path's logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax.models import create_model, default_model_config, vit
from clca_jax.models.reduction import METHODS, NO_REDUCTION

IMG_SIZE = 48  # 9 patches + CLS + 1 CLR: odd and even lengths through the reductions


def clca_config(method: str):
    config = default_model_config()
    config.backbone = "vit_tiny_patch16_224"
    config.update(img_size=IMG_SIZE, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    config.reduction.locations = (1, 2)
    if method != NO_REDUCTION:
        config.reduction.update(method=method, keep_rate=0.5)
    config.clca.update(head="cla", clc=True, num_clr=1)
    return config


def logits_and_gradients(model, variables, images):
    """Evaluation logits, training logits and the gradient of a training loss."""
    rngs = {"reduction": jax.random.key(3)}

    def train_loss(params):
        (logits, aux), _ = model.apply(
            {**variables, "params": params}, images, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(logits)) + aux["extra_loss"], logits

    (_, train_logits), grads = jax.value_and_grad(train_loss, has_aux=True)(variables["params"])
    eval_logits = model.apply(variables, images, train=False)[0]
    return eval_logits, train_logits, grads


# Padding is checked with the methods that bring a bias (ToMe's sizes, ATS's slots) and without.
CASES = [(method, False) for method in METHODS] + [
    (method, True) for method in (NO_REDUCTION, "tome", "ats")
]


@pytest.mark.parametrize(
    "method,padded", CASES, ids=[f"{m}-{'padded' if p else 'exact_length'}" for m, p in CASES]
)
def test_fused_attention_matches_per_image(method, padded, monkeypatch):
    """Every method with the CLA head and cache, in evaluation and training; `padded` pads
    every sequence to a multiple of 4 with masked keys, as the cuDNN kernel is fed."""
    if padded:
        monkeypatch.setitem(vit.FUSED_PAD_MULTIPLE, "xla", 4)
    model = create_model(clca_config(method))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((3, IMG_SIZE, IMG_SIZE, 3)), jnp.float32)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, images)
    results = {}
    for choice in ("per_image", "fused"):
        run = jax.jit(logits_and_gradients, static_argnums=0)
        results[choice] = run(model.clone(attention=choice), variables, images)
    (eval_want, train_want, grads_want) = results["per_image"]
    (eval_got, train_got, grads_got) = results["fused"]
    np.testing.assert_allclose(eval_got, eval_want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(train_got, train_want, atol=2e-5, rtol=1e-5)
    # Against the gradient's own scale: some leaves (the CLA head's BatchNorm biases) have a
    # true gradient of 0 and carry only rounding noise. Measured: at most 1e-5 of the scale
    # (PatchMerger) and 7e-6 in relative norm (DPC-KNN).
    want = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(grads_want)])
    got = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(grads_got)])
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 3e-5 * scale
    assert np.linalg.norm(got - want) <= 3e-5 * np.linalg.norm(want)


@pytest.mark.parametrize("pad", [1, 2, 4])
@pytest.mark.parametrize("bias_kind", ["none", "keys", "pairs"])
def test_fused_attention_function_against_plain_softmax(bias_kind, pad, monkeypatch):
    """Output, class row and gradients (bias included) at an odd length, with a key bias
    (ToMe's log sizes) or a pairwise mask with -max and -inf entries (ATS's padding)."""
    monkeypatch.setitem(vit.FUSED_PAD_MULTIPLE, "xla", pad)
    rng = np.random.default_rng(1)
    batch, length, heads, dim = 2, 7, 3, 4
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32) for _ in "qkv"
    )
    if bias_kind == "none":
        bias = None
    elif bias_kind == "keys":
        bias = jnp.asarray(rng.standard_normal((batch, 1, 1, length)), jnp.float32)
    else:
        valid = np.ones((batch, length), bool)
        valid[:, -2:] = False
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        fill = np.where(pair, 0.0, -np.finfo(np.float32).max).astype(np.float32)
        fill[1, :, :, -1] = -np.inf  # a slot no image of the batch fills
        bias = jnp.asarray(fill)
    out_weights = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    cls_weights = jnp.asarray(rng.standard_normal((batch, heads, length)), jnp.float32)

    def plain(q, k, v, b):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        probs = jax.nn.softmax(logits if b is None else logits + b, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v), probs[:, :, 0]

    def loss(attention, *operands):
        out, cls_probs = attention(*operands)
        return jnp.sum(out * out_weights) + jnp.sum(jnp.sin(cls_probs) * cls_weights)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    fused = lambda *a: vit.fused_attention(*a, implementation="xla")  # noqa: E731
    for got, want in zip(fused(q, k, v, bias), plain(q, k, v, bias), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    got = jax.grad(lambda *a: loss(fused, *a), argnums)(q, k, v, bias)
    want = jax.grad(lambda *a: loss(plain, *a), argnums)(q, k, v, bias)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_auto_attention_is_per_image_on_the_cpu_and_fused_elsewhere(monkeypatch):
    assert vit.resolve_attention("auto") == "per_image"  # the tests run on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert vit.resolve_attention("auto") == "fused"
    assert vit.resolve_attention("batched") == "batched"
    assert vit.fused_implementation(jnp.bfloat16, 64) == "cudnn"
    assert vit.fused_implementation(jnp.float32, 64) == "xla"
    assert vit.fused_implementation(jnp.bfloat16, 12) == "xla"
