"""Runs and workdirs: one run per workdir, no run in an unnamed folder, no result mislabelled,
damaged saved files named, and SIGTERM handled the same way at every stage of a run.

Refused cases compare the workdir's files before and after (`snapshot`): nothing may change.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import pytest

from clca_jax import evaluate, train
from clca_jax.training import checkpoint, workdirs
from tests.killable_main import KILL_AT_ENV
from tests.test_reliability_inputs import snapshot
from tests.test_reliability_kill import (
    REPO,
    cli_env,
    run_cli,
    write_cli_config,
)
from tests.test_train_loop import compilation_cache, tiny_config  # noqa: F401

pytestmark = [
    pytest.mark.usefixtures("compilation_cache"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def run_command(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cli_env(tempfile.mkdtemp(prefix="jax_cache_")),
        capture_output=True,
        text=True,
        timeout=600,
    )


def copy_of(finished_dir: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_dir, workdir)
    return workdir


@pytest.mark.parametrize("seed", [-1, 2**31, 2**64, True])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(finished, tmp_path, seed):
    _, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    before = snapshot(workdir)
    config = tiny_config(data_dir, train__epochs=1)
    config.seed = seed
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.2147483647"):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_workdir_is_refused(finished, tmp_path, monkeypatch, name):
    _, data_dir, _ = finished
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--workdir is empty"):
        train.train_and_evaluate(tiny_config(data_dir, train__epochs=1), name)
    assert os.listdir(tmp_path) == []


def test_resuming_with_fewer_steps_than_trained_is_refused(finished, tmp_path):
    root, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    config = tiny_config(data_dir, train__epochs=1)
    config.train.batch_size = 16  # 1 step per epoch; the run holds step 3
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=r"checkpoint at step 3, past step 1, the last"):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before


def test_a_truncated_run_config_is_named(finished, tmp_path):
    _, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    path = os.path.join(workdir, "config.json")
    with open(path, "r+") as f:
        f.truncate(40)
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*damaged"):
        train.train_and_evaluate(tiny_config(data_dir, train__epochs=1), workdir)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        evaluate.evaluate_directory(workdir)
    assert snapshot(workdir) == before


def test_a_damaged_best_checkpoint_is_named(finished, tmp_path):
    _, _, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    best = os.path.join(workdir, "best")
    files = [os.path.join(d, f) for d, _, names in os.walk(best) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    with pytest.raises(ValueError, match=r"cannot restore the best checkpoint .*best/3: .*latest"):
        evaluate.evaluate_directory(workdir, which="best")
    done = run_command("clca_jax.evaluate", f"--workdir={workdir}", "--checkpoint=best")
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: cannot restore the best checkpoint ")


def test_a_second_run_on_a_workdir_in_use_stops_naming_the_holder(finished, tmp_path):
    _, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    config = tiny_config(data_dir, train__epochs=1)
    with workdirs.WorkdirLock(workdir):
        before = snapshot(workdir)
        with pytest.raises(
            workdirs.WorkdirBusyError, match=rf"in use by another run .*pid {os.getpid()}"
        ):
            train.train_and_evaluate(config, workdir)
        assert snapshot(workdir) == before
    assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_FILE))


def test_a_lock_left_by_a_killed_run_is_taken_over(finished, tmp_path):
    _, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    with open(os.path.join(workdir, workdirs.LOCK_FILE), "w") as f:
        f.write("host elsewhere, pid 999999\n")  # written, but its holder is gone (no flock)
    summary = train.train_and_evaluate(tiny_config(data_dir, train__epochs=1), workdir)
    assert summary["steps"] == 3
    assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_FILE))


def test_two_runs_started_together_one_stops_the_other_finishes(finished, tmp_path):
    _, data_dir, _ = finished
    config_path = write_cli_config(str(tmp_path / "cli.py"), data_dir)
    workdir = str(tmp_path / "together")
    env = cli_env(str(tmp_path / "jax_cache"))
    command = [sys.executable, "-m", "clca_jax.main", f"--config={config_path}"]
    command.append(f"--workdir={workdir}")
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    codes = [p.returncode for p in processes]
    # One takes the workdir; the other stops at once naming it (or, had it started only after
    # the first had finished, resumes that finished run).
    assert 0 in codes, outputs
    for code, output in zip(codes, outputs, strict=True):
        assert code == 0 or "in use by another run" in output, output[-2000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 9


@pytest.mark.parametrize("point", ["term:start", "term:eval"])
def test_sigterm_during_start_up_or_the_final_evaluation_stops_cleanly(finished, tmp_path, point):
    _, data_dir, _ = finished
    config_path = write_cli_config(str(tmp_path / "cli.py"), data_dir)
    workdir = str(tmp_path / "run")
    env = cli_env(str(tmp_path / "jax_cache"))
    code, output = run_cli(config_path, workdir, dict(env, **{KILL_AT_ENV: point}))
    assert code == 0, output[-3000:]
    assert "preempted (SIGTERM)" in output, output[-3000:]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    code, output = run_cli(config_path, workdir, env)
    assert code == 0, output[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 9


def test_sigterm_during_an_evaluation_between_epochs_saves_and_stops(finished, tmp_path):
    """The notice arrives after step 3, the end of epoch 1, whose evaluation then stops: the
    run saves step 3, exits 0, and the same command finishes it."""
    _, data_dir, _ = finished
    extra = "    config.eval.every_epochs = 1"
    config_path = write_cli_config(str(tmp_path / "cli.py"), data_dir, extra)
    workdir = str(tmp_path / "run")
    env = cli_env(str(tmp_path / "jax_cache"))
    code, output = run_cli(config_path, workdir, dict(env, **{KILL_AT_ENV: "term:3"}))
    assert code == 0, output[-3000:]
    assert "preempted (SIGTERM)" in output, output[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
    code, output = run_cli(config_path, workdir, env)
    assert code == 0, output[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 9


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system, nearly full: the first checkpoint does not fit."""
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a small tmpfs needs root (CI and the development machines run as root)"
        )
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (4 * 2**20 - 300 * 2**10))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_the_run_with_one_message(finished, tmp_path, small_disk):
    _, data_dir, _ = finished
    config_path = write_cli_config(str(tmp_path / "cli.py"), data_dir)
    workdir = str(small_disk / "run")
    done = run_command("clca_jax.main", f"--config={config_path}", f"--workdir={workdir}")
    assert done.returncode == 2, done.stderr[-3000:]
    # The run's last word is one line. (Before it, orbax's writer threads may print "Event loop
    # is closed" tracebacks of their own while the failing save unwinds; they are not ours.)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    assert errors[0].startswith("error: cannot save checkpoint 2 in ")
    assert "No space left on device" in errors[0] or "RESOURCE_EXHAUSTED" in errors[0]
    assert "none was saved before" in errors[0] and "rerun the same command" in errors[0]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # never half-used


def test_a_damaged_latest_checkpoint_is_one_error_line(finished, tmp_path):
    _, data_dir, finished_dir = finished
    workdir = copy_of(finished_dir, tmp_path)
    state_files = []
    for folder, _, names in os.walk(os.path.join(workdir, "checkpoints", "3", "state")):
        state_files += [os.path.join(folder, name) for name in names]
    with open(max(state_files, key=os.path.getsize), "r+b") as f:
        f.truncate(50)
    config_path = write_cli_config(str(tmp_path / "cli.py"), data_dir)
    before = snapshot(workdir)
    done = run_command("clca_jax.main", f"--config={config_path}", f"--workdir={workdir}")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert len(errors) == 1, done.stderr[-3000:]
    assert (
        errors[0].startswith("error: cannot restore checkpoint ") and "checkpoints/3" in errors[0]
    )
    assert snapshot(workdir) == before


def test_only_callbacks_into_a_closed_loop_are_silenced(monkeypatch):
    """The hook a restore installs drops tensorstore's orphaned completions, nothing else."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with pytest.raises(ValueError, match="^cannot read: RuntimeError$"):
        with checkpoint._reading(lambda error: f"cannot read: {type(error).__name__}"):
            raise RuntimeError("damaged")

    def unraisable(error, obj=None):
        return types.SimpleNamespace(
            exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=obj
        )

    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    assert seen == []
    others = [
        unraisable(RuntimeError("Event loop is closed"), obj="a finaliser"),
        unraisable(RuntimeError("another")),
        unraisable(ValueError("Event loop is closed")),
    ]
    for other in others:
        sys.unraisablehook(other)
    assert seen == others


def test_tensorstore_details_are_cut_from_an_error_line():
    error = Exception("Encountered error reading (0, 32). See full TensorStore details: <x>")
    assert checkpoint._first_line(error) == "Exception: Encountered error reading (0, 32)"
