"""Vision Transformer building blocks with the hooks token reduction needs.

The layer names mirror timm (`patch_embed/proj`, `blocks_{i}/attn/qkv`, `norm`, `head`, ...), so a
timm state dict maps onto the parameter tree key by key (see `clca_jax.convert`).

Precision: parameters are float32; matmuls run in the module's `dtype` (bfloat16 on
accelerators); LayerNorm, softmax and the residual stream stay in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from clca_jax.models.activations import gelu
from clca_jax.models.clca import CLAHead, IFAHead, cache_entry, clr_from_class_token
from clca_jax.models.config import NO_HEAD
from clca_jax.models.initializers import (
    torch_linear_bias_init,
    torch_linear_kernel_init,
    trunc_normal,
)
from clca_jax.models.reduction import Reduced, Tokens, get_method
from clca_jax.models.registry import Backbone
from clca_jax.models.schedule import (
    ClcaOptions,
    ReductionOptions,
    TokenSchedule,
    build_schedule,
)
from clca_jax.normalization import DEFAULT as DEFAULT_NORMALIZATION
from clca_jax.normalization import NORMALIZATION

Dtype = Any


@flax.struct.dataclass
class AttentionOutput:
    """What token reduction reads from an attention layer.

    Attributes:
      cls_probs: the class token's softmax attention row, float32 [B, heads, N] (EViT, Top-K
        and ATS need nothing else, so the full [N, N] maps are never kept).
      keys: keys per head [B, heads, N, head_dim].
      values: values per head [B, heads, N, head_dim].
    """

    cls_probs: jax.Array
    keys: jax.Array
    values: jax.Array

    def without_registers(self, count: int) -> AttentionOutput:
        """The internals of every token but the `count` register tokens after CLS."""
        return AttentionOutput(
            cls_probs=drop_registers(self.cls_probs, count, axis=2),
            keys=drop_registers(self.keys, count, axis=2),
            values=drop_registers(self.values, count, axis=2),
        )


def drop_registers(x: jax.Array, count: int, axis: int = 1) -> jax.Array:
    """`x` without the `count` entries after the class token along `axis`."""
    head = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    rest = jax.lax.slice_in_dim(x, 1 + count, x.shape[axis], axis=axis)
    return jnp.concatenate([head, rest], axis=axis)


def reduce_beside_registers(
    reducer: nn.Module, tokens: Tokens, attention, train: bool, count: int
) -> Reduced:
    """Runs a reduction step on the sequence without its register tokens, then puts them back
    after CLS, so no method can drop or merge them (timm's `num_prefix_tokens`)."""
    if not count:
        return reducer(tokens, attention, train)
    registers = tokens.x[:, 1 : 1 + count]
    hidden = jax.tree.map(lambda state: drop_registers(state, count), tokens)
    if attention is not None:
        attention = attention.without_registers(count)
    reduced = reducer(hidden, attention, train)
    return reduced._replace(tokens=with_registers(reduced.tokens, registers))


def with_registers(tokens: Tokens, registers: jax.Array) -> Tokens:
    """`tokens` with `registers` inserted after CLS; their state is the class token's (size 1,
    valid, present, kept)."""
    count = registers.shape[1]

    def insert(state, value):
        if state is None:
            return None
        fill = jnp.broadcast_to(jnp.asarray(value, state.dtype), (state.shape[0], count))
        return jnp.concatenate([state[:, :1], fill, state[:, 1:]], axis=1)

    return Tokens(
        x=jnp.concatenate([tokens.x[:, :1], registers, tokens.x[:, 1:]], axis=1),
        size=insert(tokens.size, 1.0),
        valid=insert(tokens.valid, True),
        decision=insert(tokens.decision, 1.0),
        present=insert(tokens.present, True),
    )


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
      attention: `model.attention`: per_image, batched, fused, or auto (per_image on the CPU,
        fused elsewhere).
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, policy: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionOutput]:
        """Attends over the tokens of `x`.

        Args:
          x: tokens [B, N, D].
          bias: optional additive logit bias broadcastable to [B, heads, N, N] (ToMe's log
            token sizes, masks of padded or dropped tokens).
          policy: optional keep decisions [B, N] (DynamicViT training): each query then sees
            only kept keys and itself, with DynamicViT's smoothed softmax.

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
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        choice = resolve_attention(self.attention)
        if choice == "fused" and policy is None:
            # [B, N, heads, head_dim], the layout of jax.nn.dot_product_attention.
            query, keys, values = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            implementation = fused_implementation(self.dtype, head_dim)
            out, cls_probs = fused_attention(
                query * head_dim**-0.5, keys, values, bias, implementation
            )
            out = out.reshape(batch, length, width)
            keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
        else:
            qkv = qkv.transpose(2, 0, 3, 1, 4)
            query, keys, values = qkv[0], qkv[1], qkv[2]
            core = functools.partial(attention_core, dtype=self.dtype)
            operands = (query * head_dim**-0.5, keys, values, bias, policy)
            if choice == "per_image":
                # One image at a time keeps each [heads, N, N] map in cache: about 2x faster
                # for ViT-B at 448 px on a CPU than one batched [B, heads, N, N] pass.
                out, cls_probs = jax.lax.map(lambda args: core(*args), operands)
            else:
                # Also DynamicViT's masked softmax in training, which the fused kernel lacks.
                out, cls_probs = jax.vmap(core)(*operands)
            out = out.transpose(0, 2, 1, 3).reshape(batch, length, width)
        out = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(out)
        attention = AttentionOutput(cls_probs=cls_probs, keys=keys, values=values)
        return out.astype(jnp.float32), attention


def resolve_attention(attention: str) -> str:
    """`model.attention` with `auto` resolved: per_image on the CPU, fused elsewhere."""
    if attention == "auto":
        return "per_image" if jax.default_backend() == "cpu" else "fused"
    return attention


def fused_implementation(dtype: Dtype, head_dim: int) -> str:
    """cuDNN's flash attention where its constraints hold (a GPU, bfloat16 or float16 inputs,
    a head dimension that is a multiple of 8 and at most 128), XLA's attention elsewhere."""
    cudnn_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and cudnn_dtype and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def fused_attention(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    bias: jax.Array | None,
    implementation: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """`jax.nn.dot_product_attention` for the block output, the class token's row on the side.

    The fused kernel never exposes its probabilities, and token reduction needs only the class
    token's row: that is one query against every key, computed exactly in float32 (O(N d)).

    Args:
      query: scaled queries [B, N, heads, head_dim].
      keys: keys [B, N, heads, head_dim].
      values: values [B, N, heads, head_dim].
      bias: additive logit bias broadcastable to [B, heads, N, N], or None.
      implementation: "xla" or "cudnn" (see `fused_implementation`). The sequence is padded
        to a multiple of `FUSED_PAD_MULTIPLE[implementation]` with keys that no query sees
        (cuDNN trains with a bias only at even lengths); the output is cut back to N.

    Returns:
      The attention output [B, N, heads, head_dim] and the class token's softmax row, float32
      [B, heads, N].
    """
    batch, length, heads, _ = query.shape
    cls_logits = jnp.einsum("bhd,bkhd->bhk", query[:, 0], keys).astype(jnp.float32)
    if bias is not None:
        cls_logits = cls_logits + jax.lax.slice_in_dim(bias, 0, 1, axis=2)[:, :, 0, :]
    cls_probs = jax.nn.softmax(cls_logits, axis=-1)
    extra = -length % FUSED_PAD_MULTIPLE[implementation]
    if extra:
        pad = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))  # noqa: E731
        query, keys, values = pad(query), pad(keys), pad(values)
        if bias is not None:
            rows = extra if bias.shape[2] > 1 else 0
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, rows), (0, extra)))
        key_mask = jnp.where(jnp.arange(length + extra) < length, 0.0, -jnp.inf)
        bias = key_mask[None, None, None, :] if bias is None else bias + key_mask
    if implementation == "cudnn" and bias is not None:
        # cuDNN takes a bias of the full [B, heads, N, N] shape in the inputs' dtype, with
        # finite large negatives for masked logits.
        padded = length + extra
        bias = jnp.broadcast_to(bias, (batch, heads, padded, padded))
        bias = jnp.maximum(bias, CUDNN_LARGE_NEGATIVE[jnp.dtype(query.dtype).name])
        bias = bias.astype(query.dtype)
    out = jax.nn.dot_product_attention(
        query, keys, values, bias, scale=1.0, implementation=implementation
    )
    return out[:, :length], cls_probs


FUSED_PAD_MULTIPLE = {"xla": 1, "cudnn": 2}
# What jax's own cuDNN path uses for masked logits (cuDNN mishandles differences of two larger
# negatives).
CUDNN_LARGE_NEGATIVE = {"bfloat16": -(2.0**41), "float16": -(2.0**15)}


def attention_core(query, keys, values, bias, policy, dtype) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of one image: [heads, N, head_dim] -> (output, CLS probability row).

    `bias` broadcasts to [heads, N, N]; `policy` [N] selects DynamicViT's masked softmax.
    Neither path keeps the [heads, N, N] probabilities for the backward pass: they are
    recomputed from the queries and keys, so training memory grows with N, not N^2, per layer.
    """
    if policy is None:
        return softmax_attention(query, keys, values, bias, dtype)
    return jax.checkpoint(policy_attention, static_argnums=5)(
        query, keys, values, bias, policy, dtype
    )


def attention_logits(query, keys, bias) -> jax.Array:
    """query keys^T + bias in float32, [heads, N, N]."""
    logits = jnp.einsum("hqd,hkd->hqk", query, keys).astype(jnp.float32)
    return logits if bias is None else logits + bias


def attention_probs(query, keys, bias) -> jax.Array:
    """softmax(query keys^T + bias) in float32, [heads, N, N]."""
    return jax.nn.softmax(attention_logits(query, keys, bias), axis=-1)


def attention_output(probs, values, dtype) -> tuple[jax.Array, jax.Array]:
    """probs @ values, and the class token's probability row."""
    return jnp.einsum("hqk,hkd->hqd", probs.astype(dtype), values), probs[:, 0, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(query, keys, values, bias, dtype) -> tuple[jax.Array, jax.Array]:
    """`attention_output` of the softmax probabilities; the backward pass recomputes them."""
    return attention_output(attention_probs(query, keys, bias), values, dtype)


def _softmax_attention_forward(query, keys, values, bias, dtype):
    return softmax_attention(query, keys, values, bias, dtype), (query, keys, values, bias)


def _softmax_attention_backward(dtype, residuals, cotangents):
    query, keys, values, bias = residuals
    d_out, d_cls = cotangents
    d_out = d_out.astype(dtype)
    probs = attention_probs(query, keys, bias)
    d_values = jnp.einsum("hqk,hqd->hkd", probs.astype(dtype), d_out)
    d_probs = jnp.einsum("hqd,hkd->hqk", d_out, values).astype(jnp.float32)
    d_probs = d_probs.at[:, 0, :].add(d_cls)
    # Softmax backward: d_logits = p * (d_p - sum_k p d_p).
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    d_query = jnp.einsum("hqk,hkd->hqd", d_logits.astype(dtype), keys)
    d_keys = jnp.einsum("hqk,hqd->hkd", d_logits.astype(dtype), query)
    d_bias = None if bias is None else sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    return (
        d_query.astype(query.dtype),
        d_keys.astype(keys.dtype),
        d_values.astype(values.dtype),
        d_bias,
    )


softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums `x` over the axes along which an array of `shape` was broadcast to `x.shape`."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, size in enumerate(shape) if size == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def policy_attention(query, keys, values, bias, policy, dtype) -> tuple[jax.Array, jax.Array]:
    """DynamicViT's masked-softmax attention (autodiff backward)."""
    return attention_output(
        policy_softmax(attention_logits(query, keys, bias), policy), values, dtype
    )


def policy_softmax(logits: jax.Array, policy: jax.Array, eps: float = 1e-6) -> jax.Array:
    """DynamicViT's masked softmax: (exp * keep + eps/N) / (sum(exp * keep) + eps)."""
    length = logits.shape[-1]
    keep = policy[..., None, None, :].astype(jnp.float32)
    keep = keep + (1.0 - keep) * jnp.eye(length, dtype=jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * keep
    return (weights + eps / length) / (jnp.sum(weights, axis=-1, keepdims=True) + eps)


class Mlp(nn.Module):
    """Linear -> exact GELU -> dropout -> Linear -> dropout (timm's `Mlp` with `proj_drop`).

    Attributes:
      hidden_dim: width of the hidden layer.
      dtype: matmul dtype.
      dropout_rate: dropout after the activation and after the output projection, in training.
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(x)
        x = nn.Dropout(self.dropout_rate)(gelu(x), deterministic=not train)
        x = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
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
    """Pre-norm transformer block in two halves, `attend` and `feed_forward`.

    Token reduction methods that act "inside" a block (EViT, Top-K, ToMe, ATS) run between them.
    In training each residual branch ends with dropout (`dropout_rate`, after the attention's
    output projection, as timm's `proj_drop`) and stochastic depth (`drop_path`: the whole
    branch of a sample is dropped with that probability, kept ones scaled by 1 / (1 - p)); both
    draw from the `dropout` RNG stream and are the identity at evaluation or at rate 0.

    Attributes:
      backbone: architecture attributes (width, heads, LayerScale, eps, qkv bias).
      dtype: matmul dtype.
      attention: `model.attention` (see `Attention`).
      drop_path: this block's stochastic-depth rate.
      dropout_rate: dropout after the attention and MLP projections.
    """

    backbone: Backbone
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    drop_path: float = 0.0
    dropout_rate: float = 0.0

    def setup(self):
        arch = self.backbone
        self.norm1 = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32)
        self.attn = Attention(
            arch.num_heads, qkv_bias=arch.qkv_bias, dtype=self.dtype, attention=self.attention
        )
        self.norm2 = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32)
        self.mlp = Mlp(
            int(arch.embed_dim * arch.mlp_ratio), dtype=self.dtype, dropout_rate=self.dropout_rate
        )
        if arch.layer_scale is not None:
            self.ls1 = LayerScale(arch.layer_scale)
            self.ls2 = LayerScale(arch.layer_scale)
        self.proj_drop = nn.Dropout(self.dropout_rate)
        # One mask entry per sample ([B, 1, 1]): the branch is dropped for the whole image.
        self.drop_path1 = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
        self.drop_path2 = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))

    def _scale(self, layer_scale_name: str, x: jax.Array) -> jax.Array:
        if self.backbone.layer_scale is None:
            return x
        return getattr(self, layer_scale_name)(x)

    def attend(
        self,
        x: jax.Array,
        train: bool = False,
        bias: jax.Array | None = None,
        policy: jax.Array | None = None,
    ) -> tuple[jax.Array, AttentionOutput]:
        """x + DropPath(LS1(Dropout(Attn(LN1(x))))), plus the attention internals.

        `train` comes second in both halves, so `remat_block` marks one position static."""
        out, attention = self.attn(self.norm1(x), bias, policy)
        out = self.proj_drop(out, deterministic=not train)
        out = self.drop_path1(self._scale("ls1", out), deterministic=not train)
        return x + out, attention

    def feed_forward(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x + DropPath(LS2(MLP(LN2(x))))."""
        out = self._scale("ls2", self.mlp(self.norm2(x), train))
        return x + self.drop_path2(out, deterministic=not train)


class VisionTransformer(nn.Module):
    """ViT with static-shape token reduction and the CLCA modules.

    The block loop follows spec section 2: a "before" reduction acts on a block's input, an
    "inside" one between its attention residual and its MLP; after the block the Cross-Layer
    Cache returns its tokens (recovery blocks) and stores this block's entry; the class token
    is collected for the CLA head. Every length comes from the static `TokenSchedule`.

    Attributes:
      backbone: architecture attributes (see `registry.Backbone`).
      img_size: input image side; must be a multiple of the patch size.
      num_classes: classifier outputs.
      reduction: token reduction method, keep rate and locations.
      clca: CLA head and Cross-Layer Cache options; `clca.num_clr` register (CLR) tokens are
        appended after the patches, initialised from the class token, with position-embedding
        rows unless `no_embed_class`. The sequence is [CLS, DINOv2 register tokens (the
        backbone's `reg_tokens`), patches, CLR]; reductions never touch the first two.
      dtype: matmul dtype.
      attention: `model.attention`: how attention runs (per_image, batched, fused or auto).
      input_normalization: (mean, std) the images are normalised with before the model
        (`model.normalization`); the model itself reads normalised images.
      drop_path_rate: stochastic depth of the last block; block i gets
        `linspace(0, drop_path_rate, depth)[i]`, as timm's `dpr`.
      dropout_rate: dropout after the attention and MLP projections (timm's `proj_drop_rate`).
      remat: `model.remat`: none, block (recompute each block half in the backward pass) or a
        `jax.checkpoint_policies` name; parameters and their names do not change.
    """

    backbone: Backbone
    img_size: int
    num_classes: int
    reduction: ReductionOptions = ReductionOptions()
    clca: ClcaOptions = ClcaOptions()
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    input_normalization: tuple = NORMALIZATION[DEFAULT_NORMALIZATION]
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    remat: str = "none"

    @property
    def grid(self) -> int:
        """Patches per side of the input."""
        return self.img_size // self.backbone.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def method(self):
        """The reduction method's class (`clca_jax.models.reduction.Method`)."""
        return get_method(self.reduction.method)

    def example_images(self, batch: int = 1) -> jax.Array:
        """A zero batch of the input shape, for initialisation and shape inference."""
        return jnp.zeros((batch, self.img_size, self.img_size, 3), jnp.float32)

    def abstract_variables(self) -> dict:
        """Shapes and dtypes of the model's variables, without allocating them."""
        return jax.eval_shape(self.init, jax.random.key(0), self.example_images())

    @property
    def num_clr(self) -> int:
        return self.clca.num_clr

    def drop_path_rates(self) -> list[float]:
        """Stochastic-depth rate of each block, rising linearly from 0 to `drop_path_rate`."""
        return [float(rate) for rate in np.linspace(0.0, self.drop_path_rate, self.backbone.depth)]

    def token_schedule(self, train: bool = False) -> TokenSchedule:
        """The per-block token counts this model runs with in the given mode."""
        return cached_schedule(
            self.backbone.depth,
            self.num_patches,
            self.reduction,
            self.clca,
            train,
            self.backbone.reg_tokens,
        )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """Classifies a batch of images.

        Args:
          images: float32 NHWC [B, img_size, img_size, 3], already normalised.
          train: training mode: batch statistics in the CLA head, DynamicViT's masked
            training pass, dropout and stochastic depth. DPC-KNN and DynamicViT draw from the
            `reduction` RNG stream (`rngs={'reduction': key}`; without it DPC-KNN adds no
            density noise), dropout and stochastic depth from `dropout` (needed only when
            their rates are above 0).

        Returns:
          logits [B, num_classes] and `aux`: `kept` (per reduction stage, what survived),
          `token_counts` (int [depth, 2]: attention and MLP lengths as traced),
          `extra_loss` (DynamicViT's ratio loss in training, else 0), `pre_logits` (the
          features the classifier reads).
        """
        schedule = self.token_schedule(train)
        method = self.method
        tokens = method.initial_tokens(self.embed(images))
        cache, cls_tokens, kept, losses, counts = [], [], [], [], []
        drop_path_rates = self.drop_path_rates()
        block_class = remat_block(self.remat)
        for index, plan in enumerate(schedule.blocks):
            block = block_class(
                self.backbone,
                dtype=self.dtype,
                attention=self.attention,
                drop_path=drop_path_rates[index],
                dropout_rate=self.dropout_rate,
                name=f"blocks_{index}",
            )
            reducer = None
            if plan.stage is not None and plan.stage.plan.active:
                # Named `reduction_{stage}`: the converter relies on it.
                name = f"reduction_{plan.stage.index}"
                reducer = method.build(plan.stage, self.reduction, name)
            registers = self.backbone.reg_tokens
            if reducer is not None and method.placement == "before":
                reduced = reduce_beside_registers(reducer, tokens, None, train, registers)
                tokens = self.record(reduced, kept, losses)
            policy = tokens.decision if (train and tokens.decision is not None) else None
            x, attention = block.attend(tokens.x, train, tokens.attention_bias(), policy)
            tokens = tokens.replace(x=x)
            attn_tokens = x.shape[1]
            if reducer is not None and method.placement == "inside":
                reduced = reduce_beside_registers(reducer, tokens, attention, train, registers)
                tokens = self.record(reduced, kept, losses)
            counts.append((attn_tokens, tokens.length))
            tokens = tokens.replace(x=block.feed_forward(tokens.x, train))
            if plan.recovered:
                tokens = tokens.append(jnp.concatenate(cache, axis=1), 1.0 if train else 0.0)
                cache = []
            if plan.cached:
                cache.append(
                    cache_entry(
                        tokens,
                        schedule.pool_start,
                        plan.pool_end,
                        self.clca.include_gap,
                        self.clca.num_clr,
                    )
                )
            if plan.collect_cls:
                cls_tokens.append(tokens.x[:, 0])

        if self.clca.head == NO_HEAD:
            features = self.pool(tokens)
            logits = self.classifier(features)
        else:
            features = jnp.stack(cls_tokens, axis=1)  # [B, depths, D]
            if self.clca.head == "cla":
                head = CLAHead(
                    self.num_classes, self.clca.kernels_per_channel, name=f"{self.clca.head}_head"
                )
            else:
                head = IFAHead(self.num_classes, name=f"{self.clca.head}_head")
            logits = head(features, train)
        extra_loss = jnp.zeros((), jnp.float32)
        if losses:
            extra_loss = method.loss_weight_of(self.reduction) * jnp.mean(jnp.stack(losses))
        aux = {
            "kept": tuple(kept),
            "token_counts": jnp.asarray(counts, jnp.int32),
            "extra_loss": extra_loss,
            "pre_logits": features,
        }
        return logits.astype(jnp.float32), aux

    @staticmethod
    def record(reduced: Reduced, kept: list, losses: list) -> Tokens:
        kept.append(reduced.kept)
        if reduced.loss is not None:
            losses.append(reduced.loss)
        return reduced.tokens

    def pool(self, tokens: Tokens) -> jax.Array:
        """What the plain classifier reads (`backbone.global_pool`, as timm).

        "token": the class token after the final LayerNorm `norm`. "avg": the mean of the
        tokens after the class and register tokens (ATS padding slots left out), then the
        LayerNorm `fc_norm`; there is no `norm`.
        """
        arch = self.backbone
        if arch.global_pool == "token":
            x = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32, name="norm")(tokens.x)
            return x[:, 0]
        body = tokens.x[:, arch.num_prefix_tokens :]
        if tokens.valid is None:
            pooled = jnp.mean(body, axis=1)
        else:
            weight = tokens.valid[:, arch.num_prefix_tokens :, None].astype(body.dtype)
            pooled = jnp.sum(body * weight, axis=1) / jnp.sum(weight, axis=1)
        return nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32, name="fc_norm")(pooled)

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
        """Patch embedding, class token, register tokens, CLR tokens and position embedding.

        With `no_embed_class` (DeiT-3, DINOv2 with registers) the position embedding covers
        the patches only; otherwise it covers the whole sequence, CLR tokens included.
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
        if arch.reg_tokens:
            reg_token = self.param(
                "reg_token", nn.initializers.normal(1e-6), (1, arch.reg_tokens, width)
            )
            prefix.append(jnp.broadcast_to(reg_token, (batch, arch.reg_tokens, width)))
        suffix = []
        if self.num_clr:
            # CLCA initialises its CLR tokens as copies of the class token.
            clr = self.param(
                "clr",
                lambda _, shape: clr_from_class_token(cls_token, shape[1]),
                (1, self.num_clr, width),
            )
            suffix = [jnp.broadcast_to(clr, (batch, self.num_clr, width))]
        if arch.no_embed_class:
            pos_embed = self.param("pos_embed", trunc_normal, (1, self.num_patches, width))
            x = jnp.concatenate(prefix + [x + pos_embed] + suffix, axis=1)
        else:
            length = arch.num_prefix_tokens + self.num_patches + self.num_clr
            pos_embed = self.param("pos_embed", trunc_normal, (1, length, width))
            x = jnp.concatenate(prefix + [x] + suffix, axis=1) + pos_embed
        if arch.pre_norm:
            x = nn.LayerNorm(epsilon=arch.ln_eps, dtype=jnp.float32, name="norm_pre")(x)
        return x


def remat_block(remat: str) -> type[Block]:
    """`Block`, or `Block` whose two halves are rematerialised (`jax.checkpoint`) with the
    `model.remat` policy: activations inside a block are recomputed in the backward pass
    instead of kept, trading compute for memory. Parameter names stay those of `Block`."""
    if remat == "none":
        return Block
    policy = None if remat == "block" else getattr(jax.checkpoint_policies, remat)
    # static_argnums counts `self`: 2 is `train` in both `attend` and `feed_forward`.
    return nn.remat(Block, static_argnums=(2,), policy=policy, methods=["attend", "feed_forward"])


@functools.lru_cache(maxsize=64)
def cached_schedule(depth, num_patches, reduction, clca, train, registers) -> TokenSchedule:
    return build_schedule(depth, num_patches, reduction, clca, train, registers)
