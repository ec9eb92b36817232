"""DINOv2 register tokens: never reduced by any method, counted in the FLOPs, pooled out."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from clca_jax import flops
from clca_jax.models import METHODS, NO_REDUCTION, create_model, default_model_config
from clca_jax.models.vit import Block, VisionTransformer

REGISTERS = 4


def register_model(method: str, keep_rate: float = 0.5, clca: bool = True):
    config = default_model_config()
    config.backbone = "vit_small_patch14_reg4_dinov2.lvd142m"
    config.img_size, config.num_classes = 112, 5  # 8 x 8 patches
    config.embed_dim, config.depth, config.num_heads = 32, 4, 2
    config.reduction.method = method
    config.reduction.keep_rate = keep_rate
    config.reduction.locations = (1, 2)
    if clca:
        config.clca.head, config.clca.clc, config.clca.num_clr = "cla", True, 1
    return create_model(config)


def block_sequences(model, train: bool):
    """The sequences entering and leaving every `Block.attend` and `Block.feed_forward` call,
    in call order, with the logits and aux of the pass."""
    images = np.random.default_rng(0).standard_normal((2, 112, 112, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    # Distinct register tokens, so that a dropped or moved one shows.
    params = dict(variables["params"])
    params["reg_token"] = np.random.default_rng(1).standard_normal(params["reg_token"].shape)
    variables = {**variables, "params": params}

    def forward(variables, images):
        seen = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, Block) and context.method_name in (
                "attend",
                "feed_forward",
            ):
                seen.append((args[0], out[0] if context.method_name == "attend" else out))
            return out

        with nn.intercept_methods(record):
            (logits, aux), _ = model.apply(
                variables,
                images,
                train=train,
                rngs={"reduction": jax.random.key(2)},
                mutable=["batch_stats"],
            )
        return seen, logits, aux

    seen, logits, aux = jax.jit(forward)(variables, images)
    return [(np.asarray(a), np.asarray(b)) for a, b in seen], logits, aux


CASES = [(name, False) for name in METHODS if name != NO_REDUCTION] + [("dynamicvit", True)]


@pytest.mark.parametrize("method,train", CASES)
def test_register_tokens_pass_every_reduction_untouched(method, train):
    model = register_model(method)
    seen, logits, aux = block_sequences(model, train)
    assert len(seen) == 2 * model.backbone.depth
    assert np.isfinite(np.asarray(logits)).all()
    # Between consecutive calls only a reduction step (or the cache) acts; the tokens at
    # positions 1..4 must come out of it exactly as they went in.
    for (_, before), (after, _) in zip(seen[:-1], seen[1:], strict=True):
        np.testing.assert_array_equal(after[:, 1 : 1 + REGISTERS], before[:, 1 : 1 + REGISTERS])
    schedule = model.token_schedule(train)
    assert [tuple(c) for c in np.asarray(aux["token_counts"])] == [
        (plan.attn_tokens, plan.mlp_tokens) for plan in schedule.blocks
    ]
    assert any(plan.stage and plan.stage.plan.active for plan in schedule.blocks)


def test_schedule_adds_the_register_tokens_to_every_length():
    with_registers = register_model("evit").token_schedule()
    without = dataclasses.replace(
        register_model("evit"),
        backbone=dataclasses.replace(register_model("evit").backbone, reg_tokens=0),
    ).token_schedule()
    assert [(b.attn_tokens, b.mlp_tokens) for b in with_registers.blocks] == [
        (b.attn_tokens + REGISTERS, b.mlp_tokens + REGISTERS) for b in without.blocks
    ]
    assert with_registers.blocks[0].attn_tokens == 1 + REGISTERS + 64 + 1  # CLS, reg, P, CLR
    assert with_registers.pool_start == 1 + REGISTERS  # the cache's GAP skips them


def _without_registers(model: VisionTransformer) -> VisionTransformer:
    return dataclasses.replace(model, backbone=dataclasses.replace(model.backbone, reg_tokens=0))


@pytest.mark.parametrize("method", ["none", "evit"])
def test_macs_include_register_tokens_as_xla_counts_them(method):
    """The register tokens' share of our MAC count is half XLA's FLOPs for them (2 per MAC)."""
    model = register_model(method, clca=False)
    plain = _without_registers(model)
    macs = flops.count_macs(model).total_macs - flops.count_macs(plain).total_macs
    xla = flops.xla_flops(model) - flops.xla_flops(plain)
    assert macs > 0
    assert 0.95 < xla / (2 * macs) < 1.1
