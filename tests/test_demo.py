"""The demo command: three runs that differ only in token reduction and CLCA, their table and
the kept-token picture, run as a user types it."""

import json
import os

from clca_jax import config_files, demo
from tests import command_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_three_runs_differ_only_in_reduction_and_clca():
    base = config_files.load("demo")
    assert base.model.reduction.method == "evit" and base.model.reduction.keep_rate == 0.1
    assert base.model.clca.head == "cla" and base.model.clca.clc
    configs = {folder: config for folder, _, config in demo.run_configs(base)}
    assert configs["clca"].to_dict() == base.to_dict()
    for folder, changed in (
        ("reduction_only", {"clca"}),
        ("no_reduction", {"clca", "reduction"}),
    ):
        model, reference = configs[folder].model.to_dict(), base.model.to_dict()
        assert {k for k in model if model[k] != reference[k]} == changed, folder
        other = configs[folder].to_dict()
        assert {k: v for k, v in other.items() if k != "model"} == {
            k: v for k, v in base.to_dict().items() if k != "model"
        }
    assert configs["no_reduction"].model.reduction.method == "none"
    assert configs["reduction_only"].model.clca.head == "none"
    assert not configs["reduction_only"].model.clca.clc
    # the demo's own variants are the same changes
    for folder in ("reduction_only", "no_reduction"):
        assert config_files.load(f"demo:{folder}").to_dict() == configs[folder].to_dict()


def test_demo_command_trains_three_runs_and_writes_their_table_and_picture(tmp_path):
    workdir = tmp_path / "demo"
    done = command_line.run(
        ["-m", "clca_jax.demo", "--config=demo:tiny", f"--workdir={workdir}"],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 3
    with open(workdir / demo.COMPARISON_FILE) as f:
        assert f.read().splitlines() == rows
    for row, (folder, label, _) in zip(rows[2:], demo.RUNS, strict=True):
        with open(workdir / folder / "summary.json") as f:
            summary = json.load(f)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells == [
            label,
            f"{summary['top1']:.2f}",
            f"{summary['gmacs']:.4f}",
            f"{summary['images_per_second']:.0f}",
        ]
    gmacs = [float(row.split("|")[3]) for row in rows[2:]]
    assert gmacs[1] < gmacs[2] and gmacs[0] < gmacs[2]  # reduction costs less than none
    with open(workdir / demo.PICTURE_FILE, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert not os.path.exists(tmp_path / "runs")  # nothing written outside --workdir
