"""The paper's main setting, shared by the five leaf-dataset configs (spec 0 and 6.1).

ViT-B/16 CLIP (laion2b) at 448 px, EViT keeping 10 % of the tokens at blocks 3, 6 and 9, and
CLCA: the CLA head plus the cross-layer cache with one CLR token. Training follows the
reference: AdamW at 1e-4 with weight decay 0.05, 50 epochs of batch 32 (2 warm-up, cosine to
1e-5, 5 cool-down), evaluation on the test split after the last epoch.

The weights come from a converted CLIP checkpoint:

    clca-convert --checkpoint open_clip_vit_b16_laion2b.bin \
        --model vit_base_patch16_clip_224.laion2b --img_size 448 \
        --out pretrained/vit_base_patch16_clip_224.laion2b_448

The dataset configs call `get_config` and set the data and class count. On GPUs and TPUs add
`--config.model.dtype=bfloat16`. Appending `:tiny` to a config's name or path (`soygene:tiny`,
`configs/soygene.py:tiny`) shrinks model, images, batch and schedule so any config runs on a
laptop CPU. Appending `:deit` (`soyglobal:deit`) adds the DeiT-style augmentation the official
code also offers: RandAugment with 2 operations at magnitude 9, Mixup 0.8, CutMix 1.0 and random
erasing 0.25; variants combine with commas (`soyglobal:deit,tiny`). A config file of your own
starts the same way, from any folder: `from clca_jax.configs import common`.
"""

from __future__ import annotations

import ml_collections

from clca_jax.training.config import default_config

PRETRAINED = "pretrained/vit_base_patch16_clip_224.laion2b_448"
VARIANTS = ("tiny", "deit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The shared setting; `arg` is None for the paper's recipe, or comma-separated variants:
    `tiny` for a laptop run, `deit` for the DeiT-style augmentation."""
    config = default_config()
    config.seed = 1
    config.init.checkpoint = PRETRAINED

    config.model.backbone = "vit_base_patch16_clip_224.laion2b"
    config.model.img_size = 448
    config.model.reduction.method = "evit"
    config.model.reduction.keep_rate = 0.1
    config.model.reduction.locations = (3, 6, 9)
    config.model.clca.head = "cla"
    config.model.clca.clc = True
    config.model.clca.num_clr = 1

    variants = arg.split(",") if arg else []
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown config variant {variant!r}; use one of {VARIANTS} or none.")
    if "deit" in variants:
        add_deit_recipe(config)
    if "tiny" in variants:
        make_tiny(config)
    return config


def add_deit_recipe(config: ml_collections.ConfigDict) -> None:
    """The DeiT-style recipe (timm flags `--aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0
    --reprob 0.25 --remode pixel --smoothing 0.1 --drop-path 0.1`), with torchvision's
    RandAugment (2 operations at bin 9 of 31, no magnitude noise)."""
    config.model.drop_path_rate = 0.1
    config.train.label_smoothing = 0.1
    config.data.augment.rand_augment_ops = 2
    config.data.augment.rand_augment_magnitude = 9
    config.data.augment.random_erasing_prob = 0.25
    config.train.mixup.mixup_alpha = 0.8
    config.train.mixup.cutmix_alpha = 1.0
    config.train.mixup.prob = 1.0
    config.train.mixup.switch_prob = 0.5


def make_tiny(config: ml_collections.ConfigDict) -> None:
    """Shrinks a config to seconds on a CPU: a 5-block width-32 ViT at 64 px (16 patches, enough
    for every reduction method) from scratch, batch 4, one epoch, no warm-up or cool-down."""
    config.init.checkpoint = ""
    config.model.img_size = 64
    config.model.embed_dim = 32
    config.model.depth = 5
    config.model.num_heads = 2
    config.model.reduction.locations = (1, 2)
    config.optim.warmup_epochs = 0
    config.optim.cooldown_epochs = 0
    config.train.epochs = 1
    config.train.batch_size = 4
    config.train.log_every_steps = 1
    config.eval.batch_size = 4
    config.checkpoint.every_steps = 0
