"""Datasets and input pipeline of clca_jax.

The configuration is `config.data`, an `ml_collections.ConfigDict` (see `default_data_config`):

* `name`: `demo` (animal silhouettes shipped by `animal-mnist`), `folder` (one sub-folder per
  class, see `folder.py`), `csv` (`<split>.csv` files with `dir,class_id`), or a leaf dataset of
  the paper: `cotton`, `soylocal`, `soygene`, `soyageing`, `soyglobal` (TFDS builders in
  `ufgir.py`, prepared on first use).
* `dir`: the dataset folder; for leaf datasets the manual directory with the images and CSV
  files; unused by `demo`.
* `train_split`, `eval_split`: split names (`train`, `val`, `train_val`, `test`, or a sub-split
  such as `train_val_R1`); `train`/`val` are carved from `train_val` where they do not exist.
* `skip_bad_images`: leave out (and log) undecodable images instead of stopping.
* `tfds_dir`: where leaf datasets are prepared (default `~/tensorflow_datasets`); prepared data
  is used while `dir` holds the files it was made from, and prepared again when they change.
* `image_folder`: csv route only, sub-folder of `dir` the CSV paths start from.
* `check_published_counts`: leaf datasets only, compare counts with the published figures.
* `num_threads`: reading threads per process (0 = one per core); `prefetch_batches`: batches
  read ahead.
* `augment`: RandAugment / TrivialAugmentWide and random erasing of training images, all off
  by default (`augment.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from clca_jax.data import augment, demo, folder, ufgir
from clca_jax.data.pipeline import EvalLoader, TrainLoader, normalization
from clca_jax.data.records import BadImageError, LoadedData
from clca_jax.data.splits import DataError
from clca_jax.normalization import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    NORMALIZATION,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "NORMALIZATION",
    "BadImageError",
    "DataError",
    "DatasetInfo",
    "EvalLoader",
    "TrainLoader",
    "dataset_info",
    "default_data_config",
    "load_data",
    "make_eval_loader",
    "make_train_loader",
    "normalization",
    "validate_data_config",
]

DATASET_NAMES = ("demo", "folder", "csv", *ufgir.LEAF_DATASETS)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about the data.

    Attributes:
      num_classes: class count (distinct class ids of the training split).
      num_train: examples in the training split.
      num_eval: examples in the evaluation split.
      class_names: names by class id, or None when the data has none.
    """

    num_classes: int
    num_train: int
    num_eval: int
    class_names: list[str] | None


def default_data_config(name: str = "demo") -> ml_collections.ConfigDict:
    """The `config.data` defaults for a dataset.

    Args:
      name: one of `DATASET_NAMES`.

    Returns:
      A ConfigDict; leaf datasets and `csv` train on `train_val` and evaluate on `test` (the
      reference's `--train_trainval`), `folder` on the 80/20 carve, `demo` on its own split.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data.name {name!r}; choose one of {list(DATASET_NAMES)}.")
    train_split, eval_split = {"demo": ("train", "test"), "folder": ("train", "val")}.get(
        name, ("train_val", "test")
    )
    return ml_collections.ConfigDict(
        {
            "name": name,
            "dir": "",
            "train_split": train_split,
            "eval_split": eval_split,
            "skip_bad_images": False,
            "tfds_dir": "~/tensorflow_datasets",
            "image_folder": "",
            "check_published_counts": True,
            "num_threads": 0,
            "prefetch_batches": 2,
            "augment": augment.default_augment_config(),
        }
    )


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Checks `config.data` before anything is read; raises `DataError` naming the field."""
    if config.name not in DATASET_NAMES:
        raise DataError(f"data.name = {config.name!r} is unknown; choose one of {DATASET_NAMES}.")
    if config.name != "demo" and not config.get("dir"):
        raise DataError(f"data.dir is empty; data.name={config.name!r} needs the dataset folder.")
    for field in ("train_split", "eval_split"):
        if not config.get(field):
            raise DataError(f"data.{field} is empty; set it to a split name such as 'train'.")
    if config.get("num_threads", 0) < 0 or config.get("prefetch_batches", 2) < 1:
        raise DataError(
            f"data.num_threads={config.get('num_threads')} must be >= 0 and "
            f"data.prefetch_batches={config.get('prefetch_batches')} >= 1."
        )
    if config.get("augment") is not None:
        augment.validate_augment_config(config.augment)


def load_data(config: ml_collections.ConfigDict) -> LoadedData:
    """The train and eval sources named by `config.data` (cached per configuration)."""
    validate_data_config(config)
    defaults = default_data_config(config.name)
    # The augmentation does not change the sources (and is not hashable).
    fields = {k: config.get(k, defaults[k]) for k in defaults if k != "augment"}
    return _load_cached(tuple(sorted(fields.items())))


@functools.lru_cache(maxsize=8)
def _load_cached(fields: tuple[tuple[str, object], ...]) -> LoadedData:
    """Builds the sources once per distinct configuration (scans and CSVs are not free)."""
    c = dict(fields)
    name, skip = c["name"], bool(c["skip_bad_images"])
    if name == "demo":
        return demo.load_demo(c["train_split"], c["eval_split"])
    if name == "folder":
        return folder.load_folder(c["dir"], c["train_split"], c["eval_split"], skip)
    if name == "csv":
        return folder.load_csv(c["dir"], c["train_split"], c["eval_split"], c["image_folder"], skip)
    return ufgir.load_leaf(
        name,
        c["dir"],
        c["tfds_dir"],
        c["train_split"],
        c["eval_split"],
        skip,
        bool(c["check_published_counts"]),
    )


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class count, split sizes and class names of `config.data`."""
    data = load_data(config)
    return DatasetInfo(data.num_classes, len(data.train), len(data.eval), data.class_names)


def make_train_loader(
    config: ml_collections.ConfigDict,
    *,
    img_size: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> TrainLoader:
    """Endless training stream of this process's share of each global batch.

    Args:
      config: `config.data`.
      img_size: output side S.
      global_batch_size: examples per step over all processes.
      seed: seed of the order and the augmentation.
      process_index: this process (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      mean: per-channel mean, 0..1 scale.
      std: per-channel std, 0..1 scale.

    Returns:
      A `TrainLoader`: dicts `image` float32 [b, S, S, 3], `label` int32 [b] with
      b = global_batch_size // process_count; `get_state()` / `set_state()` resume it and
      `steps_per_epoch` is the global step count of an epoch.
    """
    data = load_data(config)
    return TrainLoader(
        data.train,
        img_size=img_size,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        mean=mean,
        std=std,
        num_threads=config.get("num_threads", 0),
        prefetch_batches=config.get("prefetch_batches", 2),
        augmentation=augment.from_config(config.get("augment")),
    )


def make_eval_loader(
    config: ml_collections.ConfigDict,
    *,
    img_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> EvalLoader:
    """One pass over the evaluation split, this process's share, padding masked.

    Args:
      config: `config.data`.
      img_size: output side S.
      global_batch_size: examples per step over all processes.
      process_index: this process.
      process_count: number of processes.
      mean: per-channel mean, 0..1 scale.
      std: per-channel std, 0..1 scale.

    Returns:
      An `EvalLoader` (re-iterable, `len()` batches): dicts `image`, `label` and `mask` bool [b],
      False on padding.
    """
    data = load_data(config)
    return EvalLoader(
        data.eval,
        img_size=img_size,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        mean=mean,
        std=std,
        num_threads=config.get("num_threads", 0),
        prefetch_batches=config.get("prefetch_batches", 2),
    )
