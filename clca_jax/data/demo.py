"""Demo data: the real animal silhouettes shipped by the `animal-mnist` package.

The package holds 10,000 grayscale 28x28 images of 10 animals (1,000 each) as two gzip'd
pickles. Its own loader imports TensorFlow, so the package is installed with `--no-deps` and
its files are read here directly: the package folder is located with `importlib.util.find_spec`
(which does not run the package's `__init__`) and the pickles are opened with an unpickler
that only accepts NumPy arrays.

284 images are exact pixel copies of an earlier one (always of the same class); they are
dropped, first occurrence kept, before splitting so that no image sits in both splits. The
remaining 9,716 images are split per class in file order, the first 80 % for `train` and the
rest for `test` (the carve of spec 6.3), which gives 7,769 / 1,947 images.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

from clca_jax.data import records, splits
from clca_jax.data.splits import DataError

CLASS_NAMES = [
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
]
SPLITS = ("train", "test")
_DATA_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
_INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"


def load_demo(train_split: str = "train", eval_split: str = "test") -> records.LoadedData:
    """Returns the demo's train and eval sources.

    Args:
      train_split: `train` or `test`.
      eval_split: `train` or `test`.

    Returns:
      The two splits, 10 classes, the animal names.
    """
    for name in (train_split, eval_split):
        if name not in SPLITS:
            raise DataError(
                f"demo data has no split {name!r}; its splits are {list(SPLITS)}. "
                "Set data.train_split / data.eval_split to one of them."
            )
    images, labels = demo_splits()
    sources = {
        name: records.ArraySource(images[name], labels[name], f"animal-mnist {name}")
        for name in SPLITS
    }
    return records.LoadedData(sources[train_split], sources[eval_split], 10, list(CLASS_NAMES))


@functools.cache
def demo_splits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Loads, de-duplicates and splits the demo images once per process.

    Returns:
      `(images, labels)`, each a dict by split name; images are uint8 [N, 28, 28].
    """
    images, labels = load_animal_mnist()
    keep = first_occurrences(images)
    images, labels = images[keep], labels[keep]
    rows = [(str(i), int(label)) for i, label in enumerate(labels)]
    train, test = splits.carve_train_val(rows)
    by_split = {"train": train, "test": test}
    index = {name: np.array([int(i) for i, _ in rows], np.int64) for name, rows in by_split.items()}
    return (
        {name: images[idx] for name, idx in index.items()},
        {name: labels[idx] for name, idx in index.items()},
    )


def first_occurrences(images: np.ndarray) -> np.ndarray:
    """Indices of the images that are not an exact copy of an earlier image, in order.

    Args:
      images: uint8 array [N, ...].

    Returns:
      Sorted int array of the indices to keep.
    """
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Reads the package's images and labels without importing the package.

    Returns:
      `(images, labels)`: uint8 [10000, 28, 28] and int64 [10000].
    """
    data_dir = os.path.join(_package_dir(), "data", "Animal_MNIST")
    paths = [os.path.join(data_dir, name) for name in _DATA_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"animal-mnist data files missing: {missing}. Reinstall: {_INSTALL_HINT}")
    images, labels = (_load_array(p) for p in paths)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataError(
            f"animal-mnist data has shapes {images.shape} / {labels.shape}, expected "
            f"(10000, 28, 28) / (10000,). Install the pinned version: {_INSTALL_HINT}"
        )
    return images.astype(np.uint8), labels.astype(np.int64)


def _package_dir() -> str:
    """The installed `animal_mnist` folder, found without running its `__init__`."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the demo data needs the `animal-mnist` package, which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    return list(spec.submodule_search_locations)[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild NumPy arrays, so the data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in demo data")
        # Files written by NumPy 1 name `numpy.core`, an alias that NumPy 2 warns about.
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _load_array(path: str) -> np.ndarray:
    """Reads one gzip'd pickled array."""
    with gzip.open(path, "rb") as f:
        return np.asarray(_ArrayUnpickler(f).load())
