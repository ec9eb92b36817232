"""Interruptions: SIGKILL at reproducible and at random moments, SIGTERM, then the same command.

Every run here is `python -m clca_jax.main` in a subprocess on the tiny model of
`tests.test_train_loop` (3 epochs of 3 steps, a checkpoint every 2 steps, a TensorBoard point
every step). Deterministic kill points (`step:N`, `save:N`, `term:N`) run the same command
through `tests.killable_main`, which acts at the training loop's `LoopEvents` hooks; one more
kill comes from this process at a random time. Kill
points are drawn from a seeded generator, so a failure repeats.

The helpers (`write_cli_config`, `cli_env`, `run_cli`, `train_losses`, `assert_same_run`) are
shared by the other reliability tests.
"""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clca_jax import train
from tests.killable_main import KILL_AT_ENV
from tests.test_train_loop import NUM_CLASSES, fabricated_folder, restore_state, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_SEED = 20250409
TOTAL_STEPS = 9
SAVE_STEPS = (2, 4, 6, 8, 9)
RUN_TIMEOUT = 180

CLI_CONFIG = """
from tests.test_train_loop import tiny_config


def get_config():
    config = tiny_config({data_dir!r})
    config.train.epochs = 3
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 2
{extra}
    return config
"""


def write_cli_config(path: str, data_dir: str, extra: str = "") -> str:
    """A config file for `clca_jax.main`: the tiny config, 9 steps; `extra` adds lines
    (indented by 4) that change `config`."""
    with open(path, "w") as f:
        f.write(CLI_CONFIG.format(data_dir=data_dir, extra=extra))
    return path


def cli_config(data_dir: str):
    """The config `write_cli_config` writes, for in-process checks."""
    config = tiny_config(data_dir, train__epochs=3, train__log_every_steps=1)
    config.checkpoint.every_steps = 2
    return config


def cli_env(cache_dir: str, **extra) -> dict:
    """The environment of a run: CPU, a shared compilation cache, unbuffered output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.pop(KILL_AT_ENV, None)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def main_command(config_path: str, workdir: str, env: dict) -> list[str]:
    """The training command; with a kill point in `env`, through `tests.killable_main`."""
    return [
        sys.executable,
        "-m",
        "tests.killable_main" if env.get(KILL_AT_ENV) else "clca_jax.main",
        f"--config={config_path}",
        f"--workdir={workdir}",
    ]


def run_cli(config_path: str, workdir: str, env: dict, kill_after: float | None = None):
    """Runs the training command; with `kill_after`, SIGKILLs it that many seconds after start.

    Returns:
      (return code, combined output).
    """
    process = subprocess.Popen(
        main_command(config_path, workdir, env),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    return process.returncode, output


def train_losses(workdir: str) -> dict[int, set[float]]:
    """Every `train/loss` value in the workdir's TensorBoard files, by step (a step run twice
    across restarts appears twice)."""
    from tensorboardX.proto import event_pb2

    losses: dict[int, set[float]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses.setdefault(event.step, set()).add(value.simple_value)
    return losses


def assert_same_run(config, expected_dir: str, actual_dir: str) -> None:
    """Same final train state bit for bit, same evaluation, same logged loss at every step."""
    resolved = train.resolve_config(config, NUM_CLASSES)
    expected, expected_loader = restore_state(resolved, expected_dir)
    actual, actual_loader = restore_state(resolved, actual_dir)
    assert actual_loader == expected_loader
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    summaries = []
    for workdir in (expected_dir, actual_dir):
        with open(os.path.join(workdir, "summary.json")) as f:
            summaries.append(json.load(f))
    for key in ("loss", "top1", "top5", "num_examples", "steps"):
        assert summaries[1][key] == summaries[0][key], key
    reference = train_losses(expected_dir)
    assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    for step, values in train_losses(actual_dir).items():
        assert values == reference[step], (step, values, reference[step])


def leftover_temporaries(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "*", "*orbax-checkpoint-tmp*")))


def assert_only_complete_steps(workdir: str) -> None:
    """Every step folder a restore could pick is a committed one: a save killed midway is
    still an orbax temporary, never a `<step>` folder."""
    folder = os.path.join(workdir, "checkpoints")
    for name in os.listdir(folder):
        if name.isdigit():
            assert os.path.isfile(os.path.join(folder, name, "_CHECKPOINT_METADATA")), name
            assert os.path.isfile(os.path.join(folder, name, "loader", "metadata")), name


def draw_kill_points(rng: np.random.Generator, count: int) -> list[str]:
    """`count` hook values at increasing steps, so each run gets past the previous kill; at
    least one kills during a save."""
    steps = sorted(int(s) for s in rng.choice(np.arange(1, TOTAL_STEPS), count, replace=False))
    phases = ["save" if s in SAVE_STEPS and rng.random() < 0.5 else "step" for s in steps]
    if "save" not in phases:
        first_save = next(i for i, s in enumerate(steps) if s in SAVE_STEPS)
        phases[first_save] = "save"
    return [f"{phase}:{step}" for phase, step in zip(phases, steps, strict=True)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, config file, compilation cache and an uninterrupted run."""
    root = tmp_path_factory.mktemp("kill")
    data_dir = fabricated_folder(str(root / "data"))
    config_path = write_cli_config(str(root / "tiny_cli.py"), data_dir)
    env = cli_env(str(root / "jax_cache"))
    whole = str(root / "whole")
    code, output = run_cli(config_path, whole, env)
    assert code == 0, output[-4000:]
    return data_dir, config_path, env, whole


def test_killed_runs_resume_to_the_uninterrupted_result(setup, tmp_path):
    data_dir, config_path, env, whole = setup
    rng = np.random.default_rng(KILL_SEED)
    hooks = draw_kill_points(rng, 4)
    workdir = str(tmp_path / "killed")
    kills, temporaries = [], 0
    for hook in hooks:
        start = time.perf_counter()
        code, output = run_cli(config_path, workdir, dict(env, **{KILL_AT_ENV: hook}))
        restart_seconds = time.perf_counter() - start  # start-up (cached compile) to kill
        assert code == -signal.SIGKILL, (hook, output[-4000:])
        kills.append(hook)
        temporaries += len(leftover_temporaries(workdir))
        assert_only_complete_steps(workdir)
    # A kill from outside at a random moment of a restart (start-up, steps, saves or the final
    # evaluation), scaled by how long the last restart took; drawn again, sooner, if the run
    # happened to finish first.
    for attempt in range(4):
        delay = float(rng.uniform(0.3, 1.0)) * restart_seconds * 0.6**attempt
        code, output = run_cli(config_path, workdir, env, kill_after=delay)
        if code == -signal.SIGKILL:
            kills.append(f"async:{delay:.2f}s")
            break
    temporaries += len(leftover_temporaries(workdir))
    code, output = run_cli(config_path, workdir, env)
    assert code == 0, output[-4000:]
    assert not leftover_temporaries(workdir)
    print(
        f"\nkill points tried: {len(kills)} {kills}; orbax temporaries left by kills: "
        f"{temporaries} (all ignored and removed)"
    )
    assert len(kills) == 5 and any(k.startswith("save:") for k in kills), kills
    assert any(k.startswith("async:") for k in kills), kills
    assert_same_run(cli_config(data_dir), whole, workdir)


def test_sigterm_saves_and_exits_cleanly_then_the_run_continues(setup, tmp_path):
    data_dir, config_path, env, whole = setup
    workdir = str(tmp_path / "preempted")
    code, output = run_cli(config_path, workdir, dict(env, **{KILL_AT_ENV: "term:3"}))
    assert code == 0, output[-4000:]
    assert "preempted (SIGTERM): saved step 3" in output
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    code, output = run_cli(config_path, workdir, env)
    assert code == 0, output[-4000:]
    assert "Resumed from step 3" in output
    assert_same_run(cli_config(data_dir), whole, workdir)
