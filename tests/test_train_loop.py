"""The training loop on a tiny model and fabricated data: learning, one trace, resume, outputs.

The helpers here (`tiny_config`, `fabricated_folder`, `build`, `restore_state` and the
`compilation_cache` fixture) are shared by the other training tests.
"""

import json
import os

import jax
import numpy as np
import pytest

from clca_jax import train
from clca_jax.data import fabricate
from clca_jax.models import create_model
from clca_jax.training import checkpoint, sharding
from clca_jax.training import metrics as metrics_lib
from clca_jax.training.config import default_config

NUM_CLASSES = 3


def fabricated_folder(root: str, per_class: int = 10) -> str:
    """A class-per-folder dataset of random images (80 % train / 20 % val per class)."""
    fabricate.class_folder_dataset(root, [per_class] * NUM_CLASSES)
    return root


def tiny_config(data_dir: str, **overrides):
    """A 2-block width-32 ViT at 32 px on the folder data: 3 steps of batch 8 per epoch."""
    config = default_config()
    config.data.name = "folder"
    config.data.dir = data_dir
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.num_threads = 2
    config.model.backbone = "vit_tiny_patch16_224"
    config.model.update(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    config.optim.update(lr=3e-3, warmup_epochs=0, cooldown_epochs=0)
    config.train.update(epochs=2, batch_size=8, log_every_steps=2)
    config.eval.batch_size = 8
    config.checkpoint.every_steps = 2
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def build(config, workdir: str):
    """Mesh, loaders, model, optimizer and a fresh state, as `train_and_evaluate` makes them."""
    mesh = sharding.make_mesh(config.mesh)
    inputs = train.make_input(config, mesh)
    config = train.resolve_config(config, inputs.info.num_classes)
    model = create_model(config.model)
    tx, schedule = train.optimizer_and_schedule(config, model, inputs.train.steps_per_epoch)
    state = train.initial_state(config, model, tx, mesh, workdir)
    return mesh, inputs, model, tx, schedule, state


def restore_state(config, workdir: str, step: int | None = None):
    """A workdir's train state and input position at `step` (default: the newest checkpoint),
    restored onto this process's devices."""
    mesh = sharding.make_mesh(config.mesh)
    model = create_model(config.model)
    tx, _ = train.optimizer_and_schedule(config, model, steps_per_epoch=1)
    abstract = train.abstract_train_state(model, tx, config.seed, mesh)
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        state, loader_state = checkpoints.restore(abstract, step)
    finally:
        checkpoints.close()
    return state, loader_state


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one test module: its tests build the same tiny
    networks again and again, and reuse the first compile of each."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fabricated_folder(str(tmp_path_factory.mktemp("folder_data")))


def test_a_few_steps_reduce_the_loss_and_the_step_traces_once(data_dir, tmp_path):
    config = tiny_config(data_dir)
    mesh, inputs, model, tx, schedule, state = build(config, str(tmp_path))
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh
    )
    batch = sharding.global_batch(next(inputs.train), sharding.batch_sharding(mesh))
    losses = []
    for _ in range(6):
        state, step_metrics = step_fn(state, batch)
        losses.append(float(step_metrics.compute()["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 6
    assert step_fn._cache_size() == 1  # one trace and compile for all steps


def test_run_writes_summary_logs_and_checkpoints(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(tiny_config(data_dir), workdir)
    with open(os.path.join(workdir, "summary.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert saved["num_examples"] == NUM_CLASSES * 2  # the 20 % val carve of 10 per class
    assert 0 <= saved["top1"] <= 100 and saved["top1"] <= saved["top5"]
    assert saved["params"] > 0 and saved["images_per_second"] > 0 and np.isfinite(saved["loss"])
    assert saved["config"]["model"]["num_classes"] == NUM_CLASSES
    assert saved["steps"] == 2 * 3
    assert os.listdir(os.path.join(workdir, "tensorboard"))[0].startswith("events.out.tfevents")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
    assert os.listdir(os.path.join(workdir, "best")) == ["6"]


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(
    data_dir, tmp_path, monkeypatch
):
    config = tiny_config(data_dir)
    whole = str(tmp_path / "whole")
    train.train_and_evaluate(config, whole)

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
    # The interruption came after step 3; the last checkpoint is step 2.
    assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["2"]
    train.train_and_evaluate(config, interrupted)

    expected, expected_loader = restore_state(config, whole)
    resumed, resumed_loader = restore_state(config, interrupted)
    assert resumed_loader == expected_loader
    assert int(resumed.step) == int(expected.step) == 6
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerunning_a_finished_run_only_evaluates(data_dir, tmp_path):
    config = tiny_config(data_dir, train__epochs=1)
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir)
    again = train.train_and_evaluate(config, workdir)
    assert again["top1"] == first["top1"] and again["loss"] == pytest.approx(first["loss"])


def test_resume_with_another_batch_size_is_refused(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(data_dir, train__epochs=1), workdir)
    with pytest.raises(ValueError, match="global_batch_size"):
        train.train_and_evaluate(tiny_config(data_dir, train__batch_size=4), workdir)


def test_accuracy_is_a_percentage_everywhere_and_tensorboard_has_config_and_pictures(
    data_dir, tmp_path
):
    """Console, summary.json, TensorBoard and best/ give top-1 in one unit (%); TensorBoard
    also holds the config text, the hyper-parameters and the kept-token picture."""
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir)
    config.model.reduction.update(method="evit", keep_rate=0.5, locations=(1,))
    summary = train.train_and_evaluate(config, workdir)
    values = {}
    tags = set()
    for event in metrics_lib.read_events(os.path.join(workdir, train.TENSORBOARD_DIR)):
        for value in event.summary.value:
            tags.add(value.tag)
            if value.HasField("simple_value"):
                values[value.tag] = value.simple_value
    assert values["eval/top1"] == pytest.approx(summary["top1"], abs=1e-4)
    assert values["hparam/top1"] == pytest.approx(summary["top1"], abs=1e-4)
    assert 1 < summary["top1"] <= 100  # a percentage (at least one of 6 images right)
    with open(os.path.join(workdir, "best", "6", "metrics", "metrics")) as f:
        assert json.load(f)["top1"] == pytest.approx(summary["top1"], abs=1e-4)
    assert "config/text_summary" in tags and "eval/kept_tokens" in tags
    assert "_hparams_/experiment" in tags
    assert os.listdir(os.path.join(workdir, "tensorboard"))[0].startswith("events.out.tfevents")
