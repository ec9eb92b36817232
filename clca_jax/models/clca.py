"""Cross-Layer Aggregation heads and the Cross-Layer Cache's token entries (spec 3, 4).

The CLA head classifies from the class token taken after every reduction block and the last
block (un-normalised residual-stream states; the final LayerNorm is not used). The default head
is BatchNorm -> depthwise convolution over the depth axis (2 kernels per channel) -> BatchNorm
-> GELU -> 1x1 convolution; the "IFA" alternative mixes the depths with one linear layer.
BatchNorm follows PyTorch: batch statistics in training, running statistics at evaluation, and
the running variance updated with the unbiased batch variance.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clca_jax.models.activations import gelu
from clca_jax.models.initializers import torch_linear_bias_init, torch_linear_kernel_init
from clca_jax.models.reduction.base import Tokens


class TorchBatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's running-statistics update.

    Attributes:
      momentum: PyTorch's momentum (weight of the new batch statistics).
      epsilon: added to the variance.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            count = x.size // features
            if not self.is_initializing():
                unbiased = var * count / max(count - 1, 1)
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + (
                    self.momentum * unbiased
                )
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class CLAHead(nn.Module):
    """Cross-Layer Aggregation head over the stacked class tokens.

    Attributes:
      num_classes: outputs.
      kernels_per_channel: depthwise kernels per channel (the reference's default 2).
    """

    num_classes: int
    kernels_per_channel: int = 2

    @nn.compact
    def __call__(self, cls_tokens: jax.Array, train: bool) -> jax.Array:
        """cls_tokens [B, L, D] (depth order) -> logits [B, num_classes]."""
        _, depths, width = cls_tokens.shape
        x = TorchBatchNorm(name="norm_in")(cls_tokens, train)
        # One window over all depths; output channel c*k + j reads input channel c only.
        x = nn.Conv(
            width * self.kernels_per_channel,
            kernel_size=(depths,),
            strides=(depths,),
            padding="VALID",
            feature_group_count=width,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_linear_bias_init(depths),
            name="depthwise",
        )(x)
        x = TorchBatchNorm(name="norm_mid")(x, train)
        x = gelu(x)[:, 0]
        fan_in = width * self.kernels_per_channel
        return nn.Dense(
            self.num_classes,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_linear_bias_init(fan_in),
            name="classifier",
        )(x)


class IFAHead(nn.Module):
    """The linear alternative: Linear(L -> 1) over depths -> ReLU -> LayerNorm -> Linear.

    Attributes:
      num_classes: outputs.
    """

    num_classes: int

    @nn.compact
    def __call__(self, cls_tokens: jax.Array, train: bool) -> jax.Array:
        del train
        _, depths, width = cls_tokens.shape
        x = nn.Dense(
            1,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_linear_bias_init(depths),
            name="layer_weights",
        )(cls_tokens.transpose(0, 2, 1))[..., 0]
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(nn.relu(x))
        return nn.Dense(
            self.num_classes,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_linear_bias_init(width),
            name="classifier",
        )(x)


def pooled_token(tokens: Tokens, start: int, end: int) -> jax.Array:
    """The cache's GAP token: mean of tokens [start, end) -> [B, 1, D].

    Slots that do not exist in the reference (ATS padding beyond the batch's largest count)
    are left out, so the mean is the reference's.
    """
    part = tokens.x[:, start:end]
    if tokens.present is None:
        return jnp.mean(part, axis=1, keepdims=True)
    weight = tokens.present[:, start:end, None].astype(part.dtype)
    return jnp.sum(part * weight, axis=1, keepdims=True) / jnp.sum(weight, axis=1, keepdims=True)


def cache_entry(tokens: Tokens, start: int, end: int, include_gap: bool, num_clr: int):
    """One block's cache entry: [GAP] then the last `num_clr` tokens, whatever they are now."""
    parts = [pooled_token(tokens, start, end)] if include_gap else []
    if num_clr:
        parts.append(tokens.x[:, -num_clr:])
    return jnp.concatenate(parts, axis=1)


def clr_from_class_token(cls_token, count: int):
    """CLCA's initial CLR tokens: `count` copies of the class token, [1, count, D] (NumPy or
    JAX, as given). Used by the model's initialiser, the converter and warm start."""
    return cls_token.repeat(count, axis=1)
