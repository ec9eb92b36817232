"""`model.normalization`: the loaders normalise with the chosen constants, ImageNet's by default."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from clca_jax import data
from clca_jax.models import create_model, default_model_config
from clca_jax.models.config import input_normalization
from clca_jax.training import evaluation

# choice, backbone, the constants written out (timm's pretrained configs for `backbone`).
CASES = [
    ("imagenet", "vit_base_patch16_clip_224.laion2b", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("clip", "vit_base_patch16_224.orig_in21k", (0.48145466, 0.4578275, 0.40821073),
     (0.26862954, 0.26130258, 0.27577711)),
    ("inception", "deit3_base_patch16_224.fb_in1k", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("zero_one", "vit_base_patch16_224", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ("backbone", "vit_base_patch16_clip_224.laion2b", (0.48145466, 0.4578275, 0.40821073),
     (0.26862954, 0.26130258, 0.27577711)),
    ("backbone", "vit_large_patch14_clip_224.laion2b", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("backbone", "vit_small_patch14_reg4_dinov2.lvd142m", (0.485, 0.456, 0.406),
     (0.229, 0.224, 0.225)),
    ("backbone", "vit_base_patch16_224_miil.in21k", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
]  # fmt: skip


def model_config(choice=None, backbone="vit_base_patch16_224.orig_in21k"):
    config = default_model_config()
    config.backbone = backbone
    config.embed_dim, config.depth, config.num_heads, config.img_size = 32, 2, 2, 224
    if choice is not None:
        config.normalization = choice
    return config


def demo_eval_batch(model):
    run = ml_collections.ConfigDict(
        {"data": data.default_data_config("demo"), "eval": {"batch_size": 4}, "model": model}
    )
    loader = evaluation.eval_loader(run, img_size=28)
    return next(iter(loader))["image"]


def demo_pixels():
    """The uint8 pixels of the first demo evaluation images, resized and cropped to 28."""
    loader = data.make_eval_loader(
        data.default_data_config("demo"),
        img_size=28,
        global_batch_size=4,
        mean=(0.0, 0.0, 0.0),
        std=(1.0 / 255.0,) * 3,
    )
    return np.rint(next(iter(loader))["image"]).astype(np.float64)


@pytest.mark.parametrize("choice,backbone,mean,std", CASES)
def test_loader_pixels_are_normalised_with_the_chosen_constants(choice, backbone, mean, std):
    config = model_config(choice, backbone)
    assert input_normalization(config) == (mean, std)
    expected = (demo_pixels() / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(demo_eval_batch(config), expected, rtol=0, atol=2e-6)
    assert create_model(config).input_normalization == (mean, std)


def test_default_is_imagenet_bit_for_bit():
    config = model_config()
    assert config.normalization == "imagenet"
    today = data.make_eval_loader(
        data.default_data_config("demo"), img_size=28, global_batch_size=4
    )  # the loader's own default: ImageNet's constants
    np.testing.assert_array_equal(demo_eval_batch(config), next(iter(today))["image"])


def test_unknown_choice_and_untagged_backbone_are_refused_up_front():
    with pytest.raises(ValueError, match=r"model.normalization must be one of .*got 'clip2'"):
        create_model(model_config("clip2"))
    with pytest.raises(ValueError, match="needs the pretrained tag"):
        create_model(model_config("backbone", "vit_base_patch16_clip_224"))
