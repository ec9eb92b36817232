"""Tiny fabricated datasets in the real on-disk layouts, written with PIL.

For trying the pipeline, the notebooks and the tests without the real leaf datasets: random
images per class, the CSV split files and folder names of each dataset.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image


def write_image(path: str, seed: int, size: tuple[int, int] = (10, 12), mode: str = "RGB") -> None:
    """Writes a small random image; the format follows the extension.

    Args:
      path: file to write (folders are created).
      seed: makes the pixels unique per image.
      size: (width, height).
      mode: PIL mode, e.g. `RGB` or `L` for grayscale.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_corrupt(path: str) -> None:
    """Writes a file with an image extension whose content is not an image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")


def write_csv(path: str, rows: list[tuple[str, int]], class_first: bool = True) -> None:
    """Writes a split file; the real files put `class_id` first, so that is the default."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if class_first:
            writer.writerow(["class_id", "dir"])
            writer.writerows([(label, rel) for rel, label in rows])
        else:
            writer.writerow(["dir", "class_id"])
            writer.writerows(rows)


def class_folder_dataset(root: str, counts: list[int], ext: str = ".png") -> list[str]:
    """Writes `root/<class>/<i>.ext` with `counts[c]` images in class c; returns class names."""
    names = [f"class_{c:02d}" for c in range(len(counts))]
    for c, (name, n) in enumerate(zip(names, counts, strict=True)):
        for i in range(n):
            write_image(os.path.join(root, name, f"img_{i:03d}{ext}"), seed=1000 * c + i)
    return names


def leaf_rows(name: str, num_classes: int, per_class: int, split: str) -> list[tuple[str, int]]:
    """`(dir, class_id)` rows named the way each real leaf dataset names its files.

    Args:
      name: leaf dataset config name.
      num_classes: classes to fabricate.
      per_class: images per class in this split.
      split: `train` (for train_val) or `test`, used in the file names as the real data does.

    Returns:
      Rows grouped by class, as in the real CSV files.
    """
    rows = []
    for c in range(num_classes):
        for k in range(per_class):
            if name == "soyageing":
                stage = ("R1", "R3")[k % 2]
                rel = f"{stage}/images/yd{c:03d}_{stage}_{k}_{split}.png"
            elif name == "soygene":
                rel = f"{c + 1}_{k}_{split}.jpg"
            else:
                rel = f"{c + 1}_{k}_{split}.png"
            rows.append((rel, c))
    return rows


def leaf_dataset(
    manual_dir: str,
    name: str,
    image_folder: str,
    num_classes: int = 3,
    per_class: int = 5,
    with_train_val_files: bool = True,
) -> dict[str, list[tuple[str, int]]]:
    """Writes a leaf dataset in its real layout: images under `image_folder`, CSVs at the root.

    Returns:
      The split lists written, by split name.
    """
    lists = {
        "train_val": leaf_rows(name, num_classes, per_class, "train"),
        "test": leaf_rows(name, num_classes, 2, "test"),
    }
    if with_train_val_files:
        # The reference carve: first int(0.8 n) of each class to train.
        quota = int(0.8 * per_class)
        lists["train"] = [r for i, r in enumerate(lists["train_val"]) if i % per_class < quota]
        lists["val"] = [r for i, r in enumerate(lists["train_val"]) if i % per_class >= quota]
    for seed, (split, rows) in enumerate(lists.items()):
        write_csv(os.path.join(manual_dir, f"{split}.csv"), rows)
        for i, (rel, _) in enumerate(rows):
            path = os.path.join(manual_dir, image_folder, rel)
            if not os.path.exists(path):
                write_image(path, seed=seed * 10_000 + i)
    return lists
