"""What an accelerator run needs, checked on the CPU: gradient accumulation (also over 8 faked
devices), float16 with a dynamic loss scale, `model.dtype=auto` and rematerialised blocks.

The references are independent: one step on the whole batch, a Python loop over the
micro-batches with `jax.grad` and the optimizer applied once, and the float32 step.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clca_jax import train
from clca_jax.models import create_model
from clca_jax.models.config import compute_dtype
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import precision, sharding
from clca_jax.training.config import validate_config
from clca_jax.training.evaluation import apply_model
from tests.test_train_loop import (  # noqa: F401
    build,
    compilation_cache,
    fabricated_folder,
    restore_state,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("compilation_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fabricated_folder(str(tmp_path_factory.mktemp("folder_data")))


def clca_config(data_dir: str, head: str, **overrides):
    """The tiny config with EViT after block 1 and the cache, and the given CLCA head; SGD, whose
    update is proportional to the gradient (Adam's first step is lr * sign(g), which turns the
    rounding noise of gradients that are 0 in exact arithmetic, such as the key biases', into
    full-size updates)."""
    config = tiny_config(data_dir, optim__name="sgd", **overrides)
    config.model.reduction.update(method="evit", keep_rate=0.5, locations=(1,))
    config.model.clca.update(head=head, clc=True, num_clr=1)
    return config


def random_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.standard_normal((BATCH, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32),
    }


def one_step(config, workdir, recipe: train.Recipe, batch: dict | None = None):
    """(state before as NumPy, model, tx, new state, metrics) of one compiled step."""
    mesh, _, model, tx, schedule, state = build(config, str(workdir))
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh, recipe
    )
    before = jax.tree.map(np.array, state)  # the step donates the state
    new_state, step_metrics = step_fn(state, batch or random_batch())
    return before, model, tx, new_state, step_metrics


def assert_trees_close(got, want, atol, rtol=1e-5):
    flat = jax.tree_util.tree_leaves_with_path(want)
    for (path, w), g in zip(flat, jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def scale_of(tree) -> float:
    """The largest magnitude in a tree: summing 16 gradients in another order moves each by
    rounding of that size, not of its own."""
    return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


def test_four_micro_batches_of_four_equal_one_batch_of_sixteen(data_dir, tmp_path):
    """EViT + cache + the IFA head (no BatchNorm): parameters, optimizer state, loss and
    logits of the accumulated step equal those of one step on the whole batch."""
    config = clca_config(data_dir, "ifa")
    _, _, _, whole, whole_metrics = one_step(config, tmp_path / "one", train.Recipe())
    _, _, _, accumulated, metrics = one_step(
        config, tmp_path / "four", train.Recipe(accumulation_steps=4)
    )
    assert_trees_close(accumulated.params, whole.params, atol=2e-6)
    # SGD's momentum trace: the step's gradient. Measured: within 2.1e-6 of its scale.
    atol = 1e-5 * scale_of(whole.opt_state)
    assert_trees_close(accumulated.opt_state, whole.opt_state, atol=atol, rtol=0)
    whole_floats, floats = metrics_lib.to_floats(whole_metrics), metrics_lib.to_floats(metrics)
    np.testing.assert_allclose(floats["loss"], whole_floats["loss"], rtol=1e-6)
    assert floats["top1"] == whole_floats["top1"]  # logits put back in the batch's order


def test_accumulation_with_the_cla_heads_batchnorm_follows_the_micro_batches(data_dir, tmp_path):
    """With BatchNorm each micro-batch is normalised with its own statistics and the running
    statistics are updated once per micro-batch, in order: a Python loop over the micro-batches
    (examples j, j + 4, ...) with `jax.grad`, the mean gradient applied once, is the reference."""
    config = clca_config(data_dir, "cla")
    batch = random_batch(1)
    before, model, tx, got, _ = one_step(
        config, tmp_path / "four", train.Recipe(accumulation_steps=4), batch
    )
    key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), before.step)
    batch_stats, grads = before.batch_stats, []
    for j in range(4):
        images, labels = batch["image"][j::4], batch["label"][j::4]

        def loss(params, batch_stats=batch_stats, images=images, labels=labels, j=j):
            variables = {"params": params, "batch_stats": batch_stats}
            logits, _, new_stats = apply_model(
                model, variables, images, train=True, key=jax.random.fold_in(key, j)
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, new_stats

        grad, batch_stats = jax.grad(loss, has_aux=True)(before.params)
        grads.append(grad)
    mean = jax.tree.map(lambda *g: sum(g) / 4, *grads)
    updates, _ = tx.update(mean, before.opt_state, before.params)
    assert_trees_close(got.params, optax.apply_updates(before.params, updates), atol=2e-6)
    assert_trees_close(got.batch_stats, batch_stats, atol=1e-6)
    _, _, _, whole, _ = one_step(config, tmp_path / "one", train.Recipe(), batch)
    stats_gap = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), got.batch_stats, whole.batch_stats
    )
    assert max(jax.tree.leaves(stats_gap)) > 1e-4  # the statistics really are per micro-batch


def test_accumulation_steps_must_divide_the_batch(data_dir):
    config = clca_config(data_dir, "ifa", train__accumulation_steps=3)
    with pytest.raises(
        ValueError,
        match=r"train.batch_size=8 does not split into "
        r"train.accumulation_steps=3",
    ):
        validate_config(config)
    config = clca_config(data_dir, "ifa", train__accumulation_steps=0)
    with pytest.raises(ValueError, match=r"train.accumulation_steps must be a positive integer"):
        validate_config(config)


EIGHT_DEVICE_STEP = """
import json, sys
import jax, numpy as np
from clca_jax import train
from clca_jax.training import sharding
from tests.test_accelerator_options import clca_config, random_batch
from tests.test_train_loop import build

config = clca_config(sys.argv[1], "ifa", train__batch_size=16)
config.mesh.data, config.mesh.fsdp = 4, 2
params = {}
for steps in (1, 2):
    mesh, _, model, tx, schedule, state = build(config, sys.argv[2] + str(steps))
    step = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh,
        train.Recipe(accumulation_steps=steps),
    )
    batch = sharding.host_to_global(
        jax.tree.map(np.asarray, random_batch()),
        {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)},
    )
    new_state, _ = step(state, batch)
    params[steps] = jax.tree.leaves(jax.device_get(new_state.params))
gap = max(float(np.abs(a - b).max()) for a, b in zip(params[1], params[2]))
print(json.dumps({"devices": jax.device_count(), "gap": gap}))
"""


def test_accumulation_over_eight_faked_devices(data_dir, tmp_path):
    """4 data x 2 fsdp devices: two micro-batches of 8 give the parameters of one batch of 16."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICE_STEP, data_dir, str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["gap"] <= 2e-6


def float16_step(config, workdir, recipe, scale: float, counter: int = 5):
    """(state before, new state, metrics) of one step from a fresh state whose loss scale is
    set to `scale`."""
    mesh, _, model, tx, schedule, state = build(config, str(workdir))
    assert model.dtype == jnp.float16 and isinstance(state.opt_state, precision.LossScaleState)
    assert float(state.opt_state.scale) == precision.INITIAL_LOSS_SCALE
    opt_state = state.opt_state._replace(scale=jnp.float32(scale), counter=jnp.int32(counter))
    state = state.replace(opt_state=opt_state)
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh, recipe
    )
    before = jax.tree.map(np.array, state)
    return (before, *step_fn(state, random_batch()))


def test_float16_scales_the_loss_and_skips_overflowed_steps(data_dir, tmp_path):
    config = clca_config(data_dir, "ifa", model__dtype="float16")
    recipe = train.Recipe(log_gradient_norms=True)
    before, state, step_metrics = float16_step(config, tmp_path / "fp16", recipe, scale=2.0**8)
    floats = metrics_lib.to_floats(step_metrics)
    assert floats["loss_scale"] == 2.0**8 and floats["overflow_steps"] == 0
    assert int(state.opt_state.counter) == 6
    # The update and the logged gradient norms are unscaled: they follow float32's.
    before32, _, _, state32, metrics32 = one_step(
        clca_config(data_dir, "ifa"), tmp_path / "fp32", recipe
    )
    update16 = jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before.params)
    update32 = jax.tree.map(lambda a, b: np.asarray(a) - b, state32.params, before32.params)
    gap = optax.tree.norm(jax.tree.map(np.subtract, update16, update32))
    assert float(gap) <= 0.05 * float(optax.tree.norm(update32))
    norms16 = metrics_lib.gradient_norm_floats(step_metrics)
    for part, norm in metrics_lib.gradient_norm_floats(metrics32).items():
        assert abs(norms16[part] - norm) <= 0.05 * norm + 1e-6, part

    # A scale so large that the float16 backward overflows: nothing but the scale changes.
    before, after, step_metrics = float16_step(config, tmp_path / "big", recipe, scale=2.0**100)
    floats = metrics_lib.to_floats(step_metrics)
    assert floats["overflow_steps"] == 1 and floats["loss_scale"] == 2.0**99
    assert metrics_lib.first_nonfinite(step_metrics) is None  # not a bad step
    assert_trees_close(after.params, before.params, atol=0, rtol=0)
    assert_trees_close(after.opt_state.inner, before.opt_state.inner, atol=0, rtol=0)
    assert int(after.opt_state.counter) == 0 and int(after.step) == 1


def test_a_float16_run_saves_and_restores_its_loss_scale(data_dir, tmp_path):
    config = clca_config(data_dir, "ifa", model__dtype="float16", train__epochs=1)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    state, _ = restore_state(train.resolve_config(config, 3), workdir)
    assert isinstance(state.opt_state, precision.LossScaleState)
    assert int(state.step) == 3
    halvings = np.log2(precision.INITIAL_LOSS_SCALE / float(state.opt_state.scale))
    assert halvings == int(halvings) and 0 <= halvings <= 3  # one per overflowed step
    assert 0 <= int(state.opt_state.counter) <= 3 - halvings


def test_auto_dtype_is_bfloat16_on_accelerators(monkeypatch):
    assert compute_dtype("auto") == jnp.float32  # the tests run on the CPU
    assert compute_dtype("float16") == jnp.float16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compute_dtype("auto") == jnp.bfloat16


@pytest.mark.parametrize("remat", ["block", "dots_saveable"])
def test_remat_keeps_parameters_logits_and_gradients(data_dir, remat):
    config = clca_config(data_dir, "cla")
    plain = create_model(config.model)
    config.model.remat = remat
    rematted = create_model(config.model)
    images = random_batch()["image"][:4]
    variables = jax.jit(plain.init)(jax.random.key(0), images)
    assert jax.tree.structure(jax.jit(rematted.init)(jax.random.key(0), images)) == (
        jax.tree.structure(variables)
    )

    def loss(model, params):
        logits, _, _ = apply_model(
            model, dict(variables, params=params), images, train=True, key=jax.random.key(1)
        )
        return jnp.sum(jnp.sin(logits))

    results = {}
    for name, model in (("plain", plain), (remat, rematted)):
        fn = jax.value_and_grad(lambda p, model=model: loss(model, p))
        results[name] = jax.jit(fn)(variables["params"])
        jaxpr = str(jax.make_jaxpr(fn)(variables["params"]))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (name != "plain")
    pairs = zip(jax.tree.leaves(results[remat]), jax.tree.leaves(results["plain"]), strict=True)
    for got, want in pairs:
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
