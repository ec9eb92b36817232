"""Image records, the sources that serve them, and decoding to RGB.

A record carries either encoded bytes (files, prepared TFDS data) or a uint8 array (the demo
data), its label and a name (the file it came from) so that a decoding error can say which
file is broken.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import NamedTuple, Protocol

import numpy as np
from PIL import Image

from clca_jax.data.splits import DataError

# Extensions PIL reads that a class folder may hold; anything else in it is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ImageRecord(NamedTuple):
    """One example before decoding.

    Attributes:
      image: encoded image bytes, or a uint8 array [H, W] or [H, W, C].
      label: class id.
      name: where the image came from (file path), used in error messages.
    """

    image: bytes | np.ndarray
    label: int
    name: str


class RecordSource(Protocol):
    """Random access to the records of one split."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> ImageRecord: ...


@dataclasses.dataclass(frozen=True)
class LoadedData:
    """The two splits a run uses and what is known about the classes.

    Attributes:
      train: records of the training split.
      eval: records of the evaluation split.
      num_classes: class count (distinct class ids of the training split, spec 6.3).
      class_names: names by class id, where the data has them (class folders, demo).
    """

    train: RecordSource
    eval: RecordSource
    num_classes: int
    class_names: list[str] | None


class BadImageError(DataError):
    """An image file cannot be read or decoded.

    Attributes:
      path: the file (or record name) that failed.
      reason: what the reader said.
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot read or decode image {path}: {reason}. Replace or remove the file, or set "
            "data.skip_bad_images=True to leave unreadable images out (they are then listed "
            "in the log)."
        )


def decode_rgb(record: ImageRecord) -> Image.Image:
    """Decodes a record into an RGB PIL image; grayscale and palette images are converted.

    Args:
      record: the record to decode.

    Returns:
      The fully loaded RGB image.
    """
    if isinstance(record.image, np.ndarray):
        return Image.fromarray(record.image).convert("RGB")
    try:
        with Image.open(io.BytesIO(record.image)) as image:
            # convert() loads the pixels, so truncated files fail here and not later.
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(record.name, str(err)) from err


class FileSource:
    """Records read from image files under a root folder.

    Attributes:
      root: folder the relative paths start from.
      rows: `(relative_path, label)` pairs.
    """

    def __init__(self, root: str, rows: Sequence[tuple[str, int]]):
        self.root = root
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ImageRecord:
        path, label = self.rows[index]
        full_path = os.path.join(self.root, path)
        try:
            with open(full_path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadImageError(full_path, str(err)) from err
        return ImageRecord(data, label, full_path)


class ArraySource:
    """Records held in memory as uint8 arrays.

    Attributes:
      images: uint8 array [N, H, W] or [N, H, W, C].
      labels: int array [N].
      name: a name for the collection; record `i` is called `name[i]`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        self.images = images
        self.labels = labels
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> ImageRecord:
        return ImageRecord(self.images[index], int(self.labels[index]), f"{self.name}[{index}]")


def find_bad_images(
    count: int, read: Callable[[int], ImageRecord], num_threads: int = 0
) -> list[tuple[int, str, str]]:
    """Decodes every record once and returns the ones that fail.

    Args:
      count: number of records.
      read: returns record `i` (may itself raise `BadImageError` for unreadable files).
      num_threads: decoding threads; 0 means one per CPU core.

    Returns:
      `(index, name, reason)` for every record that cannot be decoded, in index order.
    """

    def check(index: int) -> tuple[int, str, str] | None:
        try:
            decode_rgb(read(index))
        except BadImageError as err:
            return index, err.path, err.reason
        return None

    with futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
        return [bad for bad in pool.map(check, range(count)) if bad is not None]


def log_skipped(bad: Sequence[tuple[int, str, str]], where: str) -> None:
    """Writes the skipped images to the log: the count, then one line per file."""
    if not bad:
        return
    logging.warning("skipping %d unreadable image(s) in %s:", len(bad), where)
    for _, name, reason in bad:
        logging.warning("  skipped %s (%s)", name, reason)
