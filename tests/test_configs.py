"""The experiment configs: the paper's setting, the exact commands, one step on each dataset,
and loading them by name or path from any folder."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clca_jax import config_files, flops, train
from clca_jax.data import fabricate, ufgir
from clca_jax.models import create_model
from clca_jax.training import evaluation, sharding
from clca_jax.training.config import validate_config
from tests import command_line
from tests.test_train_loop import build, compilation_cache  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"soygene": 1110, "soylocal": 200, "soyageing": 198, "soyglobal": 1938, "cotton": 80}


def load(name: str, arg: str | None = None):
    return config_files.load(f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_dataset_configs_hold_the_papers_main_setting(name):
    config = load(name)
    assert config.data.name == name and config.model.num_classes == CLASSES[name]
    assert (config.data.train_split, config.data.eval_split) == ("train_val", "test")
    model = config.model
    assert (model.backbone, model.img_size) == ("vit_base_patch16_clip_224.laion2b", 448)
    assert (model.reduction.method, model.reduction.keep_rate) == ("evit", 0.1)
    assert tuple(model.reduction.locations) == (3, 6, 9)
    assert (model.clca.head, model.clca.clc, model.clca.num_clr) == ("cla", True, 1)
    assert (config.optim.lr, config.optim.weight_decay, config.seed) == (1e-4, 0.05, 1)
    assert (config.train.epochs, config.train.batch_size, config.eval.batch_size) == (50, 32, 48)
    assert (config.optim.warmup_epochs, config.optim.cooldown_epochs) == (2, 5)


@pytest.mark.parametrize("name", [*sorted(CLASSES), "demo"])
def test_docstring_holds_the_command_that_runs_the_config(name):
    doc = importlib.import_module(f"clca_jax.configs.{name}").__doc__
    assert f"python -m clca_jax.main --config={name} --workdir=runs/{name}" in doc


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.usefixtures("compilation_cache")
def test_dataset_config_runs_one_step_on_fabricated_data(name, tmp_path):
    manual = str(tmp_path / "manual")
    fabricate.leaf_dataset(manual, name, ufgir.LEAF_DATASETS[name].image_folder, per_class=4)
    config = load(name, "tiny")
    config.data.update(dir=manual, tfds_dir=str(tmp_path / "tfds"), check_published_counts=False)
    validate_config(config)
    mesh, inputs, model, tx, schedule, state = build(config, str(tmp_path))
    assert inputs.info.num_classes == 3
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh
    )
    batch = sharding.global_batch(next(inputs.train), sharding.batch_sharding(mesh))
    state, step_metrics = step_fn(state, batch)
    assert int(state.step) == 1
    assert np.isfinite(float(step_metrics.compute()["loss"]))


def test_demo_config_is_valid_and_small():
    config = load("demo")
    validate_config(config)
    assert config.data.name == "demo" and config.init.checkpoint == ""
    model = create_model(config.model)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), model.example_images()))
    assert evaluation.count_parameters(variables["params"]) < 2_000_000


def test_unknown_variant_and_unknown_override_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown config variant 'big'"):
        load("soygene", "big")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clca_jax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path}",
            "--config.train.epoch=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "--config.train.epoch" in done.stderr and 'Did you mean "epochs"' in done.stderr


def test_every_shipped_config_has_its_repository_path():
    shipped = [name for name in config_files.names() if name != "common"]
    assert shipped == sorted([*CLASSES, "demo", "folder"])
    in_repository = sorted(f[: -len(".py")] for f in os.listdir(os.path.join(REPO, "configs")))
    assert in_repository == shipped
    for name in shipped:
        by_path = config_files.load(os.path.join(REPO, "configs", f"{name}.py"))
        assert by_path.to_dict() == config_files.load(name).to_dict()


def test_config_files_import_only_the_package():
    for folder in (config_files.SHIPPED_DIR, os.path.join(REPO, "configs")):
        for name in os.listdir(folder):
            with open(os.path.join(folder, name)) as f:
                imports = [line for line in f if line.startswith(("import ", "from "))]
            assert not [line for line in imports if line.split()[1].split(".")[0] == "configs"]


def test_specs_that_name_nothing_are_refused_with_the_names(tmp_path):
    with pytest.raises(ValueError, match="'soygen' is not the name of a shipped config .*soygene"):
        config_files.load("soygen")
    with pytest.raises(ValueError, match="config file missing.py not found"):
        config_files.load("missing.py")
    old_style = tmp_path / "old_style.py"
    old_style.write_text("from configs import common\n\ndef get_config():\n    return None\n")
    with pytest.raises(ValueError, match="`from clca_jax.configs import common`, not"):
        config_files.load(str(old_style))
    assert load("soygene", "tiny").model.img_size == 64  # a name takes a variant too


@pytest.mark.parametrize("spec", ["demo", "configs/demo.py", "~/demo.py"])
def test_a_config_loads_by_name_or_path_from_any_folder(spec, tmp_path, monkeypatch):
    """The flops command, run outside the checkout on the demo config (by name, by its
    repository path, and by a copy in the home folder); its numbers are the config's."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if spec == "configs/demo.py":
        spec = os.path.join(REPO, spec)
    if spec.startswith("~"):
        monkeypatch.setenv("HOME", str(tmp_path))
        with open(os.path.join(REPO, "configs", "demo.py")) as f:
            (tmp_path / "demo.py").write_text(f.read())
    done = command_line.run(
        ["-m", "clca_jax.flops", f"--config={spec}", "--json", "--skip_xla"],
        cwd=str(elsewhere),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = create_model(load("demo").model, check_cache=False)
    assert json.loads(done.stdout) == flops.report_dict(model, with_xla=False)


@pytest.mark.parametrize(
    "module,flag,message",
    [
        ("clca_jax.main", "--config.train.batch_size=eight", "invalid literal for int()"),
        ("clca_jax.main", "--config=soygen", "'soygen' is not the name of a shipped config"),
        ("clca_jax.evaluate", "--no_such_flag=1", "Unknown command line flag 'no_such_flag'"),
        ("clca_jax.demo", "--config.model.img_size=big", "invalid literal for int()"),
    ],
)
def test_a_bad_flag_is_one_line_not_a_traceback(tmp_path, module, flag, message):
    """The commands that parse their own config flags report flag errors as absl does."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--config=demo", f"--workdir={tmp_path / 'w'}", flag],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("FATAL Flags parsing error: ") and message in done.stderr
    assert not (tmp_path / "w").exists()
