"""A reduction method that lives only in this test plugs into the whole library.

`UniformStride` keeps evenly spaced tokens and scales them by a learned per-stage gain. It is
registered under a new name and then used, with no change to library files, by the config
validation, the FLOPs table, the forward pass, a training step, the converter and the
kept-token picture: the proof that every part asks the method class, not its name.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax import flops, train, visualize
from clca_jax.convert import convert_state_dict
from clca_jax.models import METHODS, create_model, default_model_config, register_method
from clca_jax.models.reduction import Method, PlanContext, Reduced, Stage, StagePlan, Tokens
from clca_jax.training import sharding
from tests.test_train_loop import build, fabricated_folder, tiny_config
from tests.timm_helpers import TINY, make_timm_model

NAME = "uniform_stride"
IMG_SIZE = 64  # 16 patches of 16 px


def stride_positions(reducible: int, keep: int) -> np.ndarray:
    """`keep` evenly spaced positions among tokens 1..reducible."""
    return 1 + (np.arange(keep) * reducible) // keep


class UniformStride(Method, nn.Module):
    """Keeps every (1/keep_rate)-th token, scaled by a learned gain (a test-only method)."""

    stage: Stage
    placement: ClassVar[str] = "before"
    kept_kind: ClassVar[str] = "positions"
    official_prefix: ClassVar[str] = "stride_layers"

    @staticmethod
    def plan(context: PlanContext) -> StagePlan:
        keep = max(1, math.ceil(context.keep_rate * context.candidates))
        return StagePlan(keep, 1 + keep + context.protected)

    @staticmethod
    def macs(stage: Stage, width: int, heads: int) -> int:
        return stage.plan.count * width  # the gain

    @nn.compact
    def __call__(self, tokens: Tokens, attention, train: bool) -> Reduced:
        del attention, train
        keep, end = self.stage.plan.count, tokens.length - self.stage.protected
        positions = stride_positions(self.stage.reducible, keep)
        gain = self.param("gain", nn.initializers.ones, ())
        x = jnp.concatenate(
            [tokens.x[:, :1], tokens.x[:, positions] * gain, tokens.x[:, end:]], axis=1
        )
        kept = jnp.broadcast_to(jnp.asarray(positions), (x.shape[0], keep))
        return Reduced(Tokens(x=x), kept)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, NAME, UniformStride)


def stride_model_config(backbone: str = "vit_tiny_patch16_224", **sizes):
    config = default_model_config()
    config.backbone = backbone
    config.update(img_size=IMG_SIZE, num_classes=3, **sizes)
    config.reduction.update(method=NAME, keep_rate=0.5, locations=(1,))
    return config


def test_the_schedule_and_the_flops_table_follow_the_method():
    model = create_model(stride_model_config(embed_dim=32, depth=2, num_heads=2))
    blocks = model.token_schedule().blocks
    assert [(b.attn_tokens, b.mlp_tokens) for b in blocks] == [(17, 17), (9, 9)]
    cost = flops.count_macs(model)
    expected = flops.attention_macs(9, 32, False) + flops.mlp_macs(9, 32, 128, False)
    assert cost.block_macs[1] == expected + 8 * 32  # the method's own MACs are counted
    table = flops.format_table(stride_model_config(), flops.report_dict(model, with_xla=False))
    assert "reduction uniform_stride" in table


def test_forward_keeps_the_strided_tokens_and_an_unknown_name_is_refused():
    model = create_model(stride_model_config(embed_dim=32, depth=2, num_heads=2))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, IMG_SIZE, IMG_SIZE, 3)))
    variables = model.init(jax.random.key(0), images)
    assert float(variables["params"]["reduction_0"]["gain"]) == 1.0
    logits, aux = model.apply(variables, images)
    assert logits.shape == (2, 3)
    np.testing.assert_array_equal(aux["kept"][0], [stride_positions(16, 8)] * 2)
    np.testing.assert_array_equal(aux["token_counts"], [[17, 17], [9, 9]])
    config = stride_model_config()
    config.reduction.method = "uniform_strid"
    with pytest.raises(ValueError, match="uniform_stride"):  # the registered name is listed
        create_model(config)


def test_a_training_step_learns_the_gain(tmp_path):
    config = tiny_config(fabricated_folder(str(tmp_path / "data")))
    config.model.update(img_size=IMG_SIZE)
    config.model.reduction.update(method=NAME, keep_rate=0.5, locations=(1,))
    mesh, inputs, model, tx, schedule, state = build(config, str(tmp_path / "run"))
    step = train.compile_train_step(model, tx, schedule, sharding.tree_shardings(state, mesh), mesh)
    batch = sharding.global_batch(next(inputs.train), sharding.batch_sharding(mesh))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics.compute()["loss"]))
    assert float(new_state.params["reduction_0"]["gain"]) != 1.0


def test_conversion_maps_the_methods_own_checkpoint_key():
    source = make_timm_model("vit_tiny_patch16_224", IMG_SIZE, 3, seed=1, **TINY)
    state = {key: value.detach().numpy() for key, value in source.state_dict().items()}
    state["stride_layers.0.gain"] = np.float32(1.75)
    variables, report = convert_state_dict(state, stride_model_config(**TINY))
    assert float(variables["params"]["reduction_0"]["gain"]) == 1.75
    assert "stride_layers.0.gain" in report.copied
    del state["stride_layers.0.gain"]
    with pytest.raises(ValueError, match="stride_layers.0.gain"):
        convert_state_dict(state, stride_model_config(**TINY))


def test_the_kept_token_picture_dims_the_dropped_patches():
    model = create_model(stride_model_config(embed_dim=32, depth=2, num_heads=2))
    variables = model.init(jax.random.key(0), model.example_images())
    pixels = np.random.default_rng(0).integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), np.uint8)
    row = visualize.kept_tokens(model, variables, pixels)
    kept_patches = stride_positions(16, 8) - 1
    np.testing.assert_array_equal(np.flatnonzero(row.slots[0] >= 0), kept_patches)
    assert row.label == f"{NAME} kr=0.5" and not row.merging
    figure = visualize.plot_kept_tokens([row])
    assert len(figure.axes) >= 2


def test_register_method_makes_a_name_usable_and_refuses_non_methods(monkeypatch):
    monkeypatch.delitem(METHODS, NAME)
    register_method(NAME, UniformStride)
    assert METHODS[NAME] is UniformStride
    with pytest.raises(TypeError, match="not a subclass"):
        register_method("other", object)
    with pytest.raises(ValueError, match="already registered"):
        register_method("evit", UniformStride)
