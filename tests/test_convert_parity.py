"""Converted timm checkpoints give timm's logits (spec 1.2, 1.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn

from clca_jax import load_pretrained
from clca_jax.convert.cli import main as convert_main
from tests.timm_helpers import (
    TINY,
    make_timm_model,
    random_images,
    save_state_dict,
    timm_logits,
    to_openclip,
)

TOLERANCE = 1e-4
NUM_CLASSES = 10

# One entry per architecture variant of spec 1.2 (plus patch 8 / 14 / 32 geometries), with the
# file format used to save it so that every reader is exercised.
VARIANTS = [
    ("vit_base_patch16_224.orig_in21k", ".pth"),  # original ViT / AugReg / DINO / MAE / MoCo v3
    ("deit_tiny_patch16_224.fb_in1k", ".safetensors"),
    ("vit_base_patch16_224_miil.in21k", ".bin"),  # no qkv bias
    ("deit3_base_patch16_224.fb_in1k", ".pth"),  # no class pos-embed, LayerScale
    ("vit_base_patch16_clip_224.laion2b", ".safetensors"),  # pre-norm, eps 1e-5, no patch bias
    ("vit_small_patch8_224.dino", ".pth"),
    ("vit_large_patch14_clip_224.laion2b", ".pth"),
    ("vit_base_patch32_224.augreg_in21k", ".safetensors"),
]


def convert(tmp_path, checkpoint, model, img_size, sizes=TINY, extra=()):
    out = tmp_path / f"converted_{img_size}"
    argv = [
        "--checkpoint", str(checkpoint), "--model", model, "--out", str(out),
        "--img_size", str(img_size), "--num_classes", str(NUM_CLASSES), *extra,
    ]  # fmt: skip
    for field, value in sizes.items():
        argv += [f"--{field.replace('_', '-')}", str(value)]
    assert convert_main(argv) == 0
    return load_pretrained(str(out))


def reference_model(name, img_size, sizes, state):
    """timm at the target size, loaded through timm's own filter (which resamples)."""
    model = make_timm_model(name.split(".")[0], img_size, NUM_CLASSES, **sizes)
    model.load_state_dict(checkpoint_filter_fn(state, model))
    return model.eval()


@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("tag,suffix", VARIANTS)
def test_converted_logits_match_timm(tmp_path, tag, suffix, img_size):
    name = tag.split(".")[0]
    source = make_timm_model(name, 224, NUM_CLASSES, seed=1, **TINY)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / f"weights{suffix}"))
    model, variables = convert(tmp_path, checkpoint, tag, img_size)
    images = random_images(2, img_size)
    logits, _ = model.apply(variables, images)
    expected = timm_logits(reference_model(tag, img_size, TINY, source.state_dict()), images)
    assert logits.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("img_size", [224, 448])
def test_full_vit_b16_matches_timm(tmp_path, img_size):
    source = make_timm_model("vit_base_patch16_224", 224, NUM_CLASSES, seed=2)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / "vit_b16.pth"))
    model, variables = convert(tmp_path, checkpoint, "vit_base_patch16_224", img_size, sizes={})
    images = random_images(2, img_size, seed=3)
    logits, _ = model.apply(variables, images)
    reference = reference_model("vit_base_patch16_224", img_size, {}, source.state_dict())
    np.testing.assert_allclose(
        np.asarray(logits), timm_logits(reference, images), atol=TOLERANCE, rtol=0
    )


@pytest.mark.parametrize("img_size", [224, 448])
def test_openclip_state_dict_uses_clamped_bicubic(tmp_path, img_size):
    """OpenCLIP files: keys renamed, text tower dropped, pos-embed resampled without antialias."""
    tag = "vit_base_patch16_clip_224.laion2b"
    source = make_timm_model("vit_base_patch16_clip_224", 224, NUM_CLASSES, seed=4, **TINY)
    openclip = to_openclip(source.state_dict())
    checkpoint = save_state_dict(openclip, str(tmp_path / "open_clip.pth"))
    model, variables = convert(tmp_path, checkpoint, tag, img_size)

    # Reference: timm's own OpenCLIP key conversion at 224, then PyTorch's non-antialiased
    # bicubic on the patch grid (the CLCA conversion route of spec 1.3).
    native = make_timm_model("vit_base_patch16_clip_224", 224, NUM_CLASSES, **TINY)
    state = checkpoint_filter_fn(openclip, native)
    grid = img_size // 16
    patches = state["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat(
        [state["pos_embed"][:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1
    )
    reference = make_timm_model("vit_base_patch16_clip_224", img_size, NUM_CLASSES, **TINY)
    reference.load_state_dict(state)
    images = random_images(2, img_size, seed=5)
    logits, _ = model.apply(variables, images)
    np.testing.assert_allclose(
        np.asarray(logits), timm_logits(reference, images), atol=TOLERANCE, rtol=0
    )
    notes = (tmp_path / f"converted_{img_size}" / "conversion.txt").read_text()
    assert "dropped logit_scale: not part of the image tower" in notes


def test_fresh_head_when_classes_differ(tmp_path):
    source = make_timm_model("deit_tiny_patch16_224", 224, 1000, seed=6, **TINY)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / "w.pth"))
    model, variables = convert(tmp_path, checkpoint, "deit_tiny_patch16_224", 224)
    assert variables["params"]["head"]["kernel"].shape == (64, NUM_CLASSES)
    notes = (tmp_path / "converted_224" / "conversion.txt").read_text()
    assert "dropped head.weight: 1000-class head, the model has 10 classes" in notes
    assert "fresh head.weight: new head for 10 classes" in notes
    # Everything but the head is the checkpoint's: features before the head agree with timm.
    images = random_images(2, 224)
    _, aux = model.apply(variables, images)
    with torch.no_grad():
        features = source.forward_head(
            source.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)),
            pre_logits=True,
        ).numpy()
    np.testing.assert_allclose(np.asarray(aux["pre_logits"]), features, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attention", ["per_image", "batched"])
def test_training_gradients_match_timm(tmp_path, attention):
    """The backward pass (recomputing attention, erf GELU) gives PyTorch autograd's gradients."""
    source = make_timm_model("vit_base_patch16_224", 224, NUM_CLASSES, seed=7, **TINY)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / "w.pth"))
    model, variables = convert(tmp_path, checkpoint, "vit_base_patch16_224", 224)
    model = model.clone(attention=attention)
    images = random_images(2, 224, seed=8)
    labels = np.array([3, 7])

    def loss_fn(params, images):
        logits, _ = model.apply({**variables, "params": params}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads, image_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(
        variables["params"], jnp.asarray(images)
    )
    reference = source.train()  # no dropout in timm's ViT by default: train == eval numerics
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).requires_grad_(True)
    torch.nn.functional.cross_entropy(reference(inputs), torch.from_numpy(labels)).backward()
    expected = dict(reference.named_parameters())

    np.testing.assert_allclose(
        np.asarray(image_grads), inputs.grad.permute(0, 2, 3, 1).numpy(), atol=1e-6, rtol=1e-4
    )
    for block in range(TINY["depth"]):
        ours, theirs = grads[f"blocks_{block}"], f"blocks.{block}."
        pairs = [
            (ours["attn"]["qkv"]["kernel"], expected[theirs + "attn.qkv.weight"].grad.T),
            (ours["attn"]["qkv"]["bias"], expected[theirs + "attn.qkv.bias"].grad),
            (ours["attn"]["proj"]["kernel"], expected[theirs + "attn.proj.weight"].grad.T),
            (ours["mlp"]["fc1"]["kernel"], expected[theirs + "mlp.fc1.weight"].grad.T),
            (ours["norm1"]["scale"], expected[theirs + "norm1.weight"].grad),
        ]
        for got, want in pairs:
            np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(grads["pos_embed"]), expected["pos_embed"].grad.numpy(), atol=1e-6, rtol=1e-4
    )
