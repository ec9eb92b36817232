"""Automatic augmentation and random erasing of training images, on the host.

`config.data.augment` (see `default_augment_config`) turns them on; all are off by default,
which leaves the pipeline exactly as it was (no extra draws from the example's generator).

* RandAugment and TrivialAugmentWide are torchvision's (`transforms.RandAugment`,
  `transforms.TrivialAugmentWide`): the same 14 operations in the same order, the same
  magnitude tables (`num_magnitude_bins` bins), nearest-neighbour resampling and black fill.
  Each operation calls the PIL function torchvision calls on a PIL image, so it gives the same
  pixels; tests/test_augment_policies.py checks every one against torchvision. They run on the
  uint8 crop, after crop and flip and before normalisation.
* Random erasing is timm's `RandomErasing` in mode `pixel` (`--reprob`, `--remode pixel`,
  `--recount`): with probability `random_erasing_prob`, 1 to `random_erasing_count` boxes of
  random area and log-uniform aspect ratio (10 attempts each) filled with standard normal noise,
  on the normalised image.

Randomness is the example's generator (`pipeline.example_rng`, seeded by seed, epoch and
example), drawn after the crop and flip in torchvision's and timm's order: RandAugment draws
per operation the operation index, then the sign when the operation is signed; TrivialAugmentWide
draws the operation, then the magnitude bin when the operation has magnitudes, then the sign
when signed; random erasing draws the go/no-go, the count (only when it can exceed 1), then per
attempt the area and the aspect ratio, and for the box its top, left and fill.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from clca_jax.data.splits import DataError

BLACK = (0, 0, 0)
ERASE_ATTEMPTS = 10


def default_augment_config() -> ml_collections.ConfigDict:
    """The `config.data.augment` defaults: everything off (the paper's weak augmentation)."""
    return ml_collections.ConfigDict(
        {
            "rand_augment_ops": 0,
            "rand_augment_magnitude": 9,
            "trivial_augment": False,
            "num_magnitude_bins": 31,
            "random_erasing_prob": 0.0,
            "random_erasing_area": (0.02, 1 / 3),
            "random_erasing_aspect": (0.3, 1 / 0.3),
            "random_erasing_count": 1,
        }
    )


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The host augmentation of training images beyond crop and flip.

    Attributes:
      rand_augment_ops: RandAugment operations per image; 0 = no RandAugment.
      rand_augment_magnitude: RandAugment's magnitude bin, 0..num_magnitude_bins-1.
      trivial_augment: TrivialAugmentWide (one operation, random magnitude bin).
      num_magnitude_bins: bins of the magnitude tables of both policies.
      random_erasing_prob: probability of erasing; 0 = no random erasing.
      random_erasing_area: (min, max) erased fraction of the image (over all boxes).
      random_erasing_aspect: (min, max) aspect ratio h / w of a box, sampled log-uniformly.
      random_erasing_count: most boxes per image (1 to this many, uniformly).
    """

    rand_augment_ops: int = 0
    rand_augment_magnitude: int = 9
    trivial_augment: bool = False
    num_magnitude_bins: int = 31
    random_erasing_prob: float = 0.0
    random_erasing_area: tuple[float, float] = (0.02, 1 / 3)
    random_erasing_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    random_erasing_count: int = 1

    @property
    def has_policy(self) -> bool:
        return self.rand_augment_ops > 0 or self.trivial_augment

    @property
    def erases(self) -> bool:
        return self.random_erasing_prob > 0

    @property
    def is_on(self) -> bool:
        return self.has_policy or self.erases


def from_config(section: ml_collections.ConfigDict | None) -> Augmentation | None:
    """The augmentation `config.data.augment` describes, or None when it does nothing."""
    if section is None:
        return None
    fields = {f.name for f in dataclasses.fields(Augmentation)}
    values = {k: section[k] for k in section.keys() if k in fields}
    for name in ("random_erasing_area", "random_erasing_aspect"):
        if name in values:
            values[name] = tuple(float(v) for v in values[name])
    augmentation = Augmentation(**values)
    return augmentation if augmentation.is_on else None


def validate_augment_config(section: ml_collections.ConfigDict) -> None:
    """Checks `config.data.augment`; raises `DataError` naming the field."""
    prefix = "data.augment"
    for field, low in (("rand_augment_ops", 0), ("num_magnitude_bins", 2)):
        value = section[field]
        if not _is_int(value) or value < low:
            raise DataError(f"{prefix}.{field} must be an integer >= {low}, got {value!r}.")
    bins, magnitude = section.num_magnitude_bins, section.rand_augment_magnitude
    if not _is_int(magnitude) or not 0 <= magnitude < bins:
        raise DataError(
            f"{prefix}.rand_augment_magnitude must be an integer bin in 0..{bins - 1} "
            f"(num_magnitude_bins={bins}), got {magnitude!r}."
        )
    if not isinstance(section.trivial_augment, bool):
        raise DataError(
            f"{prefix}.trivial_augment must be True or False, got {section.trivial_augment!r}."
        )
    if section.trivial_augment and section.rand_augment_ops:
        raise DataError(
            f"{prefix}.trivial_augment=True and {prefix}.rand_augment_ops="
            f"{section.rand_augment_ops} both choose a policy; set one of them (ops 0 or False)."
        )
    prob = section.random_erasing_prob
    if not _is_number(prob) or not 0 <= prob <= 1:
        raise DataError(f"{prefix}.random_erasing_prob must be in [0, 1], got {prob!r}.")
    _check_range(section, "random_erasing_area", 1.0, prefix)
    _check_range(section, "random_erasing_aspect", math.inf, prefix)
    count = section.random_erasing_count
    if not _is_int(count) or count < 1:
        raise DataError(f"{prefix}.random_erasing_count must be an integer >= 1, got {count!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(section, field: str, high: float, prefix: str) -> None:
    value = section[field]
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(_is_number(v) for v in value)
        and 0 < value[0] <= value[1] <= high
    )
    if not ok:
        bound = "" if math.isinf(high) else f" <= {high:g}"
        raise DataError(
            f"{prefix}.{field} must be (min, max) with 0 < min <= max{bound}, got {value!r}."
        )


# ----------------------------------------------------------------------------------------------
# Operations: (PIL image, magnitude) -> PIL image, as torchvision's `_apply_op` on PIL images.


def _affine(image: Image.Image, inverse: tuple[float, ...]) -> Image.Image:
    """PIL's affine warp by the output-to-input matrix, nearest neighbour, black outside."""
    return image.transform(image.size, Image.AFFINE, inverse, Image.NEAREST, fillcolor=BLACK)


def _shear_angle(magnitude: float) -> float:
    # torchvision passes the shear as degrees(atan(m)) and converts back to radians; the round
    # trip is kept so the warp's coefficients are the same floats.
    return math.radians(math.degrees(math.atan(magnitude)))


def shear_x(image: Image.Image, magnitude: float) -> Image.Image:
    """x' = x + m y about the top-left corner."""
    return _affine(image, (1.0, math.tan(_shear_angle(magnitude)), 0.0, 0.0, 1.0, 0.0))


def shear_y(image: Image.Image, magnitude: float) -> Image.Image:
    """y' = y + m x about the top-left corner."""
    angle = _shear_angle(magnitude)
    return _affine(image, (1.0, 0.0, 0.0, math.sin(angle) / math.cos(angle), 1.0, 0.0))


def translate_x(image: Image.Image, magnitude: float) -> Image.Image:
    """Shift right by int(m) pixels (left when negative)."""
    return _affine(image, (1.0, 0.0, -float(int(magnitude)), 0.0, 1.0, 0.0))


def translate_y(image: Image.Image, magnitude: float) -> Image.Image:
    """Shift down by int(m) pixels (up when negative)."""
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(magnitude))))


def rotate(image: Image.Image, magnitude: float) -> Image.Image:
    """Counter-clockwise rotation by m degrees about the centre, same size."""
    return image.rotate(magnitude, Image.NEAREST, expand=False, fillcolor=BLACK)


def brightness(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.0 + magnitude)


def color(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Color(image).enhance(1.0 + magnitude)


def contrast(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(1.0 + magnitude)


def sharpness(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)


def posterize(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.posterize(image, int(magnitude))


def solarize(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.solarize(image, magnitude)


def autocontrast(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.autocontrast(image)


def equalize(image: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.equalize(image)


def identity(image: Image.Image, magnitude: float) -> Image.Image:
    return image


OPERATIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "Identity": identity,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
}


# ----------------------------------------------------------------------------------------------
# Magnitude tables: (name, magnitudes or None, signed), in torchvision's operation order.

Space = tuple[tuple[str, np.ndarray | None, bool], ...]


def _linspace(start: float, stop: float, bins: int) -> np.ndarray:
    """torch.linspace in float32, whose values the operations receive.

    torch's CPU kernel steps up from `start` for the first half and down from `stop` for the
    second, each as one fused multiply-add of float32 values; the product of two float32 values
    is exact in float64, so float64 arithmetic rounded once to float32 gives the same numbers
    (numpy's float64 linspace, or float32 arithmetic, differs in the last bit).
    """
    first, last = np.float32(start), np.float32(stop)
    step = np.float64((last - first) / np.float32(bins - 1))
    index = np.arange(bins)
    up = np.float64(first) + step * index
    down = np.float64(last) - step * (bins - 1 - index)
    return np.where(index < bins // 2, up, down).astype(np.float32)


def _posterize_bits(bins: int, max_drop: int) -> np.ndarray:
    # 8 - round(i / ((bins - 1) / max_drop)), divided in float32 and rounded half to even.
    steps = np.arange(bins, dtype=np.float32) / np.float32((bins - 1) / max_drop)
    return 8 - np.round(steps).astype(np.int32)


def _space(
    bins: int,
    shear: float,
    translate: tuple[float, float],
    rotate_deg: float,
    enhance: float,
    posterize_drop: int,
) -> Space:
    return (
        ("Identity", None, False),
        ("ShearX", _linspace(0.0, shear, bins), True),
        ("ShearY", _linspace(0.0, shear, bins), True),
        ("TranslateX", _linspace(0.0, translate[0], bins), True),
        ("TranslateY", _linspace(0.0, translate[1], bins), True),
        ("Rotate", _linspace(0.0, rotate_deg, bins), True),
        ("Brightness", _linspace(0.0, enhance, bins), True),
        ("Color", _linspace(0.0, enhance, bins), True),
        ("Contrast", _linspace(0.0, enhance, bins), True),
        ("Sharpness", _linspace(0.0, enhance, bins), True),
        ("Posterize", _posterize_bits(bins, posterize_drop), False),
        ("Solarize", _linspace(255.0, 0.0, bins), False),
        ("AutoContrast", None, False),
        ("Equalize", None, False),
    )


@functools.lru_cache(maxsize=8)
def rand_augment_space(bins: int, height: int, width: int) -> Space:
    """RandAugment's table: shear 0.3, translation 150/331 of the side, 30 degrees, enhancement
    0.9, posterize down to 4 bits."""
    translate = (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    return _space(bins, 0.3, translate, 30.0, 0.9, 4)


@functools.lru_cache(maxsize=8)
def trivial_augment_space(bins: int) -> Space:
    """TrivialAugmentWide's table: shear 0.99, 32 pixels, 135 degrees, enhancement 0.99,
    posterize down to 2 bits."""
    return _space(bins, 0.99, (32.0, 32.0), 135.0, 0.99, 6)


def _signed(magnitude: float, signed: bool, rng: np.random.Generator) -> float:
    # The sign is drawn only for signed operations, as torchvision's `signed and randint(2)`.
    return -magnitude if signed and rng.integers(2) else magnitude


def rand_augment(
    image: Image.Image, rng: np.random.Generator, num_ops: int, magnitude: int, bins: int
) -> Image.Image:
    """`num_ops` operations drawn uniformly (with repetition), each at bin `magnitude`."""
    space = rand_augment_space(bins, image.height, image.width)
    for _ in range(num_ops):
        name, magnitudes, signed = space[rng.integers(len(space))]
        value = 0.0 if magnitudes is None else float(magnitudes[magnitude])
        image = OPERATIONS[name](image, _signed(value, signed, rng))
    return image


def trivial_augment(image: Image.Image, rng: np.random.Generator, bins: int) -> Image.Image:
    """One operation drawn uniformly, at a bin drawn uniformly."""
    name, magnitudes, signed = trivial_augment_space(bins)[rng.integers(len(OPERATIONS))]
    value = 0.0 if magnitudes is None else float(magnitudes[rng.integers(len(magnitudes))])
    return OPERATIONS[name](image, _signed(value, signed, rng))


def apply_policy(pixels: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """RandAugment or TrivialAugmentWide on a uint8 [H, W, 3] image (returned as such)."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if aug.trivial_augment:
        image = trivial_augment(image, rng, aug.num_magnitude_bins)
    else:
        image = rand_augment(
            image, rng, aug.rand_augment_ops, aug.rand_augment_magnitude, aug.num_magnitude_bins
        )
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------
# Random erasing.


def random_erase(image: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """timm's RandomErasing (mode `pixel`) on a normalised float32 [H, W, C] image, in place.

    Returns:
      `image`, with 0 to `random_erasing_count` boxes replaced by standard normal noise.
    """
    if rng.random() > aug.random_erasing_prob:
        return image
    height, width, channels = image.shape
    count = aug.random_erasing_count
    if count > 1:
        count = int(rng.integers(1, count + 1))
    log_aspect = tuple(math.log(a) for a in aug.random_erasing_aspect)
    for _ in range(count):
        for _ in range(ERASE_ATTEMPTS):
            area = rng.uniform(*aug.random_erasing_area) * height * width / count
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                image[top : top + h, left : left + w] = rng.standard_normal(
                    (h, w, channels), dtype=np.float32
                )
                break
    return image
