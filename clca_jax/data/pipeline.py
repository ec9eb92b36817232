"""Input pipeline: decode, resize, crop, flip, normalise, batch, shard across processes.

Preprocessing follows spec 6.2. Training: square bicubic resize to R = int(S / 0.875) (PIL,
as torchvision's Resize does on PIL images), random S x S crop, horizontal flip with
probability 0.5. Evaluation: the same resize, then the centre crop at offset
`int(round((R - S) / 2))` (torchvision's CenterCrop). Images are converted to RGB first and
come out as float32 NHWC, normalised with ImageNet mean/std unless told otherwise
(`model.normalization`, resolved by `clca_jax.models.config.input_normalization`).

Order and randomness are pure functions of the seed, so they do not depend on the number of
processes, threads or restarts:

* epoch e visits the training set in the order `permutation(seed, e)`; global step k of the
  epoch takes positions `[k*B, (k+1)*B)` of it (B = global batch, the remainder is dropped)
  and process p takes the slice `[p*b, (p+1)*b)` of that global batch (b = B / processes).
  The processes' shares are disjoint, and the global batch is the same for any process count;
* the crop offsets and the flip of an example, and its RandAugment / TrivialAugmentWide and
  random erasing draws when those are on (`augment.py`), come from a generator seeded with
  `(seed, epoch, example index)`;
* the loader's state is the number of global steps taken. `get_state()` returns it (with the
  settings it depends on) as a small JSON-able dict; `set_state()` restarts the stream at that
  step, so a resumed run sees exactly the batches an uninterrupted run would, even on a
  different number of processes.

Reading uses `grain` (MapDataset -> IterDataset with a thread pool and a bounded prefetch
buffer). Grain's random-access `MapDataset` lets the stream be a map from a position to an
example, which is exactly the deterministic indexing above, and its threads overlap PIL
decoding and resizing (which release the GIL) on the host's cores. The stream position is kept
by the loader itself rather than through grain's iterator state, because the step count stays
meaningful across process counts and grain versions while grain's per-process state does not.

Evaluation walks the split once in order: global batch k holds examples `[k*B, (k+1)*B)`,
process p its slice of it, and positions past the end are padding with `mask=False`, so over
all processes every example is seen exactly once and every process runs the same number of
batches.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from clca_jax.data import augment, records
from clca_jax.data.splits import DataError
from clca_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION

CROP_FRACTION = 0.875


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of a backbone family: `imagenet` (default), `clip`, `inception` or
    `zero_one` (see `clca_jax.normalization`)."""
    if name not in NORMALIZATION:
        raise DataError(f"unknown normalisation {name!r}; choose one of {sorted(NORMALIZATION)}.")
    return NORMALIZATION[name]


def resize_size(img_size: int) -> int:
    """Side R of the square resize before cropping S: int(S / 0.875), 512 for 448."""
    return int(img_size / CROP_FRACTION)


def center_offset(resized: int, img_size: int) -> int:
    """Top/left offset of the centre crop as torchvision's CenterCrop computes it."""
    return int(round((resized - img_size) / 2.0))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the training set."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one example in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to `size` x `size` (aspect ratio not kept, as in the reference)."""
    return np.asarray(image.resize((size, size), Image.BICUBIC))


def random_crop_flip(pixels: np.ndarray, img_size: int, rng: np.random.Generator) -> np.ndarray:
    """Random `img_size` square crop, then a horizontal flip with probability 0.5.

    Args:
      pixels: uint8 [R, R, 3].
      img_size: crop side S.
      rng: the example's generator; drawn in the order top, left, flip.

    Returns:
      uint8 [S, S, 3].
    """
    top = rng.integers(0, pixels.shape[0] - img_size + 1)
    left = rng.integers(0, pixels.shape[1] - img_size + 1)
    crop = pixels[top : top + img_size, left : left + img_size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def center_crop(pixels: np.ndarray, img_size: int) -> np.ndarray:
    """Centre `img_size` square crop of a square image."""
    offset = center_offset(pixels.shape[0], img_size)
    return pixels[offset : offset + img_size, offset : offset + img_size]


class Normalizer:
    """Maps uint8 RGB to float32 `(x / 255 - mean) / std` with one multiply-add.

    Attributes:
      scale: per-channel factor 1 / (255 std).
      offset: per-channel term -mean / std.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
            raise DataError(f"mean/std must be 3 values, std > 0; got mean={mean}, std={std}.")
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.astype(np.float32) * self.scale + self.offset


def preprocess_train(
    record: records.ImageRecord,
    img_size: int,
    rng: np.random.Generator,
    norm: Normalizer,
    augmentation: augment.Augmentation | None = None,
) -> np.ndarray:
    """Training view of one record: resize R, random crop S, flip, then the augmentation policy
    when set, normalise, then random erasing when set."""
    pixels = resize_square(records.decode_rgb(record), resize_size(img_size))
    pixels = random_crop_flip(pixels, img_size, rng)
    if augmentation is not None and augmentation.has_policy:
        pixels = augment.apply_policy(pixels, rng, augmentation)
    image = norm(pixels)
    if augmentation is not None and augmentation.erases:
        image = augment.random_erase(image, rng, augmentation)
    return image


def preprocess_eval(record: records.ImageRecord, img_size: int, norm: Normalizer) -> np.ndarray:
    """Evaluation view of one record: resize R, centre crop S, normalise."""
    pixels = resize_square(records.decode_rgb(record), resize_size(img_size))
    return norm(center_crop(pixels, img_size))


def check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the batch/process settings and returns the per-process batch size."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} is not in 0..process_count-1 "
            f"(process_count={process_count}); pass jax.process_index()/process_count()."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}; change the batch size."
        )
    return global_batch_size // process_count


def default_threads(num_threads: int) -> int:
    """Reading threads: the given count, or one per CPU core when 0."""
    return num_threads if num_threads > 0 else os.cpu_count() or 1


class TrainLoader:
    """Endless stream of training batches for one process, resumable from its state.

    Attributes:
      steps_per_epoch: global steps per epoch, `num_examples // global_batch_size`.
      local_batch_size: examples per batch on this process.
      step: global steps taken so far (the next batch is step `step`).
    """

    def __init__(
        self,
        source: records.RecordSource,
        *,
        img_size: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_threads: int = 0,
        prefetch_batches: int = 2,
        augmentation: augment.Augmentation | None = None,
    ):
        """Sets the loader up; nothing is read until the first batch.

        Args:
          source: the training records.
          img_size: output side S.
          global_batch_size: examples per step over all processes.
          seed: seed of the order and the augmentation.
          process_index: this process.
          process_count: number of processes sharing the batch.
          mean: per-channel mean (0..1 scale).
          std: per-channel std (0..1 scale).
          num_threads: reading threads; 0 = one per core.
          prefetch_batches: batches prepared ahead.
          augmentation: RandAugment / TrivialAugmentWide and random erasing; None = off.
        """
        self.local_batch_size = check_sharding(global_batch_size, process_index, process_count)
        self.num_examples = len(source)
        self.steps_per_epoch = self.num_examples // global_batch_size
        if self.steps_per_epoch < 1:
            raise DataError(
                f"global batch size {global_batch_size} is larger than the training split "
                f"({self.num_examples} examples), so an epoch has no full batch; use a smaller "
                "batch size."
            )
        self._source, self._img_size, self._seed = source, img_size, seed
        self._global_batch_size, self._process_index = global_batch_size, process_index
        self._norm = Normalizer(mean, std)
        self._augmentation = augmentation
        self._threads, self._prefetch = default_threads(num_threads), prefetch_batches
        self.step = 0
        self._iterator: Iterator | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start(self.step)
        batch = next(self._iterator)
        self.step += 1
        return batch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def get_state(self) -> dict[str, int]:
        """Position in the stream plus the settings it depends on (JSON-serialisable)."""
        return {
            "step": self.step,
            "seed": self._seed,
            "global_batch_size": self._global_batch_size,
            "num_examples": self.num_examples,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Continues the stream at `state['step']`, after checking the settings match."""
        current = self.get_state()
        differ = {
            k: (state.get(k), v) for k, v in current.items() if k != "step" and state.get(k) != v
        }
        if differ:
            raise DataError(
                "the saved input state was made with other settings (saved, now): "
                f"{differ}; the stream would differ. Resume with the same seed, global batch "
                "size and training split."
            )
        self.step = int(state["step"])
        self._iterator = None

    def _start(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        """A grain iterator producing this process's batches from global step `step` on."""
        start = step * self.local_batch_size
        options = grain.ReadOptions(
            num_threads=self._threads,
            prefetch_buffer_size=max(1, self._prefetch) * self.local_batch_size,
        )
        dataset = grain.MapDataset.range(start, 2**62).map(self._example)
        batched = dataset.to_iter_dataset(options).batch(self.local_batch_size, drop_remainder=True)
        return iter(batched)

    def _example(self, position: int) -> dict[str, np.ndarray]:
        """The example at `position` of this process's stream."""
        step, slot = divmod(position, self.local_batch_size)
        epoch, epoch_step = divmod(step, self.steps_per_epoch)
        order_position = (
            epoch_step * self._global_batch_size
            + self._process_index * self.local_batch_size
            + slot
        )
        index = int(epoch_permutation(self._seed, epoch, self.num_examples)[order_position])
        record = self._source[index]
        rng = example_rng(self._seed, epoch, index)
        image = preprocess_train(record, self._img_size, rng, self._norm, self._augmentation)
        return {"image": image, "label": np.int32(record.label)}


class EvalLoader:
    """One ordered pass over an evaluation split, padded so every process has equal batches.

    Attributes:
      num_batches: batches per pass on every process, `ceil(num_examples / global_batch)`.
      local_batch_size: examples per batch on this process.
    """

    def __init__(
        self,
        source: records.RecordSource,
        *,
        img_size: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_threads: int = 0,
        prefetch_batches: int = 2,
    ):
        """Sets the loader up; each `iter()` starts a new pass.

        Args:
          source: the evaluation records.
          img_size: output side S.
          global_batch_size: examples per step over all processes.
          process_index: this process.
          process_count: number of processes sharing the batch.
          mean: per-channel mean (0..1 scale).
          std: per-channel std (0..1 scale).
          num_threads: reading threads; 0 = one per core.
          prefetch_batches: batches prepared ahead.
        """
        self.local_batch_size = check_sharding(global_batch_size, process_index, process_count)
        self.num_examples = len(source)
        self.num_batches = math.ceil(self.num_examples / global_batch_size)
        self._source, self._img_size = source, img_size
        self._global_batch_size, self._process_index = global_batch_size, process_index
        self._norm = Normalizer(mean, std)
        self._threads, self._prefetch = default_threads(num_threads), prefetch_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        options = grain.ReadOptions(
            num_threads=self._threads,
            prefetch_buffer_size=max(1, self._prefetch) * self.local_batch_size,
        )
        dataset = grain.MapDataset.range(self.num_batches * self.local_batch_size)
        batched = dataset.map(self._example).to_iter_dataset(options).batch(self.local_batch_size)
        return iter(batched)

    def _example(self, position: int) -> dict[str, np.ndarray]:
        """The example (or padding) at `position` of this process's pass."""
        batch, slot = divmod(position, self.local_batch_size)
        index = batch * self._global_batch_size + self._process_index * self.local_batch_size + slot
        if index >= self.num_examples:
            size = self._img_size
            return {
                "image": np.zeros((size, size, 3), np.float32),
                "label": np.int32(0),
                "mask": np.bool_(False),
            }
        record = self._source[index]
        image = preprocess_eval(record, self._img_size, self._norm)
        return {"image": image, "label": np.int32(record.label), "mask": np.bool_(True)}
