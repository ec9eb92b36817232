"""The own-data config (`folder`, `folder:csv`): its default splits exist, its docstring's
commands train and predict as typed, a carved split is logged, the class names are kept and
guarded on resume, and a converted model warm-starts it."""

import importlib
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from clca_jax import config_files, data, save_pretrained, train
from clca_jax.configs import common
from clca_jax.data import fabricate
from clca_jax.models import create_model
from clca_jax.training import sharding, workdirs
from clca_jax.training.config import validate_config
from tests import command_line
from tests.test_train_loop import fabricated_folder, tiny_config


def docstring_command(module: str, starts: str) -> str:
    """The command of a module's docstring that starts with `starts`, continuation lines
    joined."""
    doc = importlib.import_module(module).__doc__
    match = re.search(re.escape(starts) + r"(?:[^\n]*\\\n)*[^\n]*", doc)
    assert match, f"no command starting with {starts!r} in {module}"
    return " ".join(match.group(0).replace("\\\n", " ").split())


def csv_dataset(root: str, files: dict[str, list[tuple[str, int]]]) -> str:
    """`root/<split>.csv` files naming images under `root/images/`."""
    for split_rows in files.values():
        for seed, (path, _) in enumerate(split_rows):
            fabricate.write_image(os.path.join(root, path), seed=seed)
    for split, rows in files.items():
        fabricate.write_csv(os.path.join(root, f"{split}.csv"), rows)
    return root


def rows(prefix: str, per_class: int, classes: int = 2) -> list[tuple[str, int]]:
    return [(f"images/{prefix}_{c}_{i}.png", c) for c in range(classes) for i in range(per_class)]


def test_default_splits_exist_for_a_class_folder(tmp_path):
    config = config_files.load("folder")
    assert (config.data.name, config.data.train_split, config.data.eval_split) == (
        "folder",
        "train",
        "val",
    )
    # Without a variant: the paper's setting, fine-tuned from the converted CLIP model.
    paper = config_files.load("soyglobal")
    assert config.model.to_dict() | {"num_classes": 0} == paper.model.to_dict() | {"num_classes": 0}
    assert config.init.checkpoint == common.PRETRAINED
    config.data.dir = fabricated_folder(str(tmp_path / "data"))
    loaded = data.load_data(config.data)
    assert (len(loaded.train), len(loaded.eval), loaded.num_classes) == (24, 6, 3)
    assert loaded.class_names == ["class_00", "class_01", "class_02"]


@pytest.mark.parametrize(
    "files, sizes",
    [
        ({"train_val": rows("a", 5)}, (8, 2)),
        ({"train": rows("t", 3), "val": rows("v", 2)}, (6, 4)),
    ],
    ids=["train_val.csv", "train.csv+val.csv"],
)
def test_csv_variant_splits_exist(files, sizes, tmp_path):
    config = config_files.load("folder:csv")
    assert config.data.name == "csv"
    config.data.dir = csv_dataset(str(tmp_path / "data"), files)
    loaded = data.load_data(config.data)
    assert (len(loaded.train), len(loaded.eval)) == sizes
    assert config_files.load("folder:csv,tiny").model.img_size == 64


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match=r"unknown config variant 'csv,big'; use any of"):
        config_files.load("folder:csv,big")


def test_a_carved_split_is_logged(tmp_path, caplog):
    root = fabricated_folder(str(tmp_path / "data"))
    with caplog.at_level(logging.INFO):
        data.folder.load_folder(root, "train", "val")
    assert f"split 'train': carved 24 of the 30 images of 'train_val' in folder {root}" in (
        caplog.text
    )
    assert "split 'val': carved 6 of the 30 images" in caplog.text
    assert "no seed" in caplog.text


def test_docstring_commands_train_from_scratch_and_predict(tmp_path):
    images = fabricated_folder(str(tmp_path / "images"))
    train_command = docstring_command("clca_jax.configs.folder", "python -m clca_jax.main")
    assert "--config=folder:tiny" in train_command
    predict_command = docstring_command("clca_jax.configs.folder", "python -m clca_jax.predict")
    commands = [
        train_command.replace("IMAGES", images),
        predict_command.replace("NEW_IMAGES", os.path.join(images, "class_02")),
    ]
    for command in commands:
        done = command_line.run(command.split()[1:], cwd=str(tmp_path), tmp=str(tmp_path))
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    workdir = tmp_path / "runs" / "folder_tiny"
    with open(workdir / "classes.json") as f:
        assert json.load(f) == {"num_classes": 3, "names": ["class_00", "class_01", "class_02"]}
    with open(workdir / "summary.json") as f:
        assert json.load(f)["num_examples"] == 6
    with open(tmp_path / "predictions.csv") as f:
        assert len(f.read().splitlines()) == 1 + 10


def test_resume_refuses_data_whose_classes_changed(finished, tmp_path):
    _, data_dir, workdir = finished
    copied_data, copied_workdir = str(tmp_path / "data"), str(tmp_path / "workdir")
    shutil.copytree(data_dir, copied_data)
    shutil.copytree(workdir, copied_workdir)
    os.rename(os.path.join(copied_data, "class_01"), os.path.join(copied_data, "class_01b"))
    before = workdirs.read_classes(copied_workdir)
    with pytest.raises(
        ValueError, match=r"the data's classes changed .*class 1: 'class_01' -> 'class_01b'"
    ):
        train.train_and_evaluate(tiny_config(copied_data, train__epochs=1), copied_workdir)
    assert workdirs.read_classes(copied_workdir) == before


def test_tiny_variant_warm_starts_from_a_converted_model(tmp_path):
    config = config_files.load("folder:tiny")
    assert config.init.checkpoint == ""
    # A converted plain ViT of the same size (as the converter makes of timm's), 5 classes.
    source_config = config.model.copy_and_resolve_references()
    source_config.num_classes = 5
    source_config.reduction.method = "none"
    source_config.clca.update(head="none", clc=False, num_clr=0)
    source = create_model(source_config).init(
        jax.random.key(7), np.zeros((1, 64, 64, 3), np.float32)
    )
    converted = str(tmp_path / "converted")
    save_pretrained(converted, source, source_config)
    config.data.dir = fabricated_folder(str(tmp_path / "data"))
    config.init.checkpoint = converted
    model = validate_config(config)
    config = train.resolve_config(config, data.dataset_info(config.data).num_classes)
    model = model.clone(num_classes=config.model.num_classes)
    mesh = sharding.make_mesh(config.mesh)
    tx, _ = train.optimizer_and_schedule(config, model, steps_per_epoch=1)
    state = train.initial_state(config, model, tx, mesh, str(tmp_path))
    old = source["params"]
    qkv = state.params["blocks_3"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv, old["blocks_3"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(state.params["clr"][:, 0], old["cls_token"][:, 0])
    assert state.params["cla_head"]["classifier"]["kernel"].shape[-1] == 3
    with open(tmp_path / train.INIT_REPORT_FILE) as f:
        assert f.read().startswith(f"from {converted}")


def test_tiny_variant_learns_classes_a_glance_tells_apart(tmp_path):
    """`folder:tiny` as documented, on 2 classes of noisy red and noisy blue images: the small
    model trained from scratch separates them (the shared one-epoch :tiny would not)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        os.makedirs(tmp_path / "images" / name)
        for i in range(30):
            pixels = (rng.normal(0, 30, (64, 64, 3)) + colour).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    config = config_files.load("folder:tiny")
    assert (config.train.epochs, config.optim.lr) == (30, 1e-3)
    config.data.dir = str(tmp_path / "images")
    train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    assert (summary["split"], summary["num_examples"]) == ("val", 12)
    assert summary["top1"] == 100.0
