"""Every registered backbone has exactly the attributes of the timm model of the same name."""

from __future__ import annotations

import math

import jax
import pytest
import timm
import torch

from clca_jax.models import create_model, default_model_config, get_backbone, list_backbones


def timm_meta_model(name: str):
    with torch.device("meta"):  # shapes only, nothing allocated
        return timm.create_model(name, pretrained=False)


# Token-pooled backbones; the average-pooled ones (no final `norm`) are checked in
# tests/test_backbones_timm.py.
@pytest.mark.parametrize(
    "name", [name for name in list_backbones() if get_backbone(name).global_pool == "token"]
)
def test_registry_matches_timm(name):
    ours = get_backbone(name)
    model = timm_meta_model(name)
    block = model.blocks[0]
    assert ours.embed_dim == model.embed_dim
    assert ours.depth == len(model.blocks)
    assert ours.num_heads == block.attn.num_heads
    assert (ours.patch_size, ours.patch_size) == tuple(model.patch_embed.patch_size)
    assert (ours.img_size, ours.img_size) == tuple(model.patch_embed.img_size)
    assert ours.mlp_ratio * ours.embed_dim == block.mlp.fc1.out_features
    assert ours.qkv_bias == (block.attn.qkv.bias is not None)
    assert ours.patch_bias == (model.patch_embed.proj.bias is not None)
    assert ours.no_embed_class == model.no_embed_class
    assert ours.pre_norm == isinstance(model.norm_pre, torch.nn.LayerNorm)
    assert ours.ln_eps == model.norm.eps == block.norm1.eps
    assert (ours.layer_scale is not None) == (type(block.ls1).__name__ == "LayerScale")
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
    assert model.global_pool == "token" and isinstance(model.fc_norm, torch.nn.Identity)


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit3_small_patch16_224", "vit_base_patch16_clip_224",
             "vit_base_patch16_224_miil", "vit_large_patch16_224", "vit_base_patch8_224"]
)  # fmt: skip
def test_parameter_count_matches_timm(name):
    reference = timm_meta_model(name)
    config = default_model_config()
    config.backbone = name
    config.img_size = get_backbone(name).img_size
    config.num_classes = reference.num_classes
    shapes = create_model(config).abstract_variables()["params"]
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert ours == sum(p.numel() for p in reference.parameters())


def test_tag_selects_weights_not_architecture():
    assert get_backbone("vit_base_patch16_224.mae") == get_backbone("vit_base_patch16_224")


def test_unknown_backbone_lists_close_names():
    with pytest.raises(ValueError, match="deit3_base_patch16_224"):
        get_backbone("deit3_base_patch16_999")
