"""MACs in the paper's convention (spec 8) and the flops command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clca_jax import flops
from clca_jax.models import create_model, default_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_macs(model_config):
    return flops.count_macs(create_model(model_config))


def config(method="none", keep_rate=1.0, clca=False, img_size=448, classes=80):
    model = default_model_config()
    model.backbone = "vit_base_patch16_224.orig_in21k"
    model.img_size = img_size
    model.num_classes = classes
    model.reduction.method = method
    model.reduction.keep_rate = keep_rate
    if clca:
        model.clca.head, model.clca.clc, model.clca.num_clr = "cla", True, 1
    return model


def test_vit_b16_448_is_78_5_gmacs():
    cost = count_macs(config())
    # Spec 8.3: 12 blocks of 6,504,472,320 + patch embedding + final LN + head.
    assert cost.block_macs == (6_504_472_320,) * 12
    assert cost.total_macs == 78_053_667_840 + 462_422_016 + 602_880 + 61_440
    assert round(cost.gmacs, 1) == 78.5


@pytest.mark.parametrize(
    "keep_rate,clca,expected",
    [(0.1, True, 25.17), (0.7, True, 50.86), (0.1, False, 24.80), (0.7, False, 50.17)],
)
def test_evit_448(keep_rate, clca, expected):
    assert round(count_macs(config("evit", keep_rate, clca)).gmacs, 2) == expected


def test_evit_clca_blocks_match_spec_8_3():
    blocks = count_macs(config("evit", 0.1, True)).block_macs
    gap = 768  # the mean of each cached GAP token, counted with the block that caches it
    assert blocks[0] == 6_513_965_568 + gap
    assert blocks[3] == 3_187_359_761 + gap
    assert blocks[6] == 268_990_550 + gap
    assert blocks[9] == 59_466_256 + gap
    assert blocks[10] == 70_955_520 and blocks[11] == 85_183_488


def test_224():
    assert round(count_macs(config(img_size=224)).gmacs, 2) == 17.57
    assert round(count_macs(config("evit", 0.1, True, 224)).gmacs, 2) == 5.96
    assert round(count_macs(config("evit", 0.7, True, 224)).gmacs, 2) == 12.18


def run_flops(*args):
    command = [sys.executable, "-m", "clca_jax.flops", "--config=configs/soyglobal.py", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout


def test_cli_json_soyglobal_paper_setting():
    result = json.loads(run_flops("--json"))
    assert round(result["gmacs"], 1) == 25.2
    lengths = [(b["attn_tokens"], b["mlp_tokens"]) for b in result["blocks"]]
    assert lengths == [(786, 786)] * 3 + [(786, 81), (87, 87), (87, 87), (87, 11)] + [
        (17, 17), (17, 17), (17, 4), (10, 10), (12, 12)
    ]  # fmt: skip
    assert result["xla_gflops"] > 2 * 0.9 * result["gmacs"]  # XLA counts 2 FLOPs per MAC


def test_cli_keep_rate_override_and_table():
    result = json.loads(run_flops("--json", "--skip_xla", "--config.model.reduction.keep_rate=0.7"))
    assert round(result["gmacs"], 1) == 50.9
    assert result["blocks"][3] == {"attn_tokens": 786, "mlp_tokens": 552}
    table = run_flops("--skip_xla")
    assert "total: 25.18 GMACs" in table and "786" in table


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=demo", "--config.model.reduction.keep_rate=2.0", "--skip_xla"], "keep_rate"),
        (["--workdir=/nonexistent/run"], "config.json not found"),
        (["--config=demo", "--workdir=/nonexistent/run"], "not both"),
    ],
)
def test_a_bad_config_or_workdir_is_one_error_line_with_status_2(args, message):
    command = [sys.executable, "-m", "clca_jax.flops", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
