"""Warm start from a converted checkpoint: copied, resampled, re-created and refused leaves."""

import os

import jax
import numpy as np
import pytest

from clca_jax import save_pretrained, train
from clca_jax.convert.resample import resample_pos_embed
from clca_jax.models import create_model
from clca_jax.training import sharding
from clca_jax.training.warm_start import warm_start
from tests.test_train_loop import compilation_cache, tiny_config  # noqa: F401

WIDTH = 8

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _array(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _source(head_classes=5, grid=2, num_clr=0, qkv_out=3 * WIDTH):
    return {
        "params": {
            "cls_token": _array((1, 1, WIDTH), 1),
            "pos_embed": _array((1, 1 + grid * grid + num_clr, WIDTH), 2),
            "blocks_0": {"attn": {"qkv": {"kernel": _array((WIDTH, qkv_out), 3)}}},
            "head": {"kernel": _array((WIDTH, head_classes), 4), "bias": _array(head_classes, 5)},
            "norm": {"scale": _array(WIDTH, 6)},
        }
    }


def _target(grid=4, num_clr=1):
    return {
        "params": {
            "cls_token": _array((1, 1, WIDTH), 11),
            "clr": _array((1, num_clr, WIDTH), 12),
            "pos_embed": _array((1, 1 + grid * grid + num_clr, WIDTH), 13),
            "blocks_0": {"attn": {"qkv": {"kernel": _array((WIDTH, 3 * WIDTH), 14)}}},
            "head": {"kernel": _array((WIDTH, 3), 15), "bias": _array(3, 16)},
            "cla": {"kernel": _array((WIDTH, WIDTH), 17)},
        },
        "batch_stats": {"cla": {"mean": _array(WIDTH, 18)}},
    }


def test_leaves_are_copied_resampled_recreated_or_kept_fresh():
    source, target = _source(), _target()
    merged, report = warm_start(target, source, grid=4, no_embed_class=False, seed=0)
    params, fresh = merged["params"], target["params"]
    np.testing.assert_array_equal(params["cls_token"], source["params"]["cls_token"])
    qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv, source["params"]["blocks_0"]["attn"]["qkv"]["kernel"])
    # CLR tokens start as copies of the checkpoint's class token.
    np.testing.assert_array_equal(params["clr"], source["params"]["cls_token"])
    # Position embedding: class row kept, 2x2 grid resampled to 4x4, a new N(0, 0.02^2) CLR row.
    expected = resample_pos_embed(source["params"]["pos_embed"], (4, 4), 1, antialias=True)
    np.testing.assert_allclose(params["pos_embed"][:, :17], expected, rtol=1e-6)
    clr_row = params["pos_embed"][0, 17]
    assert clr_row.shape == (WIDTH,) and 0 < np.abs(clr_row).max() < 0.1
    # The 3-class head, the new module and the batch statistics stay as initialised.
    assert params["head"]["kernel"] is fresh["head"]["kernel"]
    assert params["cla"]["kernel"] is fresh["cla"]["kernel"]
    assert merged["batch_stats"]["cla"]["mean"] is target["batch_stats"]["cla"]["mean"]
    assert report.dropped == ["params/norm/scale"]
    assert len(report.copied) == 2
    assert set(report.fresh) == {
        "params/head/kernel",
        "params/head/bias",
        "params/cla/kernel",
        "batch_stats/cla/mean",
    }
    assert "4x4" in report.adapted["params/pos_embed"]


def test_checkpoint_clr_rows_and_same_class_head_are_kept():
    source = _source(head_classes=3, grid=4, num_clr=1)
    source["params"]["clr"] = _array((1, 1, WIDTH), 7)
    merged, report = warm_start(_target(), source, grid=4, no_embed_class=False, seed=0)
    params = merged["params"]
    np.testing.assert_array_equal(params["pos_embed"], source["params"]["pos_embed"])
    np.testing.assert_array_equal(params["clr"], source["params"]["clr"])
    np.testing.assert_array_equal(params["head"]["kernel"], source["params"]["head"]["kernel"])
    assert not report.adapted


def test_other_shape_mismatch_names_the_leaf():
    with pytest.raises(ValueError, match=r"'params/blocks_0/attn/qkv/kernel' has shape \(8, 12\)"):
        warm_start(_target(), _source(qkv_out=12), grid=4, no_embed_class=False, seed=0)


def test_run_starts_from_a_converted_directory_of_another_size(tmp_path):
    # A "converted" 5-class model at 32 px without CLR tokens ...
    source_config = tiny_config("unused").model
    source_config.num_classes = 5
    source_model = create_model(source_config)
    source = source_model.init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))
    converted = str(tmp_path / "converted")
    save_pretrained(converted, source, source_config)
    # ... starts a 3-class run at 64 px with one CLR token.
    config = tiny_config("unused")
    config.model.update(img_size=64, num_classes=3)
    config.model.clca.num_clr = 1
    config.init.checkpoint = converted
    mesh = sharding.make_mesh(config.mesh)
    model = create_model(config.model)
    tx, _ = train.optimizer_and_schedule(config, model, steps_per_epoch=1)
    state = train.initial_state(config, model, tx, mesh, str(tmp_path))

    params, old = state.params, source["params"]
    fc2 = params["blocks_1"]["mlp"]["fc2"]["kernel"]
    np.testing.assert_array_equal(fc2, old["blocks_1"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_array_equal(params["clr"], old["cls_token"])
    assert params["pos_embed"].shape == (1, 1 + 16 + 1, 32)
    assert params["head"]["kernel"].shape == (32, 3)
    with open(os.path.join(tmp_path, "init.txt")) as f:
        report = f.read()
    assert "2x2 -> 4x4 grid" in report and "fresh params/head/kernel" in report
