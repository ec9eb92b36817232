"""The classification loss: cross-entropy on integer labels or soft targets, label smoothing.

Label smoothing follows timm and `torch.nn.functional.cross_entropy(label_smoothing=eps)`: the
target distribution becomes `target * (1 - eps) + eps / C` (optax's `smooth_labels`). Integer
labels without smoothing take optax's integer-label cross-entropy, the loss training has always
used, so the reference recipe's numbers do not change by a bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def targets_of(batch: dict) -> jax.Array:
    """What the loss compares the logits with: `batch['soft_label']` [B, C] (mixup and
    CutMix) when the batch has it, else the integer `batch['label']` [B]."""
    return batch["soft_label"] if "soft_label" in batch else batch["label"]


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy.

    Args:
      logits: float [B, C].
      targets: integer class indices [B], or float target distributions [B, C].
      label_smoothing: eps in [0, 1); 0 leaves the targets as they are.

    Returns:
      float32 [B].
    """
    num_classes = logits.shape[-1]
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    if integer and not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if integer:
        targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    if targets.shape != logits.shape:
        raise ValueError(
            f"soft targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}."
        )
    if label_smoothing:
        targets = optax.smooth_labels(targets.astype(jnp.float32), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
