"""Official CLCA training checkpoints convert into models with the reference's logits."""

from __future__ import annotations

import argparse
import os
import textwrap

import numpy as np
import pytest
import torch

from clca_jax import load_pretrained
from clca_jax.convert.cli import main as convert_main
from tests import command_line
from tests.reference import clca_numpy as ref

IMG = 64
REFERENCE_CFG = dict(
    embed_dim=32, depth=6, num_heads=2, method="evit", keep_rate=0.3, reduction_loc=[1, 2, 3],
    head="cla", clc=True, num_clr=1, num_classes=5, pre_norm=True, ln_eps=1e-5, patch_bias=False,
)  # fmt: skip

CONFIG_FILE = textwrap.dedent(
    """
    import ml_collections
    from clca_jax.models import default_model_config

    def get_config(variant=None):
        model = default_model_config()
        model.backbone = "vit_base_patch16_clip_224.laion2b"
        model.img_size = 64
        model.embed_dim, model.depth, model.num_heads = 32, 6, 2
        model.num_classes = 5
        model.reduction.method = "evit"
        model.reduction.keep_rate = 0.3
        model.reduction.locations = (1, 2, 3)
        model.clca.head, model.clca.clc, model.clca.num_clr = "cla", True, 1
        return ml_collections.ConfigDict({"model": model})
    """
)


def write_checkpoint(path, state, extra=None):
    payload = {
        "model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 49,
        **(extra or {}),
    }
    torch.save(payload, path)


@pytest.fixture
def checkpoint(tmp_path):
    state = ref.random_official_state_dict(REFERENCE_CFG, IMG, seed=3)
    path = tmp_path / "checkpoint.pth"
    write_checkpoint(path, state)
    config_path = tmp_path / "clca_config.py"
    config_path.write_text(CONFIG_FILE)
    return state, path, config_path


def test_official_checkpoint_gives_reference_logits(tmp_path, checkpoint):
    state, path, config_path = checkpoint
    out = tmp_path / "converted"
    argv = ["--checkpoint", str(path), "--config", str(config_path), "--out", str(out)]
    assert convert_main(argv) == 0
    model, variables = load_pretrained(str(out))
    images = np.random.default_rng(0).standard_normal((3, IMG, IMG, 3))
    expected, _ = ref.forward(state, REFERENCE_CFG, images.transpose(0, 3, 1, 2))
    logits, _ = model.apply(variables, images.astype(np.float32))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    notes = (out / "conversion.txt").read_text()
    assert "dropped head.weight: the reference's unused classifier" in notes
    assert "dropped ifa_head.0.0.num_batches_tracked" in notes
    running_var = variables["batch_stats"]["cla_head"]["norm_mid"]["var"]
    np.testing.assert_allclose(running_var, state["ifa_head.0.2.running_var"])


def test_python_objects_need_trust(tmp_path, checkpoint, capsys):
    state, _, config_path = checkpoint
    path = tmp_path / "with_args.pth"
    write_checkpoint(path, state, {"args": argparse.Namespace(lr=1e-4)})
    base = ["--checkpoint", str(path), "--config", str(config_path)]
    assert convert_main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "--trust_pickle" in capsys.readouterr().err
    assert convert_main(base + ["--out", str(tmp_path / "b"), "--trust_pickle"]) == 0


def test_checkpoint_of_another_method_is_refused(tmp_path, checkpoint, capsys):
    _, _, config_path = checkpoint
    other = ref.random_official_state_dict(dict(REFERENCE_CFG, method="dynamicvit"), IMG, seed=3)
    path = tmp_path / "dynamicvit.pth"
    write_checkpoint(path, other)
    code = convert_main(
        ["--checkpoint", str(path), "--config", str(config_path), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "'score_predictor.0.in_conv.0.bias'" in capsys.readouterr().err


def test_config_by_name_from_another_folder(tmp_path):
    """`tools/convert_timm_weights.py --config soyglobal:tiny` run outside the checkout: the
    shipped config (found by name) describes the checkpoint's model."""
    tiny_cfg = dict(REFERENCE_CFG, depth=5, keep_rate=0.1, reduction_loc=[1, 2], num_classes=1938)
    state = ref.random_official_state_dict(tiny_cfg, IMG, seed=4)
    path = tmp_path / "soyglobal_tiny.pth"
    write_checkpoint(path, state)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tool = os.path.join(command_line.REPO, "tools", "convert_timm_weights.py")
    argv = [tool, "--checkpoint", str(path), "--config", "soyglobal:tiny", "--out", "converted"]
    done = command_line.run(argv, cwd=str(elsewhere), tmp=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    model, variables = load_pretrained(str(elsewhere / "converted"))
    images = np.random.default_rng(0).standard_normal((2, IMG, IMG, 3))
    expected, _ = ref.forward(state, tiny_cfg, images.transpose(0, 3, 1, 2))
    logits, _ = model.apply(variables, images.astype(np.float32))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
