"""`clca_jax.evaluate` on a training workdir and on a converted model directory."""

import json
import os
import subprocess
import sys

import pytest

from clca_jax import evaluate, save_pretrained, train
from clca_jax.data import fabricate
from tests.test_train_loop import (
    compilation_cache,  # noqa: F401 (a fixture)
    fabricated_folder,
    restore_state,
    tiny_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data_dir = fabricated_folder(str(root / "data"))
    config = tiny_config(data_dir, train__epochs=1)
    workdir = str(root / "run")
    summary = train.train_and_evaluate(config, workdir)
    return config, workdir, summary


pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_workdir_latest_and_best_give_the_training_summary(trained):
    config, workdir, summary = trained
    for which in ("latest", "best"):
        result = evaluate.evaluate_directory(workdir, which=which)
        assert result["step"] == 3 and result["checkpoint"] == which
        assert result["top1"] == summary["top1"]
        assert result["loss"] == pytest.approx(summary["loss"], rel=1e-6)
        assert result["config"]["model"] == summary["config"]["model"]
    on_train = evaluate.evaluate_directory(workdir, split="train")
    assert on_train["split"] == "train" and on_train["num_examples"] == 24
    # A config replaces the saved data/eval/mesh sections, here the evaluation batch size.
    smaller_batches = config.copy_and_resolve_references()
    smaller_batches.eval.batch_size = 4
    result = evaluate.evaluate_directory(workdir, config=smaller_batches)
    assert result["config"]["eval"]["batch_size"] == 4 and result["top1"] == summary["top1"]


def test_converted_directory_is_evaluated_on_the_configs_data(trained, tmp_path):
    config, workdir, summary = trained
    resolved = train.resolve_config(config, 3)
    state, _ = restore_state(resolved, workdir)
    converted = str(tmp_path / "converted")
    save_pretrained(converted, state.variables(), resolved.model)
    result = evaluate.evaluate_directory(converted, config=config)
    assert result["checkpoint"] == "converted" and result["top1"] == summary["top1"]
    assert result["loss"] == pytest.approx(summary["loss"], rel=1e-6)

    with pytest.raises(ValueError, match="is a converted model; pass --config"):
        evaluate.evaluate_directory(converted)
    four_classes = str(tmp_path / "four")
    fabricate.class_folder_dataset(four_classes, [5] * 4)
    with pytest.raises(ValueError, match="the model has 3 classes but .* has 4"):
        evaluate.evaluate_directory(converted, config=tiny_config(four_classes))


def test_directory_of_neither_kind_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        evaluate.evaluate_directory(str(tmp_path))


def test_command_line_prints_the_summary(trained):
    _, workdir, summary = trained
    done = subprocess.run(
        [sys.executable, "-m", "clca_jax.evaluate", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["top1"] == summary["top1"] and printed["params"] == summary["params"]
