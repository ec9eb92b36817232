"""A workdir is enough: `clca_jax.main --workdir=W` resumes the run W saved, and
`clca_jax.flops --workdir=W` prints its model's table, from any folder."""

from __future__ import annotations

import json
import os
import shutil

import jax
import pytest

from clca_jax import config_files, flops, save_pretrained, train
from clca_jax.models import create_model
from tests import command_line
from tests.test_train_loop import (
    compilation_cache,  # noqa: F401 (a fixture)
    fabricated_folder,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("compilation_cache")


class Interrupted(Exception):
    pass


class StopAfterThreeSteps(train.LoopEvents):
    def after_step(self, step: int) -> None:
        if step == 3:
            raise Interrupted


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run of 6 steps stopped after step 3; its last checkpoint is step 2."""
    root = tmp_path_factory.mktemp("interrupted")
    config = tiny_config(fabricated_folder(str(root / "data")))
    workdir = str(root / "run")
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, workdir, events=StopAfterThreeSteps())
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    return config, workdir


def elsewhere(tmp_path) -> str:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return str(folder)


def test_flops_of_a_workdir_is_the_table_of_its_config(interrupted_run, tmp_path):
    config, workdir = interrupted_run
    done = command_line.run(
        ["-m", "clca_jax.flops", f"--workdir={workdir}", "--skip_xla"],
        cwd=elsewhere(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = flops.report_dict(create_model(config.model), with_xla=False)
    assert done.stdout.strip() == flops.format_table(config.model, expected)


def test_flops_reads_a_converted_model_directory(tmp_path):
    model_config = tiny_config("unused").model
    model = create_model(model_config)
    converted = str(tmp_path / "converted")
    save_pretrained(converted, model.init(jax.random.key(0), model.example_images()), model_config)
    assert flops.directory_model_config(converted).to_dict() == model_config.to_dict()


def test_main_with_only_the_workdir_resumes_the_saved_run(interrupted_run, tmp_path):
    _, workdir = interrupted_run
    done = command_line.run(
        ["-m", "clca_jax.main", f"--workdir={workdir}"],
        cwd=elsewhere(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resumed from step 2 of {workdir}" in done.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 6


def test_main_without_config_on_a_new_workdir_says_what_is_missing(tmp_path):
    done = command_line.run(
        ["-m", "clca_jax.main", f"--workdir={tmp_path / 'new'}"],
        cwd=elsewhere(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 1
    assert f"--config is needed: {tmp_path / 'new'} holds no run to resume" in done.stderr
    assert not (tmp_path / "new").exists()


def test_a_workdir_is_a_config_spec_that_takes_overrides(interrupted_run, tmp_path):
    """`--config=WORKDIR --config.FIELD=VALUE` goes on with the saved config, changed."""
    config, workdir = interrupted_run
    assert config_files.load(workdir).to_dict() == train.with_absolute_paths(config).to_dict()
    with pytest.raises(ValueError, match="is a workdir; its saved config takes no variant"):
        config_files.load(f"{workdir}:tiny")
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    done = command_line.run(
        [
            "-m",
            "clca_jax.main",
            f"--config={copy}",
            f"--workdir={copy}",
            "--config.train.epochs=3",
            "--config.train.log_every_steps=1",
        ],
        cwd=elsewhere(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(copy, "summary.json")) as f:
        assert json.load(f)["steps"] == 9  # 3 epochs of 3 steps


def test_relative_paths_are_saved_absolute(tmp_path, monkeypatch):
    """A run started with a relative data.dir resumes from any folder."""
    monkeypatch.chdir(tmp_path)
    fabricated_folder(str(tmp_path / "data"))
    config = tiny_config("data")
    assert train.with_absolute_paths(config).data.dir == str(tmp_path / "data")
    assert config.data.dir == "data"  # the caller's config is left as it was
    config.init.checkpoint = "/abs/model"
    assert train.with_absolute_paths(config).init.checkpoint == "/abs/model"
