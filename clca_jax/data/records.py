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
    """Decodes a record into an RGB PIL image.

    Grayscale, palette, CMYK and alpha images are converted as PIL's `convert("RGB")` does (the
    reference's loader); the EXIF orientation tag is not applied, as there. Pixels of more than
    8 bits are scaled, see `to_rgb`.

    Args:
      record: the record to decode.

    Returns:
      The fully loaded RGB image.
    """
    try:
        if isinstance(record.image, np.ndarray):
            return to_rgb(Image.fromarray(record.image))
        with Image.open(io.BytesIO(record.image)) as image:
            # convert() loads the pixels, so truncated files fail here and not later.
            return to_rgb(image)
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as err:
        raise BadImageError(record.name, str(err)) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB, scaling pixels of more than 8 bits.

    PIL's `convert("RGB")` clips high-bit-depth grayscale to 255 instead of scaling it, so:

    * 16-bit unsigned grayscale (`I;16*`, e.g. 16-bit PNG and TIFF) maps 0..65535 onto
      0..255 (value / 257, rounded). PIL already reads 16-bit RGB(A) PNGs as 8-bit.
    * floating point (`F`) with every value in 0..1 maps onto 0..255 (value * 255, rounded).
    * signed or 32-bit integer (`I`) and floating point outside 0..1 have no standard 8-bit
      scale and are refused (ValueError naming the value range).

    Args:
      image: an opened PIL image.

    Returns:
      The loaded RGB image.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image)
        low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
        if image.mode.startswith("I;16") and pixels.dtype.kind == "u":
            return Image.fromarray(np.round(pixels / 257.0).astype(np.uint8)).convert("RGB")
        if image.mode == "F" and np.isfinite(pixels).all() and 0 <= low and high <= 1:
            return Image.fromarray(np.round(pixels * 255.0).astype(np.uint8)).convert("RGB")
        kind = "floating-point" if image.mode == "F" else "signed or 32-bit integer"
        raise ValueError(
            f"{kind} pixels (PIL mode {image.mode}, values {low}..{high}) have no standard 8-bit "
            "scale; save the image as 8-bit or 16-bit unsigned (or floating point in 0..1)"
        )
    return image.convert("RGB")


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
            reason = str(err)
            if os.path.islink(full_path):
                reason = f"broken symbolic link to {os.readlink(full_path)!r} ({err.strerror})"
            raise BadImageError(full_path, reason) from err
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
