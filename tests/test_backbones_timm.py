"""DINOv2 (with and without registers) and average-pooled backbones against timm."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import timm
import torch

from clca_jax.models import create_model, default_model_config, get_backbone, list_backbones
from clca_jax.models.registry import pretrained_normalization
from clca_jax.normalization import NORMALIZATION
from tests.test_convert_parity import NUM_CLASSES, TOLERANCE, convert, reference_model
from tests.timm_helpers import TINY, make_timm_model, random_images, save_state_dict, timm_logits

# (tag, native image size of the weights, file format).
NEW_VARIANTS = [
    ("vit_small_patch14_dinov2.lvd142m", 518, ".pth"),  # LayerScale, patch 14, 37 x 37 grid
    ("vit_base_patch14_reg4_dinov2.lvd142m", 518, ".safetensors"),  # + 4 register tokens
    ("vit_large_patch14_reg4_dinov2.lvd142m", 518, ".pth"),
    ("eva_large_patch14_196.in22k_ft_in1k", 196, ".safetensors"),  # avg pool + fc_norm
]


def timm_meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("tag,native,suffix", NEW_VARIANTS)
def test_converted_logits_match_timm(tmp_path, tag, native, suffix, img_size):
    """Weights saved at their native grid, converted (position embedding resampled as timm's
    checkpoint filter does), give timm's logits at 224 and 448 px."""
    name = tag.split(".")[0]
    source = make_timm_model(name, native, NUM_CLASSES, seed=1, **TINY)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / f"weights{suffix}"))
    model, variables = convert(tmp_path, checkpoint, tag, img_size)
    images = random_images(2, img_size)
    logits, _ = model.apply(variables, images)
    expected = timm_logits(reference_model(tag, img_size, TINY, source.state_dict()), images)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", list_backbones())
def test_prefix_tokens_and_pooling_match_timm(name):
    ours = get_backbone(name)
    model = timm_meta_model(name)
    assert ours.reg_tokens == model.num_reg_tokens
    assert ours.num_prefix_tokens == model.num_prefix_tokens
    assert ours.global_pool == model.global_pool
    assert ours.no_embed_class == model.no_embed_class
    if ours.global_pool == "avg":
        assert isinstance(model.norm, torch.nn.Identity)
        assert model.fc_norm.eps == ours.ln_eps == model.blocks[0].norm1.eps
    else:
        assert isinstance(model.fc_norm, torch.nn.Identity)


@pytest.mark.parametrize(
    "name", ["eva_large_patch14_196", "eva_large_patch14_336", "vit_large_patch14_reg4_dinov2"]
)
def test_architecture_of_new_families_matches_timm(name):
    ours = get_backbone(name)
    model = timm_meta_model(name)
    block = model.blocks[0]
    assert (ours.embed_dim, ours.depth, ours.num_heads) == (
        model.embed_dim,
        len(model.blocks),
        block.attn.num_heads,
    )
    assert (ours.patch_size, ours.patch_size) == tuple(model.patch_embed.patch_size)
    assert (ours.img_size, ours.img_size) == tuple(model.patch_embed.img_size)
    assert (ours.layer_scale is not None) == (type(block.ls1).__name__ == "LayerScale")
    assert ours.qkv_bias == (block.attn.qkv.bias is not None)


@pytest.mark.parametrize(
    "name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch14_dinov2", "eva_large_patch14_196"]
)
def test_parameter_count_matches_timm(name):
    reference = timm_meta_model(name, num_classes=1000)  # DINOv2's default is no head
    config = default_model_config()
    config.backbone = name
    config.img_size = get_backbone(name).img_size
    config.num_classes = reference.num_classes
    shapes = create_model(config).abstract_variables()["params"]
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == sum(
        p.numel() for p in reference.parameters()
    )


def _timm_tags():
    return [tag for name in list_backbones() for tag in timm.list_pretrained(name + ".*")]


@pytest.mark.parametrize("tag", _timm_tags())
def test_pretrained_normalization_matches_timm(tag):
    mean, std = NORMALIZATION[pretrained_normalization(tag)]
    cfg = timm.models.get_pretrained_cfg(tag)
    np.testing.assert_allclose(mean, cfg.mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(std, cfg.std, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "name",
    ["vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_384", "vit_base_patch16_gap_224"],
)
def test_backbone_without_class_token_is_refused(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert model.cls_token is None  # the premise: timm builds it without a class token
    with pytest.raises(ValueError, match="has no class token") as error:
        get_backbone(name + ".webli")
    assert "\n" not in str(error.value)


def test_converted_config_records_normalization(tmp_path):
    """A model converted from CLIP weights with the backbone's constants knows them."""
    tag = "vit_base_patch16_clip_224.laion2b"
    source = make_timm_model(tag.split(".")[0], 224, NUM_CLASSES, seed=3, **TINY)
    checkpoint = save_state_dict(source.state_dict(), str(tmp_path / "clip.pth"))
    model, _ = convert(tmp_path, checkpoint, tag, 224, extra=("--normalization", "backbone"))
    saved = json.loads((tmp_path / "converted_224" / "config.json").read_text())
    assert saved["normalization"] == "backbone" and saved["backbone"] == tag
    assert model.input_normalization == NORMALIZATION["clip"]
