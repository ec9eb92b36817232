"""The demo: what token reduction costs in accuracy and what CLCA wins back, in minutes on a CPU.

    python -m clca_jax.demo --workdir=runs/demo
    python -m clca_jax.demo --workdir=runs/demo --config.train.epochs=1   # a quicker look

Trains the `demo` config (a small ViT on the animal silhouettes with EViT at keep rate 0.1 plus
CLCA) and the same model twice more: with EViT but without CLCA, and with neither. Each run is
a `clca_jax.main` run of its own in `WORKDIR/<variant>` (rerunning resumes or, once finished,
only evaluates), trained from the same seed on the same batches. At the end it prints a table
of test top-1, GMACs and images/s of the three, writes it to `WORKDIR/comparison.md`, and draws
the patches each reduction block kept on a test image (`WORKDIR/kept_tokens.png`).

`--config` (default `demo`) takes a shipped config's name or a file and `--config.FIELD=VALUE`
overrides, applied to all three runs; the variants then change only the reduction and CLCA
fields (`clca_jax/configs/demo.py`: `without_clca`, `without_reduction`).
"""

from __future__ import annotations

import os

import ml_collections
from absl import app, flags, logging

from clca_jax import commands, config_files, train, user_errors, visualize
from clca_jax.configs import demo as demo_config
from clca_jax.training import workdirs
from clca_jax.training.config import parse_flags

COMPARISON_FILE = "comparison.md"
PICTURE_FILE = "kept_tokens.png"
# (sub-folder, label, how the config is changed)
RUNS = (
    ("clca", "EViT + CLCA", None),
    ("reduction_only", "EViT only", demo_config.without_clca),
    ("no_reduction", "no reduction", demo_config.without_reduction),
)
COLUMNS = ("model", "test top-1 %", "GMACs", "images/s")


def run_configs(config: ml_collections.ConfigDict) -> list[tuple[str, str, object]]:
    """(sub-folder, label, config) of the three runs."""
    configs = []
    for folder, label, change in RUNS:
        variant = ml_collections.ConfigDict(config.to_dict())
        if change is not None:
            change(variant)
        configs.append((folder, label, variant))
    return configs


def comparison_rows(summaries: list[tuple[str, dict]]) -> list[tuple[str, ...]]:
    """The table's rows: label, top-1 (%), GMACs and evaluation images/s of each run."""
    return [
        (
            label,
            f"{summary['top1']:.2f}",
            f"{summary['gmacs']:.4f}",
            f"{summary['images_per_second']:.0f}",
        )
        for label, summary in summaries
    ]


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table with padded columns (readable as plain text too)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    lines = [columns, tuple("-" * width for width in widths), *rows]
    cells = (zip(line, widths, strict=True) for line in lines)
    return "\n".join("| " + " | ".join(f"{c:<{w}}" for c, w in line) + " |" for line in cells)


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains and evaluates the three runs in `workdir`; returns the comparison table."""
    workdir = workdirs.check_workdir_name(workdir)  # an empty name would mean this folder
    summaries, folders = [], []
    configs = run_configs(config)
    for index, (folder, label, variant) in enumerate(configs, start=1):
        logging.info("Run %d of %d: %s in %s", index, len(configs), label, folder)
        run_dir = os.path.join(workdir, folder)
        summaries.append((label, train.train_and_evaluate(variant, run_dir)))
        folders.append(run_dir)
    table = markdown_table(COLUMNS, comparison_rows(summaries))
    with open(os.path.join(workdir, COMPARISON_FILE), "w") as f:
        f.write(table + "\n")
    reducing = [d for d, (_, _, c) in zip(folders, configs, strict=True) if _reduces(c)]
    draw_kept_tokens(reducing, workdir)
    return table


def _reduces(config: ml_collections.ConfigDict) -> bool:
    return config.model.reduction.method != demo_config.NO_REDUCTION


def draw_kept_tokens(run_dirs: list[str], workdir: str) -> str:
    """The patches each reduction block kept on the first test image, one row per run."""
    rows = []
    for run_dir in run_dirs:
        model, variables, config = visualize.load_run(run_dir, "latest")
        pixels = visualize.run_image(model, config, None, 0)
        rows.append(visualize.kept_tokens(model, variables, pixels))
    path = os.path.join(workdir, PICTURE_FILE)
    return visualize.save_figure(visualize.plot_kept_tokens(rows), path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    with user_errors.reported(FLAGS.debug):
        table = run_demo(FLAGS.config, FLAGS.workdir)
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    print(table)
    print(
        f"\n(also in {os.path.join(workdir, COMPARISON_FILE)}; the kept tokens are drawn in "
        f"{os.path.join(workdir, PICTURE_FILE)})"
    )


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    config_files.DEFINE_config(
        "config",
        "demo",
        "Config of the EViT + CLCA run (name or file); the two others are derived from it.",
    )
    flags.DEFINE_string("workdir", None, "Folder of the three runs and the comparison.")
    flags.mark_flags_as_required(["workdir"])
    flags.DEFINE_bool("debug", False, "Show the traceback of a configuration or data error.")


def cli() -> None:
    """`python -m clca_jax.demo`, the `clca-demo` command."""
    define_flags()
    commands.run(main, flags_parser=parse_flags, doc=__doc__, config_help=True)


if __name__ == "__main__":
    cli()
