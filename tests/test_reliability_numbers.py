"""Non-finite losses and gradients: the step changes nothing, and the run stops or skips.

NaNs are injected by poisoning one training batch (NaN pixels), so the loss and every gradient
of that step are NaN; a gradient tree with one bad leaf checks that the leaf is named.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax import train
from clca_jax.training import checkpoint, sharding
from clca_jax.training import metrics as metrics_lib
from tests.test_train_loop import (  # noqa: F401
    NUM_CLASSES,
    build,
    compilation_cache,
    fabricated_folder,
    restore_state,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("compilation_cache")
POISONED_STEP = 5


class PoisonedLoader:
    """A train loader whose `step`-th batch (1-based) has NaN pixels."""

    def __init__(self, loader, step: int):
        self._loader, self._step, self._read = loader, step, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __next__(self):
        batch = next(self._loader)
        self._read += 1
        if self._read == self._step:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fabricated_folder(str(tmp_path_factory.mktemp("folder_data")))


@pytest.fixture
def poisoned_input(monkeypatch):
    make_input = train.make_input

    def poisoned(config, mesh):
        inputs = make_input(config, mesh)
        inputs.train = PoisonedLoader(inputs.train, POISONED_STEP)
        return inputs

    monkeypatch.setattr(train, "make_input", poisoned)


def test_the_first_bad_quantity_is_named():
    grads = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf]), "d": jnp.full(2, jnp.nan)}}
    assert int(train.nonfinite_what(jnp.float32(1.0), grads)) == 2
    assert train.leaf_names(grads)[1] == "b/c"
    assert int(train.nonfinite_what(jnp.float32(jnp.nan), grads)) == 0
    assert int(train.nonfinite_what(jnp.float32(1.0), {"a": jnp.ones(3)})) == -1


def test_a_nonfinite_step_leaves_the_model_unchanged(data_dir, tmp_path):
    config = tiny_config(data_dir)
    mesh, inputs, model, tx, schedule, state = build(config, str(tmp_path))
    step_fn = train.compile_train_step(
        model, tx, schedule, sharding.tree_shardings(state, mesh), mesh
    )
    local = next(inputs.train)
    batch_sharding = sharding.batch_sharding(mesh)
    good = sharding.global_batch(local, batch_sharding)
    bad = sharding.global_batch(
        dict(local, image=np.full_like(local["image"], np.nan)), batch_sharding
    )
    state, first = step_fn(state, good)
    before = jax.tree.map(np.asarray, state)
    state, second = step_fn(state, bad)
    assert int(state.step) == 2
    for a, b in zip(
        jax.tree.leaves(before.replace(step=state.step)), jax.tree.leaves(state), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert metrics_lib.first_nonfinite(first) is None
    assert metrics_lib.first_nonfinite(second) == (2, 0, 1)
    running = metrics_lib.merge(first, second)
    assert np.isfinite(metrics_lib.to_floats(running)["loss"])  # the bad step is left out
    assert step_fn._cache_size() == 1


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("whole"))
    train.train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir


def _restore_step(config, workdir: str, step: int):
    """The train state at `step`, and the step of the workdir's newest checkpoint."""
    state, _ = restore_state(train.resolve_config(config, NUM_CLASSES), workdir, step)
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        return state, checkpoints.latest_step()
    finally:
        checkpoints.close()


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(
    data_dir, whole_run, tmp_path, poisoned_input
):
    config = tiny_config(data_dir)  # 6 steps, checkpoints every 2, reports every 2
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError, match=r"step 5: the loss is not finite") as error:
        train.train_and_evaluate(config, workdir)
    assert "checkpoint 4 is intact" in str(error.value)
    assert "on_nonfinite=skip" in str(error.value)
    kept, latest = _restore_step(config, workdir, 4)
    assert latest == 4  # nothing saved at or after the bad step
    expected, _ = _restore_step(config, whole_run, 4)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_skip_goes_on_past_the_bad_step(data_dir, whole_run, tmp_path, poisoned_input):
    config = tiny_config(data_dir, train__on_nonfinite="skip")
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 6 and np.isfinite(summary["loss"])
    state, latest = _restore_step(config, str(tmp_path / "run"), 6)
    expected, _ = _restore_step(config, whole_run, 6)
    assert latest == 6
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    # Step 5 was skipped, so the end differs from the run that took it.
    assert not np.array_equal(
        np.asarray(state.params["head"]["kernel"]), np.asarray(expected.params["head"]["kernel"])
    )
