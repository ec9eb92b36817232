"""Several processes: 2 processes x 2 CPU devices on localhost train like 1 process x 4.

The processes find each other through `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID` (read by `sharding.initialize_distributed`); every wait is bounded.
"""

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from clca_jax import data
from tests.killable_main import KILL_AT_ENV
from tests.test_reliability_kill import (
    REPO,
    RUN_TIMEOUT,
    cli_config,
    cli_env,
    main_command,
    run_cli,
    train_losses,
    write_cli_config,
)
from tests.test_train_loop import fabricated_folder

HEARTBEAT_SECONDS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two(config_path: str, workdir: str, env: dict, kill_hook_of_process_1: str = ""):
    """Starts the two processes of one run; returns them (stdout+stderr piped)."""
    port = free_port()
    processes = []
    for index in range(2):
        process_env = dict(
            env,
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
        )
        if index == 1 and kill_hook_of_process_1:
            process_env[KILL_AT_ENV] = kill_hook_of_process_1
        processes.append(
            subprocess.Popen(
                main_command(config_path, workdir, process_env),
                cwd=REPO,
                env=process_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def finish(processes, timeout: float):
    """(return codes, outputs, seconds from the start of the wait until each process ended) of
    processes; any still running after `timeout` is killed."""
    start = time.perf_counter()
    ended = [None] * len(processes)
    while None in ended and time.perf_counter() - start < timeout:
        for index, process in enumerate(processes):
            if ended[index] is None and process.poll() is not None:
                ended[index] = time.perf_counter() - start
        time.sleep(0.1)
    results = []
    for index, process in enumerate(processes):
        if ended[index] is None:
            process.kill()
        output, _ = process.communicate()
        if ended[index] is None:
            output += "\n<killed by the test: still running>"
            ended[index] = time.perf_counter() - start
        results.append((process.returncode, output))
    codes, outputs = zip(*results, strict=True)
    return list(codes), list(outputs), ended


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    data_dir = fabricated_folder(str(root / "data"))
    heartbeat = f"    config.mesh.heartbeat_timeout_seconds = {HEARTBEAT_SECONDS}"
    config_path = write_cli_config(str(root / "tiny_cli.py"), data_dir, extra=heartbeat)
    return root, data_dir, config_path, cli_env(str(root / "jax_cache"))


def test_two_processes_train_like_one_process_with_four_devices(setup):
    root, data_dir, config_path, env = setup
    single = str(root / "single")
    code, output = run_cli(
        config_path, single, dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    )
    assert code == 0, output[-4000:]
    assert "Mesh {'data': 4, 'fsdp': 1} over 4 device(s)" in output

    double = str(root / "double")
    codes, outputs, _ = finish(launch_two(config_path, double, env), RUN_TIMEOUT)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    expected, actual = train_losses(single), train_losses(double)
    assert sorted(actual) == sorted(expected) == list(range(1, 10))
    for step in expected:
        assert len(actual[step]) == 1  # one writer: each step logged once
        np.testing.assert_allclose(list(actual[step]), list(expected[step]), rtol=1e-5)
    # Process 0 alone writes the TensorBoard file, the config, the class names and the summary.
    assert len(os.listdir(os.path.join(double, "tensorboard"))) == 1
    assert sorted(f for f in os.listdir(double) if f.endswith(".json")) == [
        "classes.json",
        "config.json",
        "summary.json",
    ]


def test_each_process_reads_a_disjoint_share_of_the_global_batch(setup):
    _, data_dir, _, _ = setup
    config = cli_config(data_dir)

    def first_batches(process_count):
        loaders = [
            data.make_train_loader(
                config.data,
                img_size=32,
                global_batch_size=8,
                seed=1,
                process_index=index,
                process_count=process_count,
            )
            for index in range(process_count)
        ]
        return [next(loader)["image"] for loader in loaders]

    (whole,) = first_batches(1)
    first, second = first_batches(2)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    assert not any(np.array_equal(a, b) for a in first for b in second)


def test_a_dying_process_stops_the_other_with_a_message(setup):
    root, _, config_path, env = setup
    processes = launch_two(config_path, str(root / "dying"), env, kill_hook_of_process_1="step:3")
    codes, outputs, ended = finish(processes, RUN_TIMEOUT)
    assert codes[1] == -signal.SIGKILL, outputs[1][-3000:]
    assert codes[0] != 0, outputs[0][-3000:]
    assert "<killed by the test" not in outputs[0]
    assert "another task died" in outputs[0], outputs[0][-3000:]
    # Load-independent liveness: after its peer died, the survivor may wait out the heartbeat
    # and then needs at most as long again as the peer took to start and run 3 steps (a loaded
    # machine slows both alike).
    survived, peer_lifetime = ended[0] - ended[1], ended[1]
    assert survived < 2 * HEARTBEAT_SECONDS + peer_lifetime, (survived, peer_lifetime)
    print(f"\nsurvivor stopped {survived:.1f}s after its peer, which lived {peer_lifetime:.1f}s")
