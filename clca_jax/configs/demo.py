"""Demo: a small ViT trained from scratch on the animal silhouettes (10 classes, 28x28 px).

    python -m clca_jax.main --config=demo --workdir=runs/demo

Runs in a few minutes on a 2-core CPU and prints the test top-1. The images come from the
`animal-mnist` package (no network at run time); each is resized to 36 px and cropped to 32,
which a patch-8 ViT sees as a 4x4 grid of tokens.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common
from clca_jax.data import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.data = default_data_config("demo")
    config.init.checkpoint = ""

    config.model.backbone = "vit_small_patch8_224"
    config.model.img_size = 32
    config.model.embed_dim = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.num_classes = 10
    config.model.reduction.method = "none"
    config.model.clca.head = "none"
    config.model.clca.clc = False
    config.model.clca.num_clr = 0

    config.optim.lr = 1e-3
    config.optim.warmup_lr = 1e-5
    config.optim.min_lr = 1e-5
    config.optim.warmup_epochs = 2
    config.optim.cooldown_epochs = 1
    config.train.epochs = 20
    config.train.batch_size = 128
    config.train.log_every_steps = 60
    config.eval.batch_size = 256
    config.checkpoint.every_steps = 300
    return config
