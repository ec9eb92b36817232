"""Patch tracking through the reduction stages, the attention map, and the PNGs of the
visualize module and its command."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clca_jax import pretrained, visualize
from clca_jax.models import create_model, default_model_config
from clca_jax.models.reduction import Stage, StagePlan

IMG_SIZE = 64  # patch 8: an 8x8 grid, 64 patches
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model_config(method: str, clca: bool = False, keep_rate: float = 0.5):
    config = default_model_config()
    config.backbone = "vit_small_patch8_224"
    config.update(img_size=IMG_SIZE, embed_dim=64, depth=4, num_heads=2, num_classes=5)
    config.reduction.update(method=method, keep_rate=keep_rate, locations=(1, 2))
    if clca:
        config.clca.update(head="cla", clc=True, num_clr=1)
    return config


@functools.cache  # each tiny model is initialised once per session
def build(method: str, clca: bool = False, keep_rate: float = 0.5):
    model = create_model(tiny_model_config(method, clca, keep_rate))
    variables = model.init(jax.random.key(0), jnp.zeros((1, IMG_SIZE, IMG_SIZE, 3)))
    return model, variables


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), np.uint8)


def slots_of(model, variables, image) -> list[np.ndarray]:
    _, kept, _ = visualize.forward(model, variables, image)
    return visualize.patch_slots(model, kept)


def stage(tokens_in: int, tokens_out: int, count: int, protected: int = 0) -> Stage:
    return Stage(0, 1, StagePlan(count, tokens_out), tokens_in, protected)


# ---------------------------------------------------------------------------------------------
# stage_destinations on hand-written `kept` values.


def test_positions_send_kept_tokens_after_cls_and_drop_the_rest():
    # [CLS, t1..t5, clr]: keep t4, t2 -> [CLS, t4, t2, fused, clr]
    dest = visualize.stage_destinations("evit", stage(7, 5, 2, 1), np.array([[4, 2]]))
    np.testing.assert_array_equal(dest, [[0, -1, 2, -1, 1, -1, 4]])


def test_tome_destinations_are_used_as_given_and_the_suffix_follows():
    kept = np.array([[0, 1, 2, 1, 3]])
    dest = visualize.stage_destinations("tome", stage(6, 5, 1, 1), kept)
    np.testing.assert_array_equal(dest, [[0, 1, 2, 1, 3, 4]])


def test_clusters_shift_past_cls():
    dest = visualize.stage_destinations("dpcknn", stage(5, 3, 2), np.array([[1, 0, 1, 0]]))
    np.testing.assert_array_equal(dest, [[0, 2, 1, 2, 1]])


def test_ats_gathered_ids_skip_padding():
    dest = visualize.stage_destinations("ats", stage(6, 4, 4), np.array([[0, 2, 5, -1]]))
    np.testing.assert_array_equal(dest, [[0, -1, 1, -1, -1, 2]])


def test_mixing_weights_send_each_token_to_its_heaviest_group():
    weights = np.array([[[0.7, 0.1, 0.6], [0.3, 0.9, 0.4]]])  # [B, K=2, S=3]
    dest = visualize.stage_destinations("sit", stage(4, 3, 2), weights)
    np.testing.assert_array_equal(dest, [[0, 1, 2, 1]])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="no token map"):
        visualize.stage_destinations("magic", stage(4, 3, 2), np.zeros((1, 2), int))


# ---------------------------------------------------------------------------------------------
# patch_slots on tiny models.


@pytest.mark.parametrize("keep_rate", [0.5, 0.25])
def test_topk_keeps_exactly_the_scheduled_patches(keep_rate):
    model, variables = build("topk", keep_rate=keep_rate)
    stages = visualize.active_stages(model)
    for stage_, slots in zip(stages, slots_of(model, variables, pixels()), strict=True):
        kept = slots[0][slots[0] >= 0]
        assert kept.size == stage_.plan.count
        # one patch per token, in slots 1..count
        np.testing.assert_array_equal(np.sort(kept), 1 + np.arange(stage_.plan.count))


def test_evit_keeps_the_scheduled_count_less_kept_fused_tokens():
    model, variables = build("evit")
    for index, (stage_, slots) in enumerate(
        zip(visualize.active_stages(model), slots_of(model, variables, pixels(1)), strict=True)
    ):
        kept = slots[0][slots[0] >= 0]
        # Only the fused tokens of earlier stages compete with the patches.
        assert stage_.plan.count - index <= kept.size <= stage_.plan.count
        assert len(np.unique(kept)) == kept.size


def test_evit_with_the_cache_never_keeps_more_patches_than_planned():
    model, variables = build("evit", clca=True)
    previous = None
    for stage_, slots in zip(
        visualize.active_stages(model), slots_of(model, variables, pixels(2)), strict=True
    ):
        kept = slots[0] >= 0
        assert 0 < kept.sum() <= stage_.plan.count
        if previous is not None:  # a dropped patch never comes back
            assert not np.any(kept & ~previous)
        previous = kept


@pytest.mark.parametrize("method", ["tome", "dpcknn", "sit", "patchmerger"])
def test_merging_methods_send_every_patch_to_a_valid_token(method):
    model, variables = build(method, clca=True)
    for stage_, slots in zip(
        visualize.active_stages(model), slots_of(model, variables, pixels()), strict=True
    ):
        # every patch lives in a token after CLS and before the protected suffix
        assert np.all(slots >= 1)
        assert np.all(slots < stage_.plan.tokens_out - stage_.protected)
        assert len(np.unique(slots)) < model.num_patches


@pytest.mark.parametrize("method", ["ats", "dynamicvit"])
def test_dropping_methods_keep_at_most_the_planned_patches(method):
    model, variables = build(method, clca=True)
    for stage_, slots in zip(
        visualize.active_stages(model), slots_of(model, variables, pixels()), strict=True
    ):
        kept = slots[0][slots[0] >= 0]
        assert kept.size <= stage_.plan.tokens_out - 1 - stage_.protected
        assert len(np.unique(kept)) == kept.size


def test_cls_attention_map_is_nan_exactly_on_dropped_patches():
    model, variables = build("topk")
    image = pixels()
    first = visualize.cls_attention_map(model, variables, image, block=0)
    assert first.shape == (8, 8) and np.all(np.isfinite(first)) and first.sum() < 1
    last = visualize.cls_attention_map(model, variables, image)
    final_slots = slots_of(model, variables, image)[-1][0]
    np.testing.assert_array_equal(np.isnan(last.reshape(-1)), final_slots < 0)
    assert np.all(last[np.isfinite(last)] > 0)


# ---------------------------------------------------------------------------------------------
# Figures and the command.


def test_kept_tokens_figure_is_written_as_png(tmp_path):
    rows = [visualize.kept_tokens(*build(method), pixels()) for method in ("evit", "tome")]
    assert rows[0].blocks == (1, 2) and rows[1].merging
    path = visualize.save_figure(visualize.plot_kept_tokens(rows), str(tmp_path / "k" / "a.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def write_summary(directory, method: str, keep_rate: float, top1: float, gmacs: float) -> None:
    model = json.loads(tiny_model_config(method, clca=True, keep_rate=keep_rate).to_json())
    summary = {"top1": top1, "gmacs": gmacs, "images_per_second": 100 / gmacs}
    summary["config"] = {"model": model}
    os.makedirs(directory)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_sweep_command_writes_both_plots(tmp_path, capsys):
    for method in ("evit", "tome"):
        for keep_rate in (0.25, 0.5):
            write_summary(
                tmp_path / "runs" / f"{method}{keep_rate}", method, keep_rate, 50, keep_rate
            )
    code = visualize.main(["sweep", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert code == 0
    for name in (visualize.ACCURACY_PNG, visualize.THROUGHPUT_PNG):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    series = visualize.series(visualize.load_summaries([str(tmp_path / "runs")]), "gmacs", "top1")
    assert sorted(series) == [
        "vit_small_patch8_224: evit + CLCA",
        "vit_small_patch8_224: tome + CLCA",
    ]
    assert "accuracy_vs_gmacs.png" in capsys.readouterr().out


def test_sweep_command_names_a_folder_without_runs(tmp_path, capsys):
    assert visualize.main(["sweep", "--workdir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_kept_and_attention_commands_on_a_converted_model(tmp_path):
    model, variables = build("evit", clca=True)
    model_dir = str(tmp_path / "model")
    pretrained.save_pretrained(model_dir, variables, tiny_model_config("evit", clca=True))
    image = str(tmp_path / "leaf.png")
    Image.fromarray(pixels()[:50]).save(image)
    for command in ("kept", "attention"):
        out = str(tmp_path / f"{command}.png")
        args = [command, f"--workdir={model_dir}", f"--image={image}", f"--out={out}"]
        assert visualize.main(args) == 0
        assert open(out, "rb").read(8) == PNG_MAGIC
    # without --image a converted model has nothing to draw on
    assert visualize.main(["kept", f"--workdir={model_dir}", "--out=x.png"]) == 2


def test_a_run_without_reduction_counts_as_keep_rate_one(tmp_path):
    write_summary(tmp_path / "none", "none", 0.1, 50, 1.0)
    [summary] = visualize.load_summaries([str(tmp_path)])
    assert visualize.summary_setting(summary) == ("vit_small_patch8_224: no reduction + CLCA", 1.0)


def test_a_per_stage_keep_rate_list_is_its_own_series_and_plots(tmp_path):
    write_summary(tmp_path / "list", "evit", [0.7, 0.5], 60, 0.2)
    write_summary(tmp_path / "single", "evit", 0.5, 55, 0.1)
    summaries = visualize.load_summaries([str(tmp_path)])
    label, keep_rate = visualize.summary_setting(summaries[0])
    assert label == "vit_small_patch8_224: evit + CLCA kr=(0.7, 0.5)" and np.isnan(keep_rate)
    assert visualize.keep_rate_text((0.7, 0.5)) == "(0.7, 0.5)"
    assert visualize.keep_rate_text(0.5) == "0.5"
    written = visualize.save_sweep_plots([str(tmp_path)], str(tmp_path / "plots"))
    assert all(open(path, "rb").read(8) == PNG_MAGIC for path in written)


def test_sweep_outputs_are_kept_or_refused_with_one_line(tmp_path, capsys):
    """An existing picture stays unless --overwrite; an --out that is a file, a picture path
    that is a folder and a damaged summary.json are one error line each, nothing written."""
    write_summary(tmp_path / "runs" / "evit", "evit", 0.5, 50, 0.5)
    runs = ["sweep", "--workdir", str(tmp_path / "runs")]
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / visualize.ACCURACY_PNG).write_bytes(b"earlier")
    assert visualize.main([*runs, "--out", str(plots)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (plots / visualize.ACCURACY_PNG).read_bytes() == b"earlier"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert visualize.main([*runs, "--out", str(a_file)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (plots / visualize.ACCURACY_PNG).unlink()
    (plots / visualize.ACCURACY_PNG).mkdir()
    assert visualize.main([*runs, "--out", str(plots), "--overwrite"]) == 2
    assert "is a folder; name the picture file" in capsys.readouterr().err
    with open(tmp_path / "runs" / "evit" / "summary.json", "w") as f:
        f.write('{"config": ')
    assert visualize.main([*runs, "--out", str(tmp_path / "new")]) == 2
    assert "is not a valid summary.json" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert [p.name for p in plots.iterdir()] == [visualize.ACCURACY_PNG]  # no partial files
