"""`train.log_gradient_norms`: per-part gradient norms of the train step, their TensorBoard
scalars, and `visualize gradients`.

The reference norms come from `jax.grad` of the loss written out here and NumPy sums of squares
in float64; the runs are tiny (2 blocks, width 32, 32 px, 3 steps).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clca_jax import train, visualize
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import sharding
from clca_jax.training.config import validate_config
from clca_jax.training.evaluation import apply_model
from tests.test_train_loop import build, compilation_cache, fabricated_folder, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("compilation_cache")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fabricated_folder(str(tmp_path_factory.mktemp("folder_data")))


def gradient_config(data_dir: str, clca: bool, **overrides):
    """The tiny config with EViT after block 1, and the CLA head and cache when `clca`."""
    config = tiny_config(data_dir, **overrides)
    config.model.reduction.update(method="evit", keep_rate=0.5, locations=(1,))
    if clca:
        config.model.clca.update(head="cla", clc=True, num_clr=1)
    return config


def first_step(data_dir: str, tmp_path, clca: bool, recipe: train.Recipe):
    """(state before, batch, model, new state, metrics) of one compiled train step."""
    config = gradient_config(data_dir, clca)
    mesh, inputs, model, tx, schedule, state = build(config, str(tmp_path))
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh, recipe
    )
    batch = sharding.global_batch(next(inputs.train), sharding.batch_sharding(mesh))
    before = jax.tree.map(np.array, state)  # the step donates the state
    new_state, step_metrics = step_fn(state, batch)
    assert step_fn._cache_size() == 1
    return before, batch, model, new_state, step_metrics


def reference_grads(before, batch, model):
    """`jax.grad` of the step's loss (mean cross-entropy, same reduction noise key)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), before.step)

    def loss(params):
        variables = dict(before.variables(), params=params)
        logits, aux, _ = apply_model(model, variables, batch["image"], train=True, key=key)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return per_example.mean() + aux.get("extra_loss", 0.0)

    return jax.grad(loss)(before.params)


def squared_norm(tree) -> float:
    return sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(tree))


@pytest.mark.parametrize("clca", [True, False], ids=["clca", "plain"])
def test_part_norms_equal_the_norms_of_jax_grad_and_cover_every_parameter(data_dir, tmp_path, clca):
    recipe = train.Recipe(log_gradient_norms=True)
    before, batch, model, _, step_metrics = first_step(data_dir, tmp_path, clca, recipe)
    norms = metrics_lib.gradient_norm_floats(step_metrics)
    grads = reference_grads(before, batch, model)
    parts = set(norms) - {metrics_lib.GLOBAL_NORM}
    assert parts == set(before.params)  # every top-level parameter, each once
    expected_parts = {"blocks_0", "blocks_1", "patch_embed", "cls_token", "pos_embed"}
    expected_parts |= {"cla_head", "clr"} if clca else {"head", "norm"}
    assert expected_parts <= parts, sorted(parts)
    for part in parts:
        expected = np.sqrt(squared_norm(grads[part]))
        assert expected > 0, part
        np.testing.assert_allclose(norms[part], expected, rtol=1e-5, err_msg=part)
    total = squared_norm(grads)
    np.testing.assert_allclose(sum(norms[p] ** 2 for p in parts), total, rtol=1e-5)
    np.testing.assert_allclose(norms[metrics_lib.GLOBAL_NORM] ** 2, total, rtol=1e-5)


def test_reports_average_the_norms_over_finite_steps():
    names = ("blocks_0", metrics_lib.GLOBAL_NORM)
    steps = [
        metrics_lib.GradientNorms.from_model_output(
            dict(zip(names, jnp.array(values), strict=True)), jnp.int32(what)
        )
        for values, what in (([1.0, 2.0], -1), ([3.0, 6.0], -1), ([jnp.nan, jnp.inf], 0))
    ]
    merged = steps[0].merge(steps[1]).merge(steps[2])
    np.testing.assert_allclose(merged.compute(), [2.0, 4.0])  # the non-finite step left out


def test_off_leaves_the_step_as_it_was(data_dir, tmp_path):
    """Logging off: the metrics are today's `TrainMetrics`; on or off, the new state is the
    same bit for bit and so are the shared metrics."""
    off = first_step(data_dir, tmp_path / "off", True, train.Recipe())
    on = first_step(data_dir, tmp_path / "on", True, train.Recipe(log_gradient_norms=True))
    assert type(off[4]) is metrics_lib.TrainMetrics
    assert metrics_lib.gradient_norm_floats(off[4]) == {}
    assert type(on[4]) is metrics_lib.TrainMetricsWithGradients
    for a, b in zip(jax.tree.leaves(off[3]), jax.tree.leaves(on[3]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics_lib.to_floats(off[4]) == metrics_lib.to_floats(on[4])
    config = gradient_config(data_dir, True)
    assert train.Recipe.from_config(config) == train.Recipe()


def test_the_field_must_be_a_bool(data_dir):
    config = gradient_config(data_dir, True, train__log_gradient_norms=None)
    with pytest.raises(
        ValueError, match=r"train\.log_gradient_norms must be True or False, got None"
    ):
        validate_config(config)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two finished one-epoch runs with the norms logged: EViT + CLCA, and EViT alone."""
    root = tmp_path_factory.mktemp("runs")
    workdirs = {}
    for name, clca in (("clca", True), ("plain", False)):
        workdirs[name] = str(root / name)
        config = gradient_config(data_dir, clca, train__epochs=1, train__log_gradient_norms=True)
        train.train_and_evaluate(config, workdirs[name])
    return workdirs


def test_tensorboard_holds_the_norms_at_every_report(runs):
    events = metrics_lib.read_events(os.path.join(runs["clca"], train.TENSORBOARD_DIR))
    logged: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            if value.tag.startswith(metrics_lib.GRAD_NORM_PREFIX):
                logged.setdefault(value.tag, {})[event.step] = value.simple_value
    for part in ("blocks_0", "blocks_1", "cla_head", "clr", "patch_embed", "global"):
        values = logged[f"grad_norm/{part}"]
        assert sorted(values) == [2, 3], part  # log_every_steps=2 and the last step
        assert all(np.isfinite(v) and v > 0 for v in values.values()), part
    assert visualize.read_gradient_norms(runs["clca"])["clr"] == logged["grad_norm/clr"]


def test_visualize_gradients_writes_one_png_for_two_runs(runs, tmp_path, capsys):
    out = str(tmp_path / "grads.png")
    workdirs = f"{runs['clca']},{runs['plain']}"
    assert visualize.main(["gradients", f"--workdir={workdirs}", f"--out={out}"]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert out in capsys.readouterr().out
    assert visualize.main(["gradients", f"--workdir={workdirs}", f"--out={out}"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    titles = [visualize.run_title(d) for d in workdirs.split(",")]
    assert titles == ["clca: evit kr=0.5 + CLCA", "plain: evit kr=0.5"]


def test_visualize_gradients_refuses_a_run_without_norms(runs, tmp_path, capsys):
    silent = tmp_path / "silent"
    writer = metrics_lib.MetricWriter(str(silent / train.TENSORBOARD_DIR))
    writer.write_scalars(2, {"train/loss": 1.0})
    writer.close()
    out = tmp_path / "grads.png"
    code = visualize.main(["gradients", f"--workdir={runs['clca']},{silent}", f"--out={out}"])
    assert code != 0 and not out.exists()
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(silent) in error and "train.log_gradient_norms=True" in error
