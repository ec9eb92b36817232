"""Vision Transformer building blocks with the hooks token reduction needs.

The layer names mirror timm (`patch_embed/proj`, `blocks_{i}/attn/qkv`, `norm`, `head`, ...), so a
timm state dict maps onto the parameter tree key by key (see `clca_jax.convert`).

Precision: parameters are float32; matmuls run in the module's `dtype` (bfloat16 on
accelerators); LayerNorm, softmax and the residual stream stay in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from clca_jax.models.registry import Backbone

Dtype = Any

# timm initialises ViT linears and embeddings with a truncated normal of std 0.02.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@flax.struct.dataclass
class AttentionOutput:
    """What token reduction reads from an attention layer.

    Attributes:
      probs: softmax attention, float32 [B, heads, N, N] (query, key).
      keys: keys per head [B, heads, N, head_dim].
      values: values per head [B, heads, N, head_dim].
    """

    probs: jax.Array
    keys: jax.Array
    values: jax.Array


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, row-major over the (h, w) grid.

    Attributes:
      patch_size: square patch side.
      embed_dim: output width.
      use_bias: convolution bias (off for CLIP).
      dtype: computation dtype.
    """

    patch_size: int
    embed_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.embed_dim,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="proj",
        )(images)
        batch, height, width, channels = x.shape
        return x.reshape(batch, height * width, channels).astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head self-attention that also returns its probabilities, keys and values.

    Attributes:
      num_heads: number of heads.
      qkv_bias: bias on the fused qkv projection.
      dtype: matmul dtype; the softmax is computed in float32.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionOutput]:
        """Attends over the tokens of `x`.

        Args:
          x: tokens [B, N, D].
          bias: optional additive logit bias broadcastable to [B, heads, N, N] (ToMe's log
            token sizes, masks of padded or dropped tokens).

        Returns:
          The projected output [B, N, D] and the attention internals.
        """
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(
            3 * width,
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            kernel_init=trunc_normal,
            name="qkv",
        )(x)
        # Same split as timm: (3, heads, head_dim) along the feature axis.
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        query, keys, values = qkv[0], qkv[1], qkv[2]
        query = query * head_dim**-0.5
        logits = jnp.einsum("bhqd,bhkd->bhqk", query, keys).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), values)
        out = out.transpose(0, 2, 1, 3).reshape(batch, length, width)
        out = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(out)
        return out.astype(jnp.float32), AttentionOutput(probs=probs, keys=keys, values=values)


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear.

    Attributes:
      hidden_dim: width of the hidden layer.
      dtype: matmul dtype.
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(x)
        return x.astype(jnp.float32)


class LayerScale(nn.Module):
    """Per-channel scale `gamma` (DeiT-3).

    Attributes:
      init_value: initial value of every channel's scale.
    """

    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma


class Block(nn.Module):
    """Pre-norm transformer block, callable in two halves.

    Token reduction methods that act "inside" a block (EViT, Top-K, ToMe, ATS) run between
    `attend` and `feed_forward`; calling the block directly runs both halves.

    Attributes:
      backbone: architecture attributes (width, heads, LayerScale, eps, qkv bias).
      dtype: matmul dtype.
    """

    backbone: Backbone
    dtype: Dtype = jnp.float32

    def setup(self):
        arch = self.backbone
        self.norm1 = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32)
        self.attn = Attention(arch.num_heads, qkv_bias=arch.qkv_bias, dtype=self.dtype)
        self.norm2 = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32)
        self.mlp = Mlp(int(arch.embed_dim * arch.mlp_ratio), dtype=self.dtype)
        if arch.layer_scale is not None:
            self.ls1 = LayerScale(arch.layer_scale)
            self.ls2 = LayerScale(arch.layer_scale)

    def _scale(self, layer_scale_name: str, x: jax.Array) -> jax.Array:
        if self.backbone.layer_scale is None:
            return x
        return getattr(self, layer_scale_name)(x)

    def attend(
        self, x: jax.Array, bias: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionOutput]:
        """x + LS1(Attn(LN1(x))), plus the attention internals."""
        out, attention = self.attn(self.norm1(x), bias)
        return x + self._scale("ls1", out), attention

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """x + LS2(MLP(LN2(x)))."""
        return x + self._scale("ls2", self.mlp(self.norm2(x)))

    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionOutput]:
        x, attention = self.attend(x, bias)
        return self.feed_forward(x), attention


class VisionTransformer(nn.Module):
    """ViT classifier: `[CLS, patches..., registers...]` -> blocks -> LayerNorm -> head(CLS).

    Attributes:
      backbone: architecture attributes (see `registry.Backbone`).
      img_size: input image side; must be a multiple of the patch size.
      num_classes: classifier outputs.
      num_registers: extra tokens appended after the patches (CLCA's CLR tokens), each
        initialised from the class token, with position-embedding rows unless `no_embed_class`.
      dtype: matmul dtype.
    """

    backbone: Backbone
    img_size: int
    num_classes: int
    num_registers: int = 0
    dtype: Dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.backbone.patch_size) ** 2

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """Classifies a batch of images.

        Args:
          images: float32 NHWC [B, img_size, img_size, 3], already normalised.
          train: training mode (dropout-free here; later layers use it for batch statistics).

        Returns:
          logits [B, num_classes] and a dict of intermediates.
        """
        del train
        x = self.embed(images)
        for index in range(self.backbone.depth):
            x, _ = Block(self.backbone, dtype=self.dtype, name=f"blocks_{index}")(x)
        x = nn.LayerNorm(epsilon=self.backbone.ln_eps, dtype=jnp.float32, name="norm")(x)
        features = x[:, 0]
        return self.classifier(features), {"pre_logits": features}

    def classifier(self, features: jax.Array) -> jax.Array:
        """Linear head with PyTorch's default init, as a freshly reset timm head has."""
        width = features.shape[-1]
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_linear_bias_init(width),
            name="head",
        )(features).astype(jnp.float32)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch embedding, class token, register tokens and position embedding.

        With `no_embed_class` (DeiT-3) the position embedding covers the patches only;
        otherwise it covers the whole sequence, registers included.
        """
        arch = self.backbone
        width = arch.embed_dim
        if images.ndim != 4 or images.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"Expected images of shape [batch, {self.img_size}, {self.img_size}, 3] (NHWC), "
                f"got {tuple(images.shape)}."
            )
        x = PatchEmbed(
            arch.patch_size, width, use_bias=arch.patch_bias, dtype=self.dtype, name="patch_embed"
        )(images)
        batch = x.shape[0]
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, width))
        prefix = [jnp.broadcast_to(cls_token, (batch, 1, width))]
        suffix = []
        if self.num_registers:
            # CLCA initialises its register tokens as copies of the class token.
            registers = self.param(
                "clr",
                lambda _, shape: jnp.tile(cls_token, (1, shape[1], 1)),
                (1, self.num_registers, width),
            )
            suffix = [jnp.broadcast_to(registers, (batch, self.num_registers, width))]
        if arch.no_embed_class:
            pos_embed = self.param("pos_embed", trunc_normal, (1, self.num_patches, width))
            x = jnp.concatenate(prefix + [x + pos_embed] + suffix, axis=1)
        else:
            length = 1 + self.num_patches + self.num_registers
            pos_embed = self.param("pos_embed", trunc_normal, (1, length, width))
            x = jnp.concatenate(prefix + [x] + suffix, axis=1) + pos_embed
        if arch.pre_norm:
            x = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32, name="norm_pre")(x)
        return x
