"""A bad checkpoint or a wrong --model stops the conversion with a message naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

from clca_jax import load_pretrained
from clca_jax.convert.cli import main as convert_main
from tests.timm_helpers import TINY, make_timm_model, save_state_dict

SIZES = ["--embed-dim", "64", "--depth", "2", "--num-heads", "2"]


@pytest.fixture(scope="module")
def tiny_state():
    return make_timm_model("vit_tiny_patch16_224", 224, 10, **TINY).state_dict()


def run(tmp_path, checkpoint, capsys, model="vit_tiny_patch16_224", sizes=SIZES):
    out = tmp_path / "out"
    code = convert_main(
        ["--checkpoint", str(checkpoint), "--model", model, "--out", str(out)] + sizes
    )
    return code, capsys.readouterr().err, out


def test_truncated_pth(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    code, err, out = run(tmp_path, path, capsys)
    assert code == 2
    assert "Cannot read" in err and "w.pth" in err
    assert not out.exists()


def test_garbage_safetensors(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00\x01 not a safetensors file")
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2 and "Cannot read" in err and "w.safetensors" in err


def test_wrong_model_names_the_architecture(tmp_path, capsys):
    state = make_timm_model("vit_small_patch16_224", 224, 10, depth=2).state_dict()
    path = save_state_dict(state, str(tmp_path / "small.pth"))
    code, err, out = run(tmp_path, path, capsys, model="vit_base_patch16_224", sizes=[])
    assert code == 2
    assert "does not fit --model vit_base_patch16_224" in err
    assert "embed_dim: checkpoint 384, model 768" in err
    assert "depth: checkpoint 2, model 12" in err
    assert not out.exists()


def test_clip_weights_for_a_plain_vit(tmp_path, capsys):
    state = make_timm_model("vit_base_patch16_clip_224", 224, 10, **TINY).state_dict()
    path = save_state_dict(state, str(tmp_path / "clip.pth"))
    code, err, _ = run(tmp_path, path, capsys, model="vit_base_patch16_224")
    assert code == 2
    assert "pre_norm: checkpoint True, model False" in err


def test_mis_shaped_key(tmp_path, tiny_state, capsys):
    state = dict(tiny_state)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    path = save_state_dict(state, str(tmp_path / "w.pth"))
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2
    assert "'blocks.1.mlp.fc1.weight' has shape (64, 100)" in err
    assert "expects (64, 256)" in err


def test_unknown_key(tmp_path, tiny_state, capsys):
    state = dict(tiny_state, **{"dist_token": torch.zeros(1, 1, 64)})
    path = save_state_dict(state, str(tmp_path / "w.pth"))
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2 and "'dist_token' (shape (1, 1, 64)) has no place" in err


def test_missing_key(tmp_path, tiny_state, capsys):
    state = {k: v for k, v in tiny_state.items() if k != "norm.bias"}
    path = save_state_dict(state, str(tmp_path / "w.pth"))
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2 and "Checkpoint has no 'norm.bias' (shape (64,))" in err


def test_image_size_not_divisible(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    code, err, _ = run(tmp_path, path, capsys, sizes=SIZES + ["--img-size", "100"])
    assert code == 2 and "model.img_size=100 is not divisible by the patch size 16" in err


def test_unknown_backbone(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    code, err, _ = run(tmp_path, path, capsys, model="vit_tiny_patch16_225")
    assert code == 2 and "Unknown backbone 'vit_tiny_patch16_225'" in err


def test_existing_output_is_not_overwritten(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    assert run(tmp_path, path, capsys)[0] == 0
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2 and "already exists" in err


def test_load_pretrained_rejects_config_of_another_model(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    assert run(tmp_path, path, capsys)[0] == 0
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["depth"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing params/blocks_2/attn/proj/bias"):
        load_pretrained(str(tmp_path / "out"))
