"""Demo: the paper's idea in miniature, on the animal silhouettes (10 classes, 28x28 px).

    python -m clca_jax.demo --workdir=runs/demo         # the three runs below and their table
    python -m clca_jax.main --config=demo --workdir=runs/demo_clca   # one run: EViT + CLCA

A 4-block ViT trained from scratch. The images come from the `animal-mnist` package (no network
at run time); each is resized to 54 px and cropped to 48, which the patch-8 ViT sees as a 6x6
grid: 36 patch tokens, of which EViT keeps 4 (keep rate 0.1) after block 1 and 1 after block 2,
fusing the rest into one token each time. The CLCA head reads the class token at blocks 1, 2
and 3, and the cache hands a CLR token and the pooled tokens of earlier blocks to later ones.

Variants (`--config=demo:NAME`): `reduction_only` drops CLCA (EViT alone), `no_reduction` is
the same ViT without token reduction or CLCA, `tiny` shrinks it to seconds for tests.
`clca_jax.demo` trains the default and both variants and compares them.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common
from clca_jax.data import default_data_config
from clca_jax.models.config import NO_HEAD
from clca_jax.models.reduction import NO_REDUCTION

VARIANTS = ("reduction_only", "no_reduction")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo with EViT + CLCA; `arg` is a name of `VARIANTS`, `tiny` or None."""
    config = common.get_config()
    config.data = default_data_config("demo")
    config.init.checkpoint = ""

    config.model.backbone = "vit_small_patch8_224"
    config.model.img_size = 48
    config.model.embed_dim = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.num_classes = 10
    config.model.reduction.method = "evit"
    config.model.reduction.keep_rate = 0.1
    config.model.reduction.locations = (1, 2)
    config.model.clca.head = "cla"
    config.model.clca.clc = True
    config.model.clca.num_clr = 1

    config.optim.lr = 1e-3
    config.optim.warmup_lr = 1e-5
    config.optim.min_lr = 1e-5
    config.optim.warmup_epochs = 1
    config.optim.cooldown_epochs = 1
    config.train.epochs = 6
    config.train.batch_size = 128
    config.train.log_every_steps = 20
    config.eval.batch_size = 256
    config.checkpoint.every_steps = 300
    if arg == "tiny":
        config.model.img_size = 32
        config.model.embed_dim = 32
        config.optim.warmup_epochs = 0
        config.optim.cooldown_epochs = 0
        config.train.epochs = 1
    elif arg in VARIANTS:
        VARIANT_CHANGES[arg](config)
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; use one of {(*VARIANTS, 'tiny')}.")
    return config


def without_clca(config: ml_collections.ConfigDict) -> None:
    """The same model without the CLCA head and cache (token reduction alone)."""
    config.model.clca.head = NO_HEAD
    config.model.clca.clc = False
    config.model.clca.num_clr = 0


def without_reduction(config: ml_collections.ConfigDict) -> None:
    """The same ViT without token reduction and without CLCA."""
    without_clca(config)
    config.model.reduction.method = NO_REDUCTION
    config.model.reduction.keep_rate = 1.0


VARIANT_CHANGES = {"reduction_only": without_clca, "no_reduction": without_reduction}
