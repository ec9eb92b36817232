"""The optimizer: AdamW with the reference's weight-decay mask and its per-epoch learning-rate
schedule by default; SGD, LAMB or Lion by name, layer-wise rates and backbone freezing on request.

The reference (spec 6.1) uses timm's cosine scheduler stepped once per epoch, so the learning
rate is constant within an epoch: a linear warm-up from `warmup_lr`, then a cosine from `lr`
down to `min_lr` over `epochs - cooldown_epochs` epochs (the warm-up epochs are not subtracted
from the cosine), then `min_lr` for the cool-down. `optim.schedule_unit='step'` evaluates the
same curve at the fractional epoch of every step (timm's `t_in_epochs=False`). A run shorter
than its warm-up plus cool-down gets both shortened in proportion (`fitted_warmup_cooldown`).

Layer-wise learning-rate decay and the backbone scale multiply each parameter's update after
the optimizer, which for every optimizer here equals a per-group learning rate (timm's
`param_groups_layer_decay`): block `i` of `depth` gets `layer_decay ** (depth - i)`, the
embeddings (patch embedding, class token, position embedding, `norm_pre`)
`layer_decay ** (depth + 1)`, the final norm and everything outside the backbone (classifier,
CLA/IFA head, CLR tokens, reduction modules) 1. `backbone_lr_scale` further multiplies the
embeddings, blocks and final norm.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaf names never decayed whatever their shape (spec 6.1's `no_weight_decay` set plus biases).
NO_DECAY_NAMES = frozenset({"bias", "pos_embed", "cls_token", "dist_token", "clr"})
OPTIMIZERS = ("adamw", "sgd", "lamb", "lion")
SCHEDULE_UNITS = ("epoch", "step")
ALWAYS_FROZEN = -1
# Top-level parameters of the backbone besides its blocks; the embeddings among them get the
# deepest layer-wise decay.
EMBEDDING_NAMES = frozenset({"patch_embed", "cls_token", "pos_embed", "dist_token", "norm_pre"})
BACKBONE_NAMES = EMBEDDING_NAMES | {"norm"}
_BLOCK = re.compile(r"blocks_(\d+)$")

Schedule = Callable[[jax.Array | int], jax.Array]


def fitted_warmup_cooldown(optim: ml_collections.ConfigDict, epochs: int) -> tuple[int, int]:
    """The warm-up and cool-down epochs a run of `epochs` uses: the configured ones when they
    fit, else both scaled by `epochs / (warmup + cooldown)` and rounded down."""
    warmup, cooldown = optim.warmup_epochs, optim.cooldown_epochs
    if warmup + cooldown <= epochs:
        return warmup, cooldown
    return warmup * epochs // (warmup + cooldown), cooldown * epochs // (warmup + cooldown)


def shortened_schedule_note(optim: ml_collections.ConfigDict, epochs: int) -> str | None:
    """The line to log when `fitted_warmup_cooldown` shortened the schedule, else None."""
    fitted = fitted_warmup_cooldown(optim, epochs)
    if fitted == (optim.warmup_epochs, optim.cooldown_epochs):
        return None
    return (
        f"optim.warmup_epochs={optim.warmup_epochs} and optim.cooldown_epochs="
        f"{optim.cooldown_epochs} do not fit in train.epochs={epochs}; shortened to "
        f"{fitted[0]} warm-up and {fitted[1]} cool-down epoch(s)."
    )


def epoch_learning_rate(optim: ml_collections.ConfigDict, epochs: int, epoch):
    """The learning rate of epoch `epoch` (0-based; a Python or JAX number).

    Args:
      optim: the `optim` config section.
      epochs: total epochs of the run, cool-down included.
      epoch: the epoch index.

    Returns:
      The learning rate, of the type `epoch` has.
    """
    warmup_epochs, cooldown_epochs = fitted_warmup_cooldown(optim, epochs)
    cosine_epochs = max(epochs - cooldown_epochs, 1)
    warmup = optim.warmup_lr + epoch * (optim.lr - optim.warmup_lr) / max(warmup_epochs, 1)
    progress = jnp.minimum(epoch / cosine_epochs, 1.0)
    cosine = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(epoch < warmup_epochs, warmup, cosine)


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, epochs: int, steps_per_epoch: int
) -> Schedule:
    """The optimizer step -> learning rate map: constant within each epoch
    (`schedule_unit='epoch'`), or at the step's fractional epoch (`'step'`)."""

    def schedule(step):
        if optim.schedule_unit == "step":
            return epoch_learning_rate(optim, epochs, step / steps_per_epoch)
        return epoch_learning_rate(optim, epochs, step // steps_per_epoch)

    return schedule


def _adamw(optim, schedule: Schedule, mask) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate=schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=mask,
    )


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
    transform = _adamw(optim, schedule, functools.partial(weight_decay_mask, decay_clr=decay_clr))
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), transform)
    return transform


def base_optimizer(
    optim: ml_collections.ConfigDict, schedule: Schedule, decay_clr: bool = False
) -> optax.GradientTransformation:
    """The optimizer `optim.name` names, with the weight-decay mask.

    adamw: `adamw` below. sgd: torch's SGD (weight decay added to the gradient, then momentum
    `optim.momentum`, Nesterov with `optim.nesterov`). lamb and lion: optax's, with
    `optim.b1`, `optim.b2` (Lion's usual b2 is 0.99), decoupled weight decay; LAMB also `eps`.
    """
    mask = functools.partial(weight_decay_mask, decay_clr=decay_clr)
    if optim.name == "adamw":
        return _adamw(optim, schedule, mask)
    if optim.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask),
            optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
        )
    if optim.name == "lamb":
        return optax.lamb(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
            mask=mask,
        )  # fmt: skip
    return optax.lion(
        schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=mask
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: Schedule, depth: int, decay_clr: bool = False
) -> optax.GradientTransformation:
    """The run's optimizer: gradient clipping, the named optimizer, layer-wise and backbone
    learning-rate scales, backbone freezing; each only when configured, so the defaults build
    exactly `adamw(optim, schedule, decay_clr)`.

    Args:
      optim: the `optim` config section.
      schedule: the learning-rate schedule.
      depth: blocks of the backbone (for `layer_decay`).
      decay_clr: see `weight_decay_mask`.
    """
    transform = base_optimizer(optim, schedule, decay_clr)
    if optim.grad_clip_norm > 0:
        transform = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), transform)
    if optim.layer_decay != 1.0 or optim.backbone_lr_scale != 1.0:
        scales = functools.partial(
            learning_rate_scales,
            depth=depth,
            layer_decay=optim.layer_decay,
            backbone_scale=optim.backbone_lr_scale,
        )
        transform = optax.chain(transform, scale_per_leaf(scales))
    if optim.freeze_backbone_steps:
        transform = freeze(transform, backbone_mask, optim.freeze_backbone_steps)
    return transform


def top_level_name(path) -> str:
    return str(getattr(path[0], "key", path[0]))


def backbone_mask(params):
    """True for the backbone's parameters (embeddings, blocks, final norm); False for the
    classifier, the CLA/IFA head, the CLR tokens and the reduction modules."""

    def is_backbone(path, _) -> bool:
        name = top_level_name(path)
        return name in BACKBONE_NAMES or _BLOCK.match(name) is not None

    return jax.tree_util.tree_map_with_path(is_backbone, params)


def learning_rate_scales(params, depth: int, layer_decay: float, backbone_scale: float):
    """The factor of each parameter's learning rate (see the module docstring)."""

    def scale(path, _) -> float:
        name = top_level_name(path)
        block = _BLOCK.match(name)
        if block is not None:
            return backbone_scale * layer_decay ** (depth - int(block.group(1)))
        if name in EMBEDDING_NAMES:
            return backbone_scale * layer_decay ** (depth + 1)
        return backbone_scale if name in BACKBONE_NAMES else 1.0

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_per_leaf(scales_fn) -> optax.GradientTransformation:
    """Multiplies each update by its leaf's factor from `scales_fn(params)`, through optax's
    `multi_transform` (one stateless `optax.scale` per distinct factor)."""

    def labels(tree):
        return jax.tree.map(repr, scales_fn(tree))

    def transforms(params):
        return {repr(s): optax.scale(s) for s in set(jax.tree.leaves(scales_fn(params)))}

    def init(params):
        return optax.multi_transform(transforms(params), labels).init(params)

    def update(updates, state, params=None):
        return optax.multi_transform(transforms(updates), labels).update(updates, state, params)

    return optax.GradientTransformation(init, update)


class FreezeState(NamedTuple):
    """`freeze`'s state: the steps taken and the wrapped optimizer's state."""

    count: jax.Array
    inner: optax.OptState


def freeze(
    inner: optax.GradientTransformation, mask_fn, steps: int
) -> optax.GradientTransformation:
    """`inner` with the parameters `mask_fn(params)` marks held fixed for the first `steps`
    updates (`ALWAYS_FROZEN`: for ever): their gradients enter `inner` as zeros and their
    updates leave as zeros, so they stay bit for bit what they were (weight decay included).

    optax's `transforms.freeze` freezes for ever; the time limit needs the step count kept here.
    """

    def init(params):
        return FreezeState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        frozen_now = True if steps == ALWAYS_FROZEN else state.count < steps
        mask = mask_fn(updates)

        def zero(tree):
            return jax.tree.map(
                lambda leaf, m: jnp.where(frozen_now, jnp.zeros_like(leaf), leaf) if m else leaf,
                tree,
                mask,
            )

        updates, inner_state = inner.update(zero(updates), state.inner, params)
        return zero(updates), FreezeState(
            count=optax.safe_increment(state.count), inner=inner_state
        )

    return optax.GradientTransformation(init, update)
