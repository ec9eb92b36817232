"""Every training-recipe feature on at once: the run trains, evaluates both weights, and an
interrupted run resumes to the uninterrupted one bit for bit (EMA, frozen-then-trained
backbone, layer-wise rates, per-step schedule, dropout, stochastic depth, label smoothing)."""

import json
import os

import jax
import numpy as np
import pytest

from clca_jax import evaluate, train
from clca_jax.models import create_model
from clca_jax.training import checkpoint, sharding
from tests.test_train_loop import compilation_cache, data_dir, tiny_config  # noqa: F401, F811

pytestmark = pytest.mark.usefixtures("compilation_cache")


def recipe_config(folder):
    config = tiny_config(folder)
    config.model.update(drop_path_rate=0.2, dropout_rate=0.1)
    config.model.clca.update(head="cla", clc=True, num_clr=1)
    config.model.reduction.update(method="evit", keep_rate=0.5, locations=(1,))
    config.optim.update(
        name="lion", lr=1e-4, layer_decay=0.75, backbone_lr_scale=0.5, freeze_backbone_steps=2,
        schedule_unit="step", warmup_epochs=1,
    )  # fmt: skip
    config.train.update(label_smoothing=0.1, ema_decay=0.9, ema_warmup=True)
    config.eval.select = "ema"
    return config


def restore_recipe_state(config, workdir):
    config = train.resolve_config(config, config.model.num_classes)
    mesh = sharding.make_mesh(config.mesh)
    model = create_model(config.model)
    tx, _ = train.optimizer_and_schedule(config, model, steps_per_epoch=1)
    abstract = train.abstract_train_state(model, tx, config.seed, mesh, with_ema=True)
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        return checkpoints.restore(abstract)
    finally:
        checkpoints.close()


def test_all_recipe_features_resume_bit_exactly(data_dir, tmp_path, monkeypatch):  # noqa: F811
    config = recipe_config(data_dir)
    whole = str(tmp_path / "whole")
    summary = train.train_and_evaluate(config, whole)
    assert summary["weights"] == "ema" and summary["top1"] == summary["ema"]["top1"]
    assert set(summary["raw"]) == {"loss", "top1", "top5"}

    class Interrupted(Exception):
        pass

    compile_train_step = train.compile_train_step

    def failing_after_three_steps(*args, **kwargs):
        step_fn, calls = compile_train_step(*args, **kwargs), []

        def step(state, batch):
            if len(calls) == 3:
                raise Interrupted
            calls.append(1)
            return step_fn(state, batch)

        return step

    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(train, "compile_train_step", failing_after_three_steps)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, interrupted)
    monkeypatch.undo()
    assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["2"]
    again = train.train_and_evaluate(config, interrupted)

    expected, expected_loader = restore_recipe_state(config, whole)
    resumed, resumed_loader = restore_recipe_state(config, interrupted)
    assert resumed_loader == expected_loader and int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again["ema"] == summary["ema"] and again["raw"] == summary["raw"]
    # The average is not the raw weights, and evaluate reads either from the workdir.
    assert not np.array_equal(
        expected.ema["params"]["head"]["kernel"]
        if "head" in expected.ema["params"]
        else jax.tree.leaves(expected.ema)[0],
        jax.tree.leaves(expected.params)[0],
    )
    for weights in ("raw", "ema"):
        result = evaluate.evaluate_directory(whole, weights=weights)
        assert result["top1"] == pytest.approx(summary[weights]["top1"])
    with open(os.path.join(whole, "summary.json")) as f:
        assert json.load(f)["weights"] == "ema"
