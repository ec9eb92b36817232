"""Mixed precision: float16's dynamic loss scale, carried in the optimizer state.

`model.dtype` sets the matmul dtype (`clca_jax.models.config.compute_dtype`); parameters,
LayerNorm, softmax and the loss stay float32 whatever it is. bfloat16 has float32's exponent
range and trains without scaling. float16 does not: small gradients underflow. Its runs scale
the loss up before the backward pass and the gradients down after it, with jmp's dynamic scale
(the reference's `torch.cuda.amp.GradScaler` does the same): a step whose gradients overflow
changes no parameter and halves the scale; 2000 finite steps in a row double it.

The scale lives in the optimizer state (`LossScaleState`, plain arrays: jmp's own class checks
its leaves on construction, which tree maps over shardings or shapes would break), so
checkpoints save and restore it with the rest, and runs in float32 or bfloat16 keep their
optimizer state unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jmp
import optax

# jmp's and PyTorch GradScaler's starting scale and growth period.
INITIAL_LOSS_SCALE = 2.0**15
GROWTH_PERIOD = 2000


class LossScaleState(NamedTuple):
    """The optimizer state of `with_dynamic_loss_scale`.

    Attributes:
      inner: the wrapped optimizer's state.
      scale: the current loss scale, float32.
      counter: finite steps since the scale last changed, int32.
    """

    inner: optax.OptState
    scale: jax.Array
    counter: jax.Array

    @property
    def loss_scale(self) -> jmp.DynamicLossScale:
        return jmp.DynamicLossScale(self.scale, self.counter, period=GROWTH_PERIOD)


def needs_loss_scale(dtype) -> bool:
    """Whether a model computing in `dtype` trains with a dynamic loss scale (float16)."""
    return jnp.dtype(dtype) == jnp.dtype(jnp.float16)


def with_dynamic_loss_scale(
    tx: optax.GradientTransformation, initial_scale: float = INITIAL_LOSS_SCALE
) -> optax.GradientTransformation:
    """`tx` for gradients of a loss multiplied by the state's scale (`loss_scale_of`).

    `update` unscales the gradients, adjusts the scale to whether they are finite, and passes
    finite ones to `tx`; non-finite ones give zero updates and leave `tx`'s state as it was.
    """

    def init(params) -> LossScaleState:
        return LossScaleState(
            inner=tx.init(params),
            scale=jnp.asarray(initial_scale, jnp.float32),
            counter=jnp.zeros((), jnp.int32),
        )

    def update(grads, state: LossScaleState, params=None):
        grads = state.loss_scale.unscale(grads)
        finite = jmp.all_finite(grads)
        safe = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, inner = tx.update(safe, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, 0.0), updates)
        inner = jmp.select_tree(finite, inner, state.inner)
        adjusted = state.loss_scale.adjust(finite)
        return updates, LossScaleState(inner, adjusted.loss_scale, adjusted.counter)

    return optax.GradientTransformation(init, update)


def loss_scale_of(opt_state) -> jmp.LossScale:
    """The loss scale a train step multiplies its loss by: the state's dynamic one, or none."""
    if isinstance(opt_state, LossScaleState):
        return opt_state.loss_scale
    return jmp.NoOpLossScale()
