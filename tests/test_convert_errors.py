"""A bad checkpoint or a wrong --model stops the conversion with a message naming the problem."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from clca_jax import load_pretrained
from clca_jax.convert.cli import main as convert_main
from tests.timm_helpers import TINY, make_timm_model, save_state_dict

SIZES = ["--embed-dim", "64", "--depth", "2", "--num-heads", "2"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# --- the output folder (issue 14, item 1) ----------------------------------------------------


def listing(root):
    """Every path under `root` with its content hash (files) or None (folders)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def convert(checkpoint, out, *extra):
    args = ["--checkpoint", str(checkpoint), "--model", "vit_tiny_patch16_224", "--out", str(out)]
    return convert_main(args + SIZES + list(extra))


def test_out_holding_a_training_run_is_refused_and_left_as_it_was(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text('{"train": {"epochs": 3}}')
    (workdir / "summary.json").write_text("{}")
    before = listing(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert convert(path, workdir, *extra) == 2
        err = capsys.readouterr().err
        assert "holds files of something other than a converted model" in err
        assert err.count("\n") == 1
        assert listing(tmp_path) == before


def test_out_holding_only_a_config_is_refused(tmp_path, tiny_state, capsys):
    # Without variables/ the old check let config.json and conversion.txt be overwritten.
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = listing(tmp_path)
    assert convert(path, out) == 2
    assert "other than a converted model" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_converted_model_is_replaced_only_with_overwrite(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    out = tmp_path / "out"
    assert convert(path, out) == 0
    before = listing(tmp_path)
    assert convert(path, out, "--num-classes", "7") == 2
    assert "pass --overwrite (overwrite=True) to replace it" in capsys.readouterr().err
    assert listing(tmp_path) == before
    assert convert(path, out, "--num-classes", "7", "--overwrite") == 0
    model, _ = load_pretrained(str(out))
    assert model.num_classes == 7
    assert sorted(os.listdir(tmp_path)) == ["out", "w.pth"]  # no temporary folder left


def test_empty_out_folder_is_used(tmp_path, tiny_state):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    (tmp_path / "out").mkdir()
    assert convert(path, tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "conversion.txt", "variables"]


@pytest.mark.parametrize("where", ["below", "is"])
def test_out_at_or_below_a_regular_file_is_refused(tmp_path, tiny_state, capsys, where):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    (tmp_path / "a_file").write_text("not a folder\n")
    out = tmp_path / "a_file" / "out" if where == "below" else tmp_path / "a_file"
    before = listing(tmp_path)
    assert convert(path, out) == 2
    err = capsys.readouterr().err
    assert ("a_file is a file, not a folder" if where == "below" else "is a file;") in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert listing(tmp_path) == before


_KILL_WHILE_SAVING = """
import os, signal, sys
import orbax.checkpoint as ocp
from clca_jax.convert.cli import main

finish = ocp.StandardCheckpointer.wait_until_finished

def finish_then_die(self):
    finish(self)  # the variables are on disk, the config is not
    os.kill(os.getpid(), signal.SIGKILL)

ocp.StandardCheckpointer.wait_until_finished = finish_then_die
sys.exit(main(sys.argv[1:]))
"""


def _convert_and_get_killed(checkpoint, out, *extra):
    args = ["--checkpoint", str(checkpoint), "--model", "vit_tiny_patch16_224", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_WHILE_SAVING, *args, *SIZES, *extra],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_conversion_killed_while_saving_leaves_no_half_written_out(tmp_path, tiny_state):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    out = tmp_path / "out"
    _convert_and_get_killed(path, out)
    assert not out.exists()
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".out.partial-")]
    assert len(leftovers) == 1
    assert convert(path, out) == 0  # ... and the next conversion removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["out", "w.pth"]
    load_pretrained(str(out))


def test_overwrite_killed_while_saving_keeps_the_old_model(tmp_path, tiny_state):
    path = save_state_dict(tiny_state, str(tmp_path / "w.pth"))
    out = tmp_path / "out"
    assert convert(path, out) == 0
    before = listing(out)
    _convert_and_get_killed(path, out, "--num-classes", "7", "--overwrite")
    assert listing(out) == before
    assert load_pretrained(str(out))[0].num_classes == 10


# --- checkpoints that are not what they claim (item 12) --------------------------------------


def test_resnet_state_dict_is_reported_as_not_a_vit(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    resnet = {
        "conv1.weight": torch.randn(8, 3, 7, 7, generator=generator),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3, generator=generator),
        "fc.weight": torch.randn(10, 8, generator=generator),
        "fc.bias": torch.zeros(10),
    }
    path = save_state_dict(resnet, str(tmp_path / "resnet.pth"))
    code, err, out = run(tmp_path, path, capsys)
    assert code == 2 and "not a timm Vision Transformer state dict" in err
    assert "qkv_bias" not in err and "patch_bias" not in err
    assert not out.exists()


def test_prefixed_vit_keys_are_pointed_out(tmp_path, tiny_state, capsys):
    state = {f"module.{key}": value for key, value in tiny_state.items()}
    path = save_state_dict(state, str(tmp_path / "ddp.pth"))
    code, err, _ = run(tmp_path, path, capsys)
    assert code == 2 and "carry the prefix 'module.'" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"<html><body>Rate limit exceeded</body></html>\n", r"is not a PyTorch checkpoint"),
        (b"", r"is empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", r"is a Git LFS pointer"),
    ],
)
def test_file_that_is_not_a_torch_checkpoint_is_named(tmp_path, capsys, content, message):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    code, err, out = run(tmp_path, path, capsys)
    assert code == 2 and re.search(rf"w.pth {message}", err), err
    assert "pop from empty list" not in err and not out.exists()


def test_safetensors_named_pth_is_recognised(tmp_path, tiny_state, capsys):
    path = save_state_dict(tiny_state, str(tmp_path / "w.safetensors"))
    os.rename(path, tmp_path / "w.pth")
    code, err, _ = run(tmp_path, tmp_path / "w.pth", capsys)
    assert code == 2 and "is a safetensors file; name it .safetensors" in err


def test_missing_checkpoint_or_a_folder_is_named(tmp_path, capsys):
    code, err, _ = run(tmp_path, tmp_path / "nothing.pth", capsys)
    assert code == 2 and "nothing.pth does not exist" in err
    code, err, _ = run(tmp_path, tmp_path, capsys)
    assert code == 2 and "is a folder" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_naming_the_tensor(
    tmp_path, tiny_state, capsys, bad, suffix
):
    state = dict(tiny_state)
    weight = state["blocks.1.mlp.fc2.weight"].clone().double()
    weight[3, 5] = bad
    state["blocks.1.mlp.fc2.weight"] = weight
    path = save_state_dict(state, str(tmp_path / f"w{suffix}"))
    code, err, out = run(tmp_path, path, capsys)
    assert code == 2 and "tensor 'blocks.1.mlp.fc2.weight' holds" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [f"w{suffix}"]


def test_a_save_killed_between_its_renames_gets_the_previous_output_back(tmp_path):
    """Killed after moving the old model aside and before moving the new one in: the next
    write to that place restores the old model rather than deleting it as a leftover."""
    import socket

    from clca_jax import pretrained

    dead = 4_194_000  # above any running process's id on this machine
    while pretrained._process_alive(dead):
        dead += 1
    tag = f"{socket.gethostname()}-{dead}"
    old = tmp_path / f".model.replaced-{tag}"
    old.mkdir()
    (old / "config.json").write_text("the previous model")
    partial = tmp_path / f".model.partial-{tag}"
    partial.mkdir()
    (partial / "config.json").write_text("half of the new one")
    pretrained._remove_stale_leftovers(str(tmp_path), "model")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == "the previous model"
