"""tools/benchmark.py on a tiny config: one process per measurement, CSV, plot, flag errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from clca_jax.configs import soyglobal
from clca_jax.flops import count_macs
from clca_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")
REQUIRED = ["images_per_s", "compile_s", "gmacs", "xla_gflops", "peak_fraction"]


def run_tool(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, TOOL, "--config=configs/soyglobal.py:tiny", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_benchmark_writes_one_row_per_method_rate_and_mode(tmp_path):
    result = run_tool(
        "--methods=none,evit", "--keep_rates=0.5,0.25", "--batch_size=2", "--repeats=1",
        f"--out={tmp_path}", "--torch",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(rows[0])
    keys = [(row["framework"], row["method"], float(row["keep_rate"]), row["mode"]) for row in rows]
    measured = [("jax", "none", 1.0), ("jax", "evit", 0.5), ("jax", "evit", 0.25)]
    measured.append(("torch", "none", 1.0))
    expected = [(*entry, mode) for entry in measured for mode in ("inference", "train")]
    assert keys == expected

    model = soyglobal.get_config("tiny").model
    for row in rows:
        assert float(row["images_per_s"]) > 0
        if row["framework"] == "torch":
            continue
        model.reduction.method, model.reduction.keep_rate = row["method"], float(row["keep_rate"])
        assert float(row["gmacs"]) == pytest.approx(count_macs(create_model(model)).gmacs, rel=1e-9)
        assert float(row["compile_s"]) > 0 and float(row["xla_gflops"]) > 0
        assert 0 < float(row["peak_fraction"]) < 1.5
        assert int(row["traces"]) == 1  # exactly one compile per step function
    by_rate = {float(row["keep_rate"]): float(row["gmacs"]) for row in rows[:6]}
    assert by_rate[0.25] < by_rate[0.5] < by_rate[1.0]
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    header = next(line for line in result.stdout.splitlines() if line.startswith("framework"))
    assert header.split()[:6] == ["framework", "method", "kr", "mode", "img/s", "ms/batch"]
    assert "host malloc: " in result.stdout


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--methods=bogus"], "bogus at keep rate 0.1: model.reduction.method must be one of"),
        (["--keep_rates=half"], "--keep_rates must be numbers, got half."),
        (["--modes=fast"], "--modes takes inference, train, train_grad_norms, got"),
        (["--modes=train", "--onnx"], "--onnx times inference: add inference to --modes."),
    ],
)
def test_benchmark_rejects_bad_flags_before_measuring(tmp_path, flags, message):
    result = run_tool(*flags, f"--out={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "USAGE" not in result.stderr + result.stdout  # one line, not absl's usage text
    assert "measuring" not in result.stdout


def test_benchmark_keeps_an_earlier_runs_results(tmp_path):
    """Results already in --out stay as they are, byte for byte, unless --overwrite."""
    earlier = tmp_path / "benchmark.csv"
    earlier.write_text("an earlier run\n")
    result = run_tool("--methods=none", f"--out={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "already holds benchmark.csv of an earlier run" in last and "--overwrite" in last
    assert earlier.read_text() == "an earlier run\n" and os.listdir(tmp_path) == ["benchmark.csv"]
    result = run_tool("--methods=none", f"--out={earlier}")
    assert result.returncode == 2 and "is a file; name a folder" in result.stderr


def test_gradient_norm_mode_times_the_train_step_with_the_norms_jax_only(tmp_path):
    """`train_grad_norms` is the train step plus `train.log_gradient_norms`'s norms: more XLA
    flops than the plain step (the norms are computed, not dropped), and no PyTorch row."""
    result = run_tool(
        "--methods=evit", "--keep_rates=0.5", "--batch_size=2", "--repeats=1",
        "--modes=train,train_grad_norms", f"--out={tmp_path}", "--torch",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(row["framework"], row["mode"]) for row in rows]
    assert keys == [("jax", "train"), ("jax", "train_grad_norms"), ("torch", "train")]
    plain, with_norms = (float(row["xla_gflops"]) for row in rows[:2])
    assert with_norms > plain
    assert rows[0]["gmacs"] == rows[1]["gmacs"]
    assert "train_grad_norms" in result.stdout


def test_onnx_rows_time_each_inference_models_export(tmp_path):
    """`--onnx` adds an ONNX Runtime row after the JAX rows for each model timed for
    inference, with its latency; a method the converter cannot express gets a row without
    figures, and the run goes on."""
    result = run_tool(
        "--methods=none,evit,ats", "--keep_rates=0.5", "--batch_size=2", "--repeats=1",
        "--modes=inference", f"--out={tmp_path}", "--onnx",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(row["framework"], row["method"]) for row in rows]
    methods = ["none", "evit", "ats"]
    assert keys == [("jax", m) for m in methods] + [("onnxruntime", m) for m in methods]
    jax_rows = {row["method"]: row for row in rows[:3]}
    for row in rows:
        if row["framework"] == "onnxruntime" and row["method"] == "ats":
            assert row["images_per_s"] == "nan" and row["latency_ms"] == "nan"
            continue
        assert float(row["images_per_s"]) > 0
        latency = float(row["latency_ms"])
        assert latency == pytest.approx(1e3 * 2 / float(row["images_per_s"]), rel=1e-9)
        assert row["mode"] == "inference"
        assert float(row["gmacs"]) == float(jax_rows[row["method"]]["gmacs"])
    assert "onnxruntime" in result.stdout and "ms/batch" in result.stdout
