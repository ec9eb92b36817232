"""Exponential moving average of the model variables (`train.ema_decay`, `train.ema_warmup`).

The average starts as a copy of the initial variables and follows every optimizer step:
`ema <- decay * ema + (1 - decay) * variables` (optax's `incremental_update`), BatchNorm
statistics included, as timm's `ModelEmaV2`/`V3` average the whole state dict. Without warm-up
the decay is `train.ema_decay` from the first step (timm's `ModelEmaV2`); with warm-up it is
timm `ModelEmaV3`'s `min(ema_decay, 1 - (1 + t) ** (-2/3))` for the `t`-th update after the
first (`warmup_gamma=1`, `warmup_power=2/3`), and 0 for the first, which copies the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

WARMUP_POWER = 2.0 / 3.0  # timm ModelEmaV3's default warmup_power (warmup_gamma = 1)


def decay_at(count, decay: float, warmup: bool) -> jax.Array:
    """The decay of update number `count` (1 for the first optimizer step)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    after_first = jnp.maximum(jnp.asarray(count, jnp.float32) - 1.0, 0.0)
    warming = 1.0 - (1.0 + after_first) ** -WARMUP_POWER
    return jnp.where(after_first <= 0, 0.0, jnp.minimum(decay, warming)).astype(jnp.float32)


def update(average, variables, decay) -> dict:
    """`decay * average + (1 - decay) * variables`, leaf by leaf."""
    return optax.incremental_update(variables, average, step_size=1.0 - decay)
