"""Pictures of a run: the patches every reduction stage keeps, where the class token looks,
accuracy / throughput plots over the workdirs of a sweep, and the gradient norms of runs.

    # patches kept (dropping methods) or merged (ToMe, DPC-KNN, SiT, PatchMerger) at every
    # reduction block, one row per run; --index takes an image of the run's evaluation split
    python -m clca_jax.visualize kept --workdir=runs/demo --index=0 --out=kept.png
    python -m clca_jax.visualize kept --workdir=runs/evit,runs/tome --image=leaf.png --out=kept.png
    # the class token's head-mean attention over the patches in one block (default: the last)
    python -m clca_jax.visualize attention --workdir=runs/demo --image=leaf.png --out=attn.png
    # top-1 against GMACs and images/s against keep rate, from the runs' summary.json files
    python -m clca_jax.visualize sweep --workdir=runs/sweep --out=plots
    # per-block gradient norms over the steps, runs side by side (train.log_gradient_norms=True)
    python -m clca_jax.visualize gradients --workdir=runs/evit_clca,runs/evit --out=grads.png

A workdir is a training workdir (`clca_jax.main --workdir`) or a converted model directory
(`clca-convert --out`, which has no data, so it needs --image).

How patches are followed: every reduction stage reports in `aux['kept']` what it did to the
sequence entering it (see `clca_jax.models.reduction`). Its method's `destinations` turns that into
the output slot of every input token (-1: dropped), and `patch_slots` composes the stages, so
each patch knows which token holds it after every stage. Tokens that are not patches (class,
CLR, EViT's fused and the cache's recovered tokens) have no patch, so they never show.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import sys
from collections.abc import Sequence

import jax
import matplotlib
import matplotlib.ticker
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from clca_jax import data, evaluate, pretrained, user_errors
from clca_jax.data import pipeline, records
from clca_jax.models import create_model
from clca_jax.models.config import clca_in_use
from clca_jax.models.reduction import METHODS
from clca_jax.models.vit import Attention
from clca_jax.training import evaluation, sharding, workdirs
from clca_jax.training import metrics as metrics_lib

DIMMED = 0.3  # share of the image left in a dropped patch, blended with DROPPED_COLOR
DROPPED_COLOR = np.asarray([0.35, 0.35, 0.45], np.float32)
SUMMARY_FILE = evaluation.SUMMARY_FILE
ACCURACY_PNG = "accuracy_vs_gmacs.png"
THROUGHPUT_PNG = "images_per_second_vs_keep_rate.png"


# ----------------------------------------------------------------------------------------------
# Following patches through the reduction stages.


def active_stages(model) -> list:
    """The reduction stages the model runs at evaluation, in block order (one per `kept`)."""
    blocks = model.token_schedule(train=False).blocks
    return [plan.stage for plan in blocks if plan.stage is not None and plan.stage.plan.active]


def stage_destinations(method: str, stage, kept: np.ndarray) -> np.ndarray:
    """The output slot of every token entering a reduction stage (see `Method.destinations`).

    Args:
      method: the model's `reduction.method`.
      stage: the stage (`clca_jax.models.reduction.Stage`) from the token schedule.
      kept: that stage's `aux['kept']` entry, from an evaluation forward pass.

    Returns:
      int [B, stage.tokens_in]: the slot in the stage's output sequence of each input token,
      -1 where the token was dropped.
    """
    reducing = [name for name, cls in METHODS.items() if cls.reduces]
    if method not in reducing:
        raise ValueError(f"no token map for reduction.method={method!r}; known: {reducing}")
    return METHODS[method].destinations(stage, kept)


def patch_slots(model, kept: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Which token holds each patch after every reduction stage.

    Args:
      model: the `VisionTransformer` that produced `kept`.
      kept: `aux['kept']` of an evaluation forward pass.

    Returns:
      One int array [B, P] per stage: the patch's slot in the stage's output sequence (the
      class token is slot 0), or -1 when the patch was dropped.
    """
    stages = active_stages(model)
    if len(stages) != len(kept):
        raise ValueError(
            f"the model plans {len(stages)} reduction stages but aux['kept'] has {len(kept)}; "
            "pass the aux of an evaluation pass (train=False) of this model."
        )
    batch = np.asarray(kept[0]).shape[0] if kept else 1
    slots = np.broadcast_to(1 + np.arange(model.num_patches), (batch, model.num_patches))
    result = []
    for stage, stage_kept in zip(stages, kept, strict=True):
        dest = model.method.destinations(stage, stage_kept)
        moved = np.take_along_axis(dest, np.maximum(slots, 0), axis=1)
        slots = np.where(slots >= 0, moved, -1)
        result.append(slots)
    return result


def slots_before_block(model, slots: Sequence[np.ndarray], block: int) -> np.ndarray:
    """Each patch's slot in the sequence that block `block`'s attention sees, [B, P]."""
    placement = model.method.placement
    current = np.broadcast_to(1 + np.arange(model.num_patches), (1, model.num_patches))
    for stage, stage_slots in zip(active_stages(model), slots, strict=True):
        if stage.block < block or (stage.block == block and placement == "before"):
            current = stage_slots
    return current


# ----------------------------------------------------------------------------------------------
# Images and forward passes.


def preprocess(record: records.ImageRecord, img_size: int) -> np.ndarray:
    """The evaluation view of an image as the model sees it: uint8 [S, S, 3]."""
    pixels = pipeline.resize_square(records.decode_rgb(record), pipeline.resize_size(img_size))
    return pipeline.center_crop(pixels, img_size)


def image_file(path: str, img_size: int) -> np.ndarray:
    """An image file, resized and centre-cropped as in evaluation; uint8 [S, S, 3]."""
    with open(path, "rb") as f:
        return preprocess(records.ImageRecord(f.read(), -1, path), img_size)


def dataset_image(data_config: ml_collections.ConfigDict, index: int, img_size: int):
    """Example `index` of the evaluation split of `data_config`; (uint8 [S, S, 3], label)."""
    split = data.load_data(data_config).eval
    if not 0 <= index < len(split):
        raise IndexError(f"--index={index} is outside the evaluation split (0..{len(split) - 1}).")
    record = split[index]
    return preprocess(record, img_size), int(record.label)


def model_input(pixels: np.ndarray, model) -> np.ndarray:
    """uint8 [S, S, 3] -> the normalised float32 batch [1, S, S, 3] the training loaders make
    for `model` (its `model.normalization`)."""
    normalize = pipeline.Normalizer(*model.input_normalization)
    return normalize(pixels)[None]


def _attention_filter(block: int | None):
    def keep(module, method_name: str) -> bool:
        return (
            block is not None
            and isinstance(module, Attention)
            and method_name == "__call__"
            and module.scope.path[:1] == (f"blocks_{block}",)
        )

    return keep


@functools.lru_cache(maxsize=16)
def _compiled_forward(model, attention_block: int | None):
    """The jitted evaluation pass of a model, compiled once per model and captured block."""
    return jax.jit(
        functools.partial(
            model.apply,
            train=False,
            capture_intermediates=_attention_filter(attention_block),
            mutable=["intermediates"],
        )
    )


def forward(model, variables: dict, pixels: np.ndarray, attention_block: int | None = None):
    """One evaluation pass on one image.

    Args:
      model: a `VisionTransformer`.
      variables: its variables.
      pixels: uint8 [S, S, 3] (see `image_file`, `dataset_image`).
      attention_block: also return this block's attention probabilities.

    Returns:
      (logits [C], kept: the `aux['kept']` arrays, the class token's attention float32
      [heads, N] or None).
    """
    (logits, aux), state = _compiled_forward(model, attention_block)(
        variables, model_input(pixels, model)
    )
    probs = None
    if attention_block is not None:
        captured = state["intermediates"][f"blocks_{attention_block}"]["attn"]["__call__"]
        probs = np.asarray(captured[0][1].cls_probs[0])
    return np.asarray(logits[0]), [np.asarray(k) for k in aux["kept"]], probs


# ----------------------------------------------------------------------------------------------
# Kept-token maps.


@dataclasses.dataclass(frozen=True)
class KeptTokens:
    """What one model did to the patches of one image.

    Attributes:
      label: the row title (method, keep rate).
      pixels: the image as the model saw it, uint8 [S, S, 3].
      grid: patches per side.
      blocks: the block of every reduction stage.
      slots: per stage, int [P]: the token holding each patch, -1 when dropped.
      tokens_out: per stage, the sequence length after it.
      merging: the method merges tokens (patches are coloured by their token).
    """

    label: str
    pixels: np.ndarray
    grid: int
    blocks: tuple[int, ...]
    slots: tuple[np.ndarray, ...]
    tokens_out: tuple[int, ...]
    merging: bool


def keep_rate_text(keep_rate) -> str:
    """`0.5`, or `(0.7, 0.5, 0.3)` for a per-stage list (ratios or token counts)."""
    if isinstance(keep_rate, (list, tuple)):
        return "(" + ", ".join(f"{value:g}" for value in keep_rate) + ")"
    return f"{keep_rate:g}"


def model_label(model) -> str:
    """`evit kr=0.5 + CLCA` style description of a model's reduction setting."""
    reduction = model.reduction
    label = reduction.method if model.method.reduces else "no reduction"
    if model.method.reduces:
        label += f" kr={keep_rate_text(reduction.keep_rate)}"
    if clca_in_use(model.clca):
        label += " + CLCA"
    return label


def kept_tokens(model, variables: dict, pixels: np.ndarray, label: str | None = None):
    """Runs the model on one image and follows its patches through the stages (`KeptTokens`)."""
    _, kept, _ = forward(model, variables, pixels)
    stages = active_stages(model)
    return KeptTokens(
        label=label or model_label(model),
        pixels=np.asarray(pixels),
        grid=model.grid,
        blocks=tuple(stage.block for stage in stages),
        slots=tuple(s[0] for s in patch_slots(model, kept)),
        tokens_out=tuple(stage.plan.tokens_out for stage in stages),
        merging=model.method.merges,
    )


def upsample(grid_values: np.ndarray, size: int) -> np.ndarray:
    """[g, g, ...] per-patch values -> [size, size, ...], each patch a square block."""
    patch = size // grid_values.shape[0]
    return np.repeat(np.repeat(grid_values, patch, axis=0), patch, axis=1)


def slot_colors(slots: np.ndarray) -> np.ndarray:
    """A distinct, stable colour per token: float RGB [P, 3]."""
    # Golden-ratio steps around the hue circle keep neighbouring token ids apart.
    hues = np.mod(np.maximum(slots, 0) * 0.618033988749895, 1.0)
    return matplotlib.colormaps["hsv"](hues)[:, :3]


def kept_overlay(pixels: np.ndarray, slots: np.ndarray, grid: int, merging: bool) -> np.ndarray:
    """The image with dropped patches dimmed and, for merging methods, patches tinted by the
    token they went to; float RGB [S, S, 3] in 0..1."""
    image = pixels.astype(np.float32) / 255.0
    dropped = upsample((slots < 0).reshape(grid, grid), image.shape[0])[..., None]
    if merging:
        tint = upsample(slot_colors(slots).reshape(grid, grid, 3), image.shape[0])
        image = 0.45 * image + 0.55 * tint
    return np.where(dropped, DIMMED * image + (1 - DIMMED) * DROPPED_COLOR, image)


def draw_patch_grid(ax, grid: int, size: int) -> None:
    """Thin lines between the patches."""
    for edge in np.arange(1, grid) * (size / grid) - 0.5:
        ax.axhline(edge, color="white", linewidth=0.4, alpha=0.5)
        ax.axvline(edge, color="white", linewidth=0.4, alpha=0.5)


def stage_title(block: int, slots: np.ndarray, tokens_out: int, merging: bool) -> str:
    if merging:
        return f"block {block}: {slots.size} patches -> {len(np.unique(slots[slots >= 0]))} tokens"
    return f"block {block}: {int(np.sum(slots >= 0))}/{slots.size} patches ({tokens_out} tokens)"


def plot_kept_tokens(rows: Sequence[KeptTokens]) -> Figure:
    """One row per model: the image, then the patches left after each reduction stage."""
    columns = 1 + max(len(row.blocks) for row in rows)
    figure = Figure(figsize=(2.4 * columns, 2.6 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axes_row, row in zip(axes, rows, strict=True):
        axes_row[0].imshow(row.pixels)
        axes_row[0].set_title(row.label, fontsize=9)
        for ax, block, slots, tokens_out in zip(
            axes_row[1:], row.blocks, row.slots, row.tokens_out, strict=False
        ):
            ax.imshow(kept_overlay(row.pixels, slots, row.grid, row.merging))
            draw_patch_grid(ax, row.grid, row.pixels.shape[0])
            ax.set_title(stage_title(block, slots, tokens_out, row.merging), fontsize=8)
        for ax in axes_row:
            ax.set_axis_off()
    figure.legend(handles=kept_legend(any(row.merging for row in rows)), loc="outside lower center",
                  ncols=2, fontsize=8, frameon=False)  # fmt: skip
    return figure


def kept_legend(merging: bool) -> list:
    """What the colours of `plot_kept_tokens` mean."""
    from matplotlib.patches import Patch

    handles = [Patch(color=DIMMED * 0.5 + (1 - DIMMED) * DROPPED_COLOR, label="dimmed: dropped")]
    if merging:
        handles.append(Patch(color=slot_colors(np.asarray([1]))[0], label="tint: merged token"))
    else:
        handles.append(Patch(facecolor="white", edgecolor="grey", label="as is: kept"))
    return handles


def figure_pixels(figure: Figure, dpi: int = 100) -> np.ndarray:
    """The figure rendered as uint8 RGB [H, W, 3] (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def kept_tokens_pixels(model, variables: dict, data_config, index: int = 0) -> np.ndarray:
    """`plot_kept_tokens` of example `index` of the evaluation split, as RGB pixels."""
    pixels = dataset_image(data_config, index, model.img_size)[0]
    return figure_pixels(plot_kept_tokens([kept_tokens(model, variables, pixels)]))


# ----------------------------------------------------------------------------------------------
# Class-token attention.


def cls_attention_map(model, variables: dict, pixels: np.ndarray, block: int | None = None):
    """Head-mean attention of the class token to every patch in a block.

    A patch inside a merged token gets that token's attention; a dropped patch gets NaN.

    Args:
      model: a `VisionTransformer`.
      variables: its variables.
      pixels: uint8 [S, S, 3].
      block: the block (default: the last).

    Returns:
      float32 [g, g] over the patch grid.
    """
    depth = model.backbone.depth
    block = depth - 1 if block is None else block
    if not 0 <= block < depth:
        raise ValueError(f"block={block} is outside the model's blocks 0..{depth - 1}.")
    _, kept, probs = forward(model, variables, pixels, attention_block=block)
    # Class-token query, head mean; the register tokens are left out like the reductions do.
    row = np.delete(probs.mean(axis=0), np.s_[1 : 1 + model.backbone.reg_tokens])
    slots = slots_before_block(model, patch_slots(model, kept), block)[0]
    values = np.where(slots >= 0, row[np.maximum(slots, 0)], np.nan)
    return values.reshape(model.grid, model.grid).astype(np.float32)


def plot_cls_attention(pixels: np.ndarray, attention: np.ndarray, title: str = "") -> Figure:
    """The image beside the class-token attention drawn over it (dropped patches greyed)."""
    figure = Figure(figsize=(5.2, 2.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(pixels)
    left.set_title("input", fontsize=9)
    grid = attention.shape[0]
    dropped = np.where(np.isnan(attention.reshape(-1)), -1, 0)
    right.imshow(kept_overlay(pixels, dropped, grid, merging=False))
    heat = np.ma.masked_invalid(upsample(attention, pixels.shape[0]))
    shown = right.imshow(heat, cmap="inferno", alpha=0.6)
    draw_patch_grid(right, grid, pixels.shape[0])
    right.set_title(title or "CLS attention", fontsize=9)
    bar = figure.colorbar(shown, ax=right, shrink=0.8)
    bar.set_label("CLS attention (head mean)", fontsize=8)
    for ax in (left, right):
        ax.set_axis_off()
    return figure


# ----------------------------------------------------------------------------------------------
# Sweeps: summary.json of many runs.


def find_summaries(paths: Sequence[str]) -> list[str]:
    """The summary.json files of run directories, or of the runs directly inside a folder."""
    found = []
    for path in paths:
        own = os.path.join(path, SUMMARY_FILE)
        if os.path.isfile(own):
            found.append(own)
            continue
        inside = sorted(glob.glob(os.path.join(path, "*", SUMMARY_FILE)))
        if not inside:
            raise FileNotFoundError(
                f"no {SUMMARY_FILE} in {path} or its sub-folders; pass the workdirs of "
                "finished runs (python -m clca_jax.main writes it at the end)."
            )
        found.extend(inside)
    return found


def load_summaries(paths: Sequence[str]) -> list[dict]:
    """The summaries of runs (see `find_summaries`), each with its `workdir` added."""
    summaries = []
    for path in find_summaries(paths):
        try:
            with open(path) as f:
                summary = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not a valid summary.json ({error}); the run's summary is damaged: "
                "evaluate the run again or leave it out."
            ) from error
        summary["workdir"] = os.path.dirname(path)
        summaries.append(summary)
    return summaries


def summary_setting(summary: dict) -> tuple[str, float]:
    """(series label, keep rate) of a run: runs differing only in keep rate share a label; a
    run without reduction has keep rate 1 whatever its config says."""
    model = summary["config"]["model"]
    reduction = model["reduction"]
    method = METHODS.get(reduction["method"])
    reduces = method is None or method.reduces  # a method registered in another program
    label = reduction["method"] if reduces else "no reduction"
    if clca_in_use(ml_collections.ConfigDict(model["clca"])):
        label += " + CLCA"
    keep_rate = reduction["keep_rate"] if reduces else 1.0
    if isinstance(keep_rate, (list, tuple)):
        # A per-stage list has no place on a keep-rate axis: its own series, unannotated.
        return f"{model['backbone']}: {label} kr={keep_rate_text(keep_rate)}", float("nan")
    return f"{model['backbone']}: {label}", float(keep_rate)


def series(summaries: Sequence[dict], x_key: str, y_key: str) -> dict[str, list]:
    """Points (x, y, keep rate) per setting label, sorted by x."""
    grouped: dict[str, list] = {}
    for summary in summaries:
        label, keep_rate = summary_setting(summary)
        x = keep_rate if x_key == "keep_rate" else summary[x_key]
        grouped.setdefault(label, []).append((x, summary[y_key], keep_rate))
    return {label: sorted(points) for label, points in sorted(grouped.items())}


def _plot_series(grouped: dict, xlabel: str, ylabel: str, annotate: bool) -> Figure:
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    for label, points in grouped.items():
        xs, ys, keep_rates = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
        if annotate:
            for x, y, keep_rate in points:
                if keep_rate == 1 or np.isnan(keep_rate):  # no reduction, or a per-stage list
                    continue
                ax.annotate(f"{keep_rate:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def plot_accuracy_vs_gmacs(summaries: Sequence[dict]) -> Figure:
    """Top-1 against GMACs per image, one line per method (points labelled by keep rate)."""
    figure = _plot_series(
        series(summaries, "gmacs", "top1"), "GMACs per image", "top-1 (%)", annotate=True
    )
    ax = figure.axes[0]
    ax.set_title("accuracy vs compute")
    # Small models cost a few hundredths of a GMAC: ticks with enough significant digits.
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))
    return figure


def plot_throughput_vs_keep_rate(summaries: Sequence[dict]) -> Figure:
    """Evaluation images/s against keep rate, one line per method."""
    grouped = series(summaries, "keep_rate", "images_per_second")
    figure = _plot_series(grouped, "keep rate", "images / s (evaluation)", annotate=False)
    figure.axes[0].set_title("throughput vs keep rate")
    return figure


def save_figure(figure: Figure, path: str, dpi: int = 100) -> str:
    """Writes `figure` as a PNG (folders created) beside `path` and renames it onto `path`, so
    a killed or failed save leaves no half-written picture; returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; name the picture file to write.")
    partial = os.path.join(folder, f".{os.path.basename(path)}.partial")
    try:
        figure.savefig(partial, dpi=dpi, format="png")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def save_sweep_plots(paths: Sequence[str], out_dir: str) -> list[str]:
    """accuracy_vs_gmacs.png and images_per_second_vs_keep_rate.png of the runs in `paths`."""
    summaries = load_summaries(paths)
    return [
        save_figure(plot_accuracy_vs_gmacs(summaries), os.path.join(out_dir, ACCURACY_PNG)),
        save_figure(plot_throughput_vs_keep_rate(summaries), os.path.join(out_dir, THROUGHPUT_PNG)),
    ]


# ----------------------------------------------------------------------------------------------
# Gradient norms of runs (`train.log_gradient_norms`), from their TensorBoard files.


def read_gradient_norms(workdir: str) -> dict[str, dict[int, float]]:
    """Part name -> {step: averaged gradient norm} of a run; a step logged twice (a resumed
    run repeats the steps after its checkpoint) keeps the later value.

    Raises:
      ValueError: the run logged no gradient norms.
    """
    norms: dict[str, dict[int, float]] = {}
    for event in metrics_lib.read_events(os.path.join(workdir, "tensorboard")):
        for value in event.summary.value:
            if value.tag.startswith(metrics_lib.GRAD_NORM_PREFIX) and value.HasField(
                "simple_value"
            ):
                part = value.tag[len(metrics_lib.GRAD_NORM_PREFIX) :]
                norms.setdefault(part, {})[event.step] = value.simple_value
    if not norms:
        raise ValueError(
            f"{workdir} has no gradient norms in its TensorBoard files; train it with "
            "--config.train.log_gradient_norms=True to log them."
        )
    return norms


def part_order(part: str) -> tuple:
    """Input side first: the embedding, the blocks by index, the cache, the heads, the
    global norm last."""
    if part.startswith("blocks_") and part[len("blocks_") :].isdigit():
        return (1, int(part[len("blocks_") :]), part)
    if part == metrics_lib.GLOBAL_NORM:
        return (3, 0, part)
    first = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")
    return (0, first.index(part), part) if part in first else (2, 0, part)


def run_title(workdir: str) -> str:
    """The run's folder name and its reduction setting (from its saved config)."""
    name = os.path.basename(os.path.normpath(workdir))
    try:
        config = workdirs.read_run_config(workdir)
    except (FileNotFoundError, ValueError):
        return name
    return f"{name}: {model_label(create_model(config.model))}"


def plot_gradient_norms(runs: Sequence[tuple[str, dict]]) -> Figure:
    """One column per run: each part's gradient norm over the steps (log scale), and below it
    each part's mean over the logged steps as bars; the axes of a row are shared."""
    figure = Figure(figsize=(5.5 * len(runs) + 2.0, 7.0), layout="constrained")
    axes = figure.subplots(2, len(runs), squeeze=False, sharey="row")
    colors = matplotlib.colormaps["viridis"]
    for column, (title, norms) in enumerate(runs):
        parts = sorted(norms, key=part_order)
        lines, bars = axes[0, column], axes[1, column]
        for index, part in enumerate(parts):
            steps = sorted(norms[part])
            color = "black" if part == metrics_lib.GLOBAL_NORM else colors(index / len(parts))
            lines.plot(steps, [norms[part][s] for s in steps], label=part, color=color)
        means = [np.mean(list(norms[part].values())) for part in parts]
        bars.bar(range(len(parts)), means, color=[line.get_color() for line in lines.lines])
        bars.set_xticks(range(len(parts)), parts, rotation=60, ha="right", fontsize=8)
        lines.set_yscale("log")
        lines.set_title(title)
        lines.set_xlabel("train step")
        lines.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        bars.set_xlabel("parameters")
        lines.grid(alpha=0.3)
        bars.grid(alpha=0.3, axis="y")
        lines.legend(fontsize=7, ncol=2)
    axes[0, 0].set_ylabel("gradient L2 norm (mean per report)")
    axes[1, 0].set_ylabel("gradient L2 norm (mean over steps)")
    return figure


# ----------------------------------------------------------------------------------------------
# Loading runs and the command line.


def load_run(directory: str, which: str = "latest"):
    """A trained workdir or a converted model directory, ready to apply.

    Args:
      directory: a `clca_jax.main` workdir or a `clca-convert` output.
      which: `latest` or `best` checkpoint of a workdir.

    Returns:
      (model, variables, config): `config` is the run's training config, or None for a
      converted model (it has no data section).
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    if pretrained.is_converted_model(directory):
        model, variables = pretrained.load_pretrained(directory)
        return model, variables, None
    config = workdirs.read_run_config(directory)
    model = create_model(config.model)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    variables, _ = evaluate.load_variables(directory, which, model, mesh)
    return model, variables, config


def run_image(model, config, image: str | None, index: int | None) -> np.ndarray:
    """The picture to draw on: `image` (a file) or example `index` of the run's eval split."""
    if image:
        return image_file(image, model.img_size)
    if config is None:
        raise ValueError("a converted model directory has no data; pass --image=FILE.")
    return dataset_image(config.data, index or 0, model.img_size)[0]


def _kept_command(args) -> list[str]:
    rows = []
    for directory in args.workdir.split(","):
        model, variables, config = load_run(directory, args.checkpoint)
        pixels = run_image(model, config, args.image, args.index)
        rows.append(kept_tokens(model, variables, pixels))
    return [save_figure(plot_kept_tokens(rows), args.out, args.dpi)]


def _attention_command(args) -> list[str]:
    model, variables, config = load_run(args.workdir, args.checkpoint)
    pixels = run_image(model, config, args.image, args.index)
    block = model.backbone.depth - 1 if args.block is None else args.block
    attention = cls_attention_map(model, variables, pixels, block)
    title = f"{model_label(model)}: CLS attention, block {block}"
    return [save_figure(plot_cls_attention(pixels, attention, title), args.out, args.dpi)]


def _sweep_command(args) -> list[str]:
    return save_sweep_plots(args.workdir, args.out)


def _gradients_command(args) -> list[str]:
    directories = args.workdir.split(",")
    runs = [(run_title(d), read_gradient_norms(d)) for d in directories]
    return [save_figure(plot_gradient_norms(runs), args.out, args.dpi)]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clca-visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, workdir_help in (
        (
            "kept",
            "patches kept or merged at each reduction block, one row per workdir",
            "runs or converted model directories, comma-separated: one row each",
        ),
        (
            "attention",
            "class-token attention of one block over the image",
            "a run or a converted model directory",
        ),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--workdir", required=True, help=workdir_help)
        sub.add_argument("--image", help="image file; default: --index of the eval split")
        sub.add_argument("--index", type=int, default=0, help="eval-split example")
        sub.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
        sub.add_argument("--out", required=True, help="PNG file to write")
        sub.add_argument("--dpi", type=int, default=100)
    commands.choices["attention"].add_argument("--block", type=int, help="default: last block")
    sweep_help = "accuracy vs GMACs and images/s vs keep rate"
    sweep = commands.add_parser("sweep", help=sweep_help, description=sweep_help)
    sweep.add_argument("--workdir", nargs="+", required=True, help="runs, or folders of runs")
    sweep.add_argument("--out", required=True, help="folder for the two PNG files")
    gradients_help = "per-block gradient norms over the steps, one column per run"
    gradients = commands.add_parser("gradients", help=gradients_help, description=gradients_help)
    gradients.add_argument(
        "--workdir",
        required=True,
        help="runs trained with train.log_gradient_norms=True, comma-separated",
    )
    gradients.add_argument("--out", required=True, help="PNG file to write")
    gradients.add_argument("--dpi", type=int, default=100)
    for sub in commands.choices.values():
        sub.add_argument("--overwrite", action="store_true", help="replace existing PNG files")
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


COMMANDS = {
    "kept": _kept_command,
    "attention": _attention_command,
    "sweep": _sweep_command,
    "gradients": _gradients_command,
}


def outputs(args) -> list[str]:
    """The files the command will write."""
    if args.command == "sweep":
        return [os.path.join(args.out, name) for name in (ACCURACY_PNG, THROUGHPUT_PNG)]
    return [args.out]


def check_outputs(args) -> None:
    """Refuses to replace an existing file without --overwrite (before any work)."""
    existing = [path for path in outputs(args) if os.path.exists(path)]
    if existing and not args.overwrite:
        raise ValueError(
            f"{', '.join(existing)} already exists; nothing was written. Choose another --out "
            "or pass --overwrite to replace it."
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        check_outputs(args)
        written = COMMANDS[args.command](args)
    except (OSError, ValueError, IndexError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return user_errors.EXIT_CODE
    for path in written:
        print(path)
    return 0


def cli() -> None:
    """`python -m clca_jax.visualize`, the `clca-visualize` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
