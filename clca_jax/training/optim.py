"""AdamW with the reference's weight-decay mask and its per-epoch learning-rate schedule.

The reference (spec 6.1) uses timm's cosine scheduler stepped once per epoch, so the learning
rate is constant within an epoch: a linear warm-up from `warmup_lr`, then a cosine from `lr`
down to `min_lr` over `epochs - cooldown_epochs` epochs (the warm-up epochs are not subtracted
from the cosine), then `min_lr` for the cool-down.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaf names never decayed whatever their shape (spec 6.1's `no_weight_decay` set plus biases).
NO_DECAY_NAMES = frozenset({"bias", "pos_embed", "cls_token", "dist_token", "clr"})

Schedule = Callable[[jax.Array | int], jax.Array]


def epoch_learning_rate(optim: ml_collections.ConfigDict, epochs: int, epoch):
    """The learning rate of epoch `epoch` (0-based; a Python or JAX number).

    Args:
      optim: the `optim` config section.
      epochs: total epochs of the run, cool-down included.
      epoch: the epoch index.

    Returns:
      The learning rate, of the type `epoch` has.
    """
    cosine_epochs = max(epochs - optim.cooldown_epochs, 1)
    warmup = optim.warmup_lr + epoch * (optim.lr - optim.warmup_lr) / max(optim.warmup_epochs, 1)
    progress = jnp.minimum(epoch / cosine_epochs, 1.0)
    cosine = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(epoch < optim.warmup_epochs, warmup, cosine)


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, epochs: int, steps_per_epoch: int
) -> Schedule:
    """The optimizer step -> learning rate map, constant within each epoch."""

    def schedule(step):
        return epoch_learning_rate(optim, epochs, step // steps_per_epoch)

    return schedule


def weight_decay_mask(params, decay_clr: bool = False) -> dict:
    """True where AdamW decays: every parameter of 2 or more dimensions not named in
    `NO_DECAY_NAMES` (so 1-D weights, biases, position embeddings, class and CLR tokens are
    not decayed; kernels and SiT's [1, 1, 1] scale are).

    Args:
      params: the parameter tree.
      decay_clr: decay the CLR tokens too. The reference's plain ViT (no reduction) does, because
        its exclusion list misspells `clr`; its reduction models do not.
    """
    excluded = NO_DECAY_NAMES - {"clr"} if decay_clr else NO_DECAY_NAMES

    def decays(path, leaf) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return jnp.ndim(leaf) > 1 and name not in excluded

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    optim: ml_collections.ConfigDict, schedule: Schedule, decay_clr: bool = False
) -> optax.GradientTransformation:
    """AdamW (decoupled decay scaled by the learning rate, as torch's) with the decay mask.

    Args:
      optim: the `optim` config section; `grad_clip_norm > 0` clips by global norm first.
      schedule: the learning-rate schedule.
      decay_clr: see `weight_decay_mask`.
    """
    transform = optax.adamw(
        learning_rate=schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=functools.partial(weight_decay_mask, decay_clr=decay_clr),
    )
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), transform)
    return transform
