"""Mixup and CutMix of a global batch, inside the jitted train step.

The batch-level mixing of timm's `Mixup` (mode `batch`, `correct_lam=True`): one lambda per
step from Beta(alpha, alpha); example i is mixed with example B-1-i of the global batch (the
batch flipped); with probability `prob` the step mixes at all, and when both alphas are set,
CutMix is chosen with probability `switch_prob`. CutMix pastes the flipped batch's box of side
int(S sqrt(1 - lambda)) around a uniform centre, clipped to the image, and lambda becomes one
minus the box's share of the image. The targets are `lambda one_hot(y) + (1 - lambda)
one_hot(flip(y))`; label smoothing is the loss's.

The draws come from the step's key (see `clca_jax.train.train_step`), and the mixing sees the
whole global batch, so it is the same for any number of processes and devices and repeats on
resume.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Mixup:
    """Settings of batch mixing (`config.train.mixup`).

    Attributes:
      mixup_alpha: Beta parameter of Mixup's lambda; 0 = no Mixup.
      cutmix_alpha: Beta parameter of CutMix's lambda; 0 = no CutMix.
      prob: probability that a step mixes.
      switch_prob: probability of CutMix over Mixup when both alphas are > 0.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5


def default_mixup_config() -> ml_collections.ConfigDict:
    """The `config.train.mixup` defaults: off (both alphas 0), timm's probabilities."""
    return ml_collections.ConfigDict(
        {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}
    )


def from_config(section: ml_collections.ConfigDict) -> Mixup | None:
    """The mixing `config.train.mixup` asks for, or None when both alphas are 0."""
    mixup = Mixup(**{f.name: float(section[f.name]) for f in dataclasses.fields(Mixup)})
    return mixup if mixup.mixup_alpha > 0 or mixup.cutmix_alpha > 0 else None


def validate_mixup_config(section: ml_collections.ConfigDict) -> None:
    """Checks `config.train.mixup`; raises ValueError naming the field."""
    for field in ("mixup_alpha", "cutmix_alpha"):
        value = section[field]
        if not _is_number(value) or value < 0:
            raise ValueError(
                f"train.mixup.{field} must be a finite number >= 0 (0 = off), got {value!r}."
            )
    for field in ("prob", "switch_prob"):
        value = section[field]
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"train.mixup.{field} must be a probability in [0, 1], got {value!r}.")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cutmix_box(lam, center_y, center_x, height: int, width: int):
    """timm's `rand_bbox` and its lambda correction, given the drawn centre.

    Args:
      lam: lambda drawn from Beta(cutmix_alpha, cutmix_alpha).
      center_y, center_x: the box centre, uniform in [0, height) and [0, width).
      height, width: image size.

    Returns:
      (top, bottom, left, right) of the box, bottom and right exclusive, and the corrected
      lambda `1 - box area / image area`.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    top = jnp.clip(center_y - cut_h // 2, 0, height)
    bottom = jnp.clip(center_y + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(center_x - cut_w // 2, 0, width)
    right = jnp.clip(center_x + (cut_w + 1) // 2, 0, width)
    area = (bottom - top) * (right - left)
    return (top, bottom, left, right), 1.0 - area.astype(jnp.float32) / (height * width)


def mixup_images(images: jax.Array, lam) -> jax.Array:
    """lam x + (1 - lam) flip(x) over the batch axis."""
    lam = jnp.asarray(lam, images.dtype)
    return images * lam + images[::-1] * (1 - lam)


def cutmix_images(images: jax.Array, box) -> jax.Array:
    """`images` with the box [top, bottom) x [left, right) taken from the flipped batch."""
    top, bottom, left, right = box
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return jnp.where(inside[None, :, :, None], images[::-1], images)


def mix_targets(labels: jax.Array, num_classes: int, lam) -> jax.Array:
    """lam one_hot(y) + (1 - lam) one_hot(flip(y)), float32 [B, num_classes]."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * lam + one_hot[::-1] * (1 - lam)


def mix_batch(images: jax.Array, labels: jax.Array, num_classes: int, key, mixup: Mixup):
    """Mixup or CutMix of a global batch with one lambda, as timm's `Mixup` in batch mode.

    Args:
      images: [B, H, W, C].
      labels: int [B].
      num_classes: width of the targets.
      key: this step's key.
      mixup: the settings (at least one alpha > 0).

    Returns:
      (mixed images, soft targets float32 [B, num_classes] summing to 1 per row).
    """
    apply_key, switch_key, lam_key, y_key, x_key = jax.random.split(key, 5)
    height, width = images.shape[1], images.shape[2]
    apply = jax.random.uniform(apply_key) < mixup.prob
    if mixup.mixup_alpha > 0 and mixup.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < mixup.switch_prob
    else:
        use_cutmix = jnp.asarray(mixup.cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, mixup.cutmix_alpha, mixup.mixup_alpha)
    # Beta(0, 0) is undefined; the branch of a zero alpha is never selected.
    lam = jax.random.beta(lam_key, jnp.maximum(alpha, 1e-6), jnp.maximum(alpha, 1e-6))
    center_y = jax.random.randint(y_key, (), 0, height)
    center_x = jax.random.randint(x_key, (), 0, width)
    box, box_lam = cutmix_box(lam, center_y, center_x, height, width)
    mixed = jnp.where(use_cutmix, cutmix_images(images, box), mixup_images(images, lam))
    lam = jnp.where(use_cutmix, box_lam, lam)
    targets = mix_targets(labels, num_classes, lam)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return jnp.where(apply, mixed, images), jnp.where(apply, targets, one_hot)
