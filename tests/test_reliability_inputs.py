"""Bad input: each case stops with a message naming what was wrong, and changes nothing.

Every case runs `train.train_and_evaluate` against a copy of a workdir that already holds a
finished run (or an empty one, where the case needs a fresh run) and compares the workdir's
files (path, SHA-256, mtime) before and after. An unwritable checkpoint directory is made by
putting the workdir under a regular file (`<file>/run`): tests run as root, for whom `chmod`
does not take write access away, but nobody can create a directory inside a file.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from clca_jax import data, save_pretrained, train
from clca_jax.data import fabricate
from clca_jax.models import create_model
from clca_jax.training.config import config_from_dict
from tests.test_reliability_kill import REPO, write_cli_config
from tests.test_train_loop import compilation_cache, fabricated_folder, tiny_config  # noqa: F401

pytestmark = [
    pytest.mark.usefixtures("compilation_cache"),
    # orbax's reader tasks of a damaged checkpoint end with exceptions nobody awaits
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def snapshot(root: str) -> dict[str, tuple]:
    """Every file and folder under `root`: files by content hash and mtime."""
    listing = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            listing[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            listing[os.path.relpath(path, root)] = (digest, os.stat(path).st_mtime_ns)
    return listing


def files_only(listing: dict) -> dict:
    return {k: v for k, v in listing.items() if v != ("dir",)}


def _largest_state_file(workdir: str) -> str:
    paths = []
    for folder, _, files in os.walk(os.path.join(workdir, "checkpoints", "3", "state")):
        paths += [os.path.join(folder, name) for name in files]
    return max(paths, key=os.path.getsize)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _scramble(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _converted_other_architecture(root: str) -> str:
    """A converted model directory of a width-16 ViT (the runs are width 32)."""
    path = os.path.join(root, "converted_w16")
    if not os.path.isdir(path):
        model_config = tiny_config("unused").model
        model_config.update(embed_dim=16, num_classes=3)
        variables = create_model(model_config).init(
            jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
        )
        save_pretrained(path, variables, model_config)
    return path


def _bad_images_data(root: str) -> str:
    """The fabricated data plus one training "image" that is not an image."""
    path = os.path.join(root, "bad_images")
    if not os.path.isdir(path):
        fabricated_folder(path)
        fabricate.write_corrupt(os.path.join(path, "class_01", "img_000.png"))
    return path


def _set(**fields):
    """A change of config fields, `section__field=value`."""

    def change(config, root):
        for key, value in fields.items():
            section, field = key.split("__")
            config[section][field] = value

    return change


def _unknown_field(config, root):
    config.train.unlock()
    config.train.epoch = 2


def _keep_rate(config, root):
    config.model.reduction.method = "evit"
    config.model.reduction.keep_rate = 1.5


def _init_from(config, root):
    config.init.checkpoint = _converted_other_architecture(root)


def _data_with_bad_image(config, root):
    config.data.dir = _bad_images_data(root)
    config.train.epochs = 2  # resumes the finished epoch, then reads the bad file


# (name, config change, workdir, damage to the workdir, error, message); workdir: "finished"
# (a copy of the finished run), "resumed" (the same, trained further), "fresh", or an
# unwritable kind.
CASES = [
    ("batch size 0", _set(train__batch_size=0), "finished", None, ValueError,
     r"train.batch_size must be a positive integer, got 0"),
    ("learning rate negative", _set(optim__lr=-1e-3), "finished", None, ValueError,
     r"optim.lr must be a finite number >= 0, got -0.001"),
    ("learning rate inf", _set(optim__lr=float("inf")), "finished", None, ValueError,
     r"optim.lr must be a finite number >= 0, got inf"),
    ("beta out of range", _set(optim__b1=1.5), "finished", None, ValueError,
     r"optim.b1 must be in \[0, 1\), got 1.5"),
    ("epochs of type bool", _set(train__epochs=True), "finished", None, ValueError,
     r"train.epochs must be a positive integer, got True"),
    ("unknown on_nonfinite", _set(train__on_nonfinite="ignore"), "finished", None, ValueError,
     r"train.on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"),
    ("keep rate out of range", _keep_rate, "finished", None, ValueError, r"keep_rate"),
    ("unknown field", _unknown_field, "finished", None, ValueError,
     r"config.train.epoch is not a known config field.*Did you mean config.train.epochs"),
    ("patch does not divide the image", _set(model__img_size=40), "finished", None, ValueError,
     r"model.img_size=40 is not divisible"),
    ("workdir of another model", _set(model__embed_dim=64), "finished", None, ValueError,
     r"holds a run of another model \(model.embed_dim: 32 -> 64\)"),
    ("converted checkpoint of another architecture", _init_from, "fresh", None, ValueError,
     r"init.checkpoint leaf .* the checkpoint was converted for another architecture"),
    ("truncated checkpoint file", _set(train__epochs=2), "finished", "truncate", ValueError,
     r"cannot restore checkpoint .*checkpoints/3: .*delete that folder to resume from step 2"),
    ("corrupt checkpoint file", _set(train__epochs=2), "finished", "scramble", ValueError,
     r"cannot restore checkpoint .*checkpoints/3"),
    ("corrupt input position", _set(train__epochs=2), "finished", "loader", ValueError,
     r"cannot restore checkpoint .*checkpoints/3"),
    ("image that is not an image", _data_with_bad_image, "resumed", None, data.BadImageError,
     r"cannot read or decode image .*class_01/img_000.png"),
    ("checkpoint directory is a file", _set(), "checkpoints_file", None, OSError,
     r"cannot write checkpoints to .*/checkpoints: .*Nothing was trained"),
    ("workdir under a regular file", _set(), "under_file", None, OSError,
     r"cannot write checkpoints to .*/run/checkpoints: Not a directory"),
]  # fmt: skip


def _prepare_workdir(kind: str, damage: str | None, finished_dir: str, case_root: str) -> str:
    if kind == "fresh":
        return os.path.join(case_root, "run")
    if kind == "resumed":
        kind = "finished"
    if kind == "under_file":
        with open(os.path.join(case_root, "a_file"), "w") as f:
            f.write("not a directory\n")
        return os.path.join(case_root, "a_file", "run")
    if kind == "checkpoints_file":
        workdir = os.path.join(case_root, "run")
        os.makedirs(workdir)
        with open(os.path.join(workdir, "checkpoints"), "w") as f:
            f.write("not a directory\n")
        return workdir
    workdir = os.path.join(case_root, "run")
    shutil.copytree(finished_dir, workdir)
    if damage == "truncate":
        _truncate(_largest_state_file(workdir))
    elif damage == "scramble":
        _scramble(_largest_state_file(workdir))
    elif damage == "loader":
        _truncate(os.path.join(workdir, "checkpoints", "3", "loader", "metadata"))
    return workdir


def test_bad_inputs_are_refused_and_change_nothing(finished, tmp_path):
    root, data_dir, finished_dir = finished
    tried = []
    for index, (name, change, kind, damage, error_type, message) in enumerate(CASES):
        case_root = str(tmp_path / f"case{index}")
        os.makedirs(case_root)
        workdir = _prepare_workdir(kind, damage, finished_dir, case_root)
        config = tiny_config(data_dir, train__epochs=1)
        change(config, str(root))
        before = snapshot(case_root)
        with pytest.raises(error_type, match=message):
            train.train_and_evaluate(config, workdir)
        after = snapshot(case_root)
        if kind == "fresh":
            # A new run may have made its (empty) folders; it wrote no file.
            assert files_only(after) == files_only(before), name
        elif kind == "resumed":
            # Images are decoded when first read, so this is found while training: the run
            # has started (config.json, TensorBoard, checkpoints kept up to max_to_keep), but
            # the checkpoint it resumed from is as it was.
            saved = {k: v for k, v in before.items() if k.startswith("run/checkpoints/3/")}
            assert {k: after.get(k) for k in saved} == saved, name
        else:
            assert after == before, name
        tried.append(name)
    print(f"\nbad inputs tried: {len(tried)}: {tried}")
    assert len(tried) == len(CASES) == 17


def test_a_saved_config_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match=r"config.train.epochs in the saved config is 'ten'"):
        config_from_dict({"train": {"epochs": "ten"}})


def test_command_line_overrides_of_unknown_fields_or_wrong_types_are_refused(finished, tmp_path):
    root, data_dir, _ = finished
    config_path = write_cli_config(str(tmp_path / "tiny_cli.py"), data_dir)
    workdir = str(tmp_path / "run")
    cases = [
        ("--config.train.epoch=3", "names a field the config does not have"),
        ("--config.train.batch_size=eight", "batch_size"),
    ]
    for flag, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "clca_jax.main", f"--config={config_path}"]
            + [f"--workdir={workdir}", flag],
            cwd=REPO,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and message in done.stderr, (flag, done.stderr[-2000:])
        assert not os.path.exists(workdir)
    print(f"\ncommand-line bad inputs tried: {len(cases)}")
