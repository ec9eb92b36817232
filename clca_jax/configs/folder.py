"""Your own images: one sub-folder per class, or CSV split files (the `csv` variant).

A folder with one sub-folder per class (`IMAGES/<class>/**/<image>`) trains on the first 80 %
of each class and evaluates on the rest (`train` and `val`, carved in file order). From scratch
(a small ViT at 64 px, 30 epochs), a minute or two on a laptop CPU for a few hundred images:

    python -m clca_jax.main --config=folder:tiny --workdir=runs/folder_tiny \
        --config.data.dir=IMAGES

The paper's setting (ViT-B/16 CLIP at 448 px, EViT at 10 % plus CLCA) fine-tunes a converted
model; convert it once (the command in `clca_jax/configs/common.py`), then

    python -m clca_jax.main --config=folder --workdir=runs/folder \
        --config.data.dir=IMAGES \
        --config.init.checkpoint=pretrained/vit_base_patch16_clip_224.laion2b_448

The `csv` variant (`folder:csv`, `folder:csv,tiny`) reads `IMAGES/train.csv` and `val.csv`
(columns `dir,class_id`), or carves both from one `train_val.csv`; the paths in them are
relative to `IMAGES` (or to `--config.data.image_folder`). With a `test.csv`, evaluate on it
with `--config.data.eval_split=test`. The class names go to `WORKDIR/classes.json` (class ids
for the csv route), and the trained model predicts new images:

    python -m clca_jax.predict --workdir=runs/folder_tiny --images=NEW_IMAGES --out=predictions.csv
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common
from clca_jax.data import default_data_config

VARIANTS = ("csv", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The own-data config; `arg` is None or comma-separated variants (`csv`, `tiny`)."""
    variants = set(arg.split(",")) if arg else set()
    if variants - set(VARIANTS):
        raise ValueError(
            f"unknown config variant {arg!r}; use any of {VARIANTS}, comma-separated, or none."
        )
    config = common.get_config("tiny" if "tiny" in variants else None)
    config.data = default_data_config("csv" if "csv" in variants else "folder")
    # train/val exist for a class-per-folder dataset (carved) and for train.csv + val.csv or a
    # train_val.csv; a test split is the user's to name.
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.model.num_classes = 2  # replaced by the class count of the training split
    if "tiny" in variants:
        # The shared :tiny is a one-epoch smoke run; on one's own images the small model should
        # learn: 30 epochs at a from-scratch rate (seconds per epoch for a few hundred images).
        config.train.epochs = 30
        config.train.log_every_steps = 20
        config.optim.update(lr=1e-3, warmup_epochs=2)
    return config
