"""Sharding: the placement rule, and 8 faked CPU devices (4 data x 2 fsdp) against 1 device.

The 8-device run happens in a subprocess because the device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from clca_jax import evaluate, train
from clca_jax.training import sharding
from tests.test_train_loop import fabricated_folder, restore_state, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EIGHT_DEVICE_RUN = """
import json, sys
import jax
from clca_jax import train
from clca_jax.training import sharding
from tests.test_train_loop import restore_state, tiny_config

config = tiny_config(sys.argv[1])
config.mesh.data, config.mesh.fsdp = 4, 2
summary = train.train_and_evaluate(config, sys.argv[2])
state, _ = restore_state(train.resolve_config(config, 3), sys.argv[2])
specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state)]
print(json.dumps({
    "devices": jax.device_count(),
    "loss": summary["loss"],
    "top1": summary["top1"],
    "fsdp_leaves": sum("fsdp" in spec for spec in specs),
}))
"""


def test_partition_spec_splits_the_largest_divisible_dimension():
    assert sharding.partition_spec((32, 96), 2) == PartitionSpec(None, "fsdp")
    assert sharding.partition_spec((96, 32), 2) == PartitionSpec("fsdp", None)
    assert sharding.partition_spec((1, 17, 32), 2) == PartitionSpec(None, None, "fsdp")
    assert sharding.partition_spec((7, 5), 2) == PartitionSpec()
    assert sharding.partition_spec((), 2) == PartitionSpec()
    assert sharding.partition_spec((32, 96), 1) == PartitionSpec()


def test_mesh_that_does_not_fit_the_devices_is_refused():
    config = tiny_config("unused")
    config.mesh.data, config.mesh.fsdp = 4, 2
    with pytest.raises(ValueError, match=r"mesh.data=4 x mesh.fsdp=2 does not fit the 1 devices"):
        sharding.make_mesh(config.mesh)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    data_dir = fabricated_folder(str(root / "data"))
    workdir = str(root / "run8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICE_RUN, data_dir, workdir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return data_dir, workdir, json.loads(done.stdout.strip().splitlines()[-1])


def test_eight_devices_with_fsdp_train_like_one_device(eight_device_run, tmp_path):
    data_dir, workdir8, result8 = eight_device_run
    assert result8["devices"] == 8 and result8["fsdp_leaves"] > 0
    config = tiny_config(data_dir)
    summary1 = train.train_and_evaluate(config, str(tmp_path / "run1"))
    assert summary1["loss"] == pytest.approx(result8["loss"], rel=1e-4, abs=1e-5)
    assert summary1["top1"] == result8["top1"]

    # The checkpoint written on 8 devices restores on this process's single device, and
    # evaluates to the loss the 8-device run measured.
    assert jax.device_count() == 1
    resolved = train.resolve_config(config, 3)
    state8, _ = restore_state(resolved, workdir8)
    state1, _ = restore_state(resolved, str(tmp_path / "run1"))
    assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(state8))
    # Loose: the key biases get exactly zero gradients, whose rounding noise Adam scales up
    # to about the learning rate, differently for each summation order.
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    restored = evaluate.evaluate_directory(workdir8)
    assert restored["loss"] == pytest.approx(result8["loss"], rel=1e-5)
    assert restored["step"] == 6
