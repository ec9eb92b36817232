"""Token schedule and compute cost of a model, in the paper's convention and XLA's.

MACs follow the reference's counter (spec 8): torchprofile on a batch-1 input, reported as
"GFLOPs" = MACs / 1e9 with no factor 2. It counts matmuls and linear layers (M*K*N),
convolutions (output elements x input channels per group x kernel), element-wise multiplies
(q scaling, LayerScale, EViT's weighting, ToMe's size weighting), LayerNorm / BatchNorm
(output elements) and means (output elements); adds, softmax, GELU, gathers, sorts and sums are
free. The paper counted ATS models with thop, which skips the attention matmuls; here every
method uses the torchprofile rules, and ATS lengths are the schedule's upper bounds.

    python -m clca_jax.flops --config=soyglobal [--config.model.field=value] [--json]
    python -m clca_jax.flops --workdir=runs/soyglobal     # the model of a run, or of a
                                                          # converted model directory
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from clca_jax import pretrained
from clca_jax.models import VisionTransformer, create_model
from clca_jax.models.schedule import TokenSchedule


@dataclasses.dataclass(frozen=True)
class CostReport:
    """MACs of one model in evaluation mode.

    Attributes:
      schedule: the token schedule (evaluation mode).
      block_macs: MACs of each block, its reduction step included.
      total_macs: everything: embedding, blocks, cache, head.
    """

    schedule: TokenSchedule
    block_macs: tuple[int, ...]
    total_macs: int

    @property
    def gmacs(self) -> float:
        return self.total_macs / 1e9


def attention_macs(tokens: int, width: int, layer_scale: bool) -> int:
    """LN1 + qkv + q scaling + q k^T + attn v + projection (+ LayerScale)."""
    macs = tokens * width + 3 * tokens * width**2 + tokens * width
    macs += 2 * tokens**2 * width + tokens * width**2
    return macs + (tokens * width if layer_scale else 0)


def mlp_macs(tokens: int, width: int, hidden: int, layer_scale: bool) -> int:
    """LN2 + fc1 + fc2 (+ LayerScale)."""
    macs = tokens * width + 2 * tokens * width * hidden
    return macs + (tokens * width if layer_scale else 0)


def reduction_macs(model: VisionTransformer, stage) -> int:
    """MACs of a reduction step itself, as its method declares them (0 for none or inactive)."""
    if stage is None or not stage.plan.active:
        return 0
    return model.method.macs(stage, model.backbone.embed_dim, model.backbone.num_heads)


def head_macs(model: VisionTransformer, last_tokens: int) -> int:
    width, classes = model.backbone.embed_dim, model.num_classes
    depths = len(model.reduction.locations) + 1
    head = model.clca.head
    if head == "cla":
        kernels = model.clca.kernels_per_channel
        return (
            depths * width + kernels * width * depths + kernels * width + classes * kernels * width
        )
    if head == "ifa":
        return width * depths + width + width * classes
    return last_tokens * width + width * classes  # final LayerNorm on every token + linear head


def count_macs(model: VisionTransformer) -> CostReport:
    """MACs of one image through the model in evaluation mode (spec 8 convention)."""
    backbone = model.backbone
    schedule = model.token_schedule(train=False)
    width = backbone.embed_dim
    hidden = int(width * backbone.mlp_ratio)
    layer_scale = backbone.layer_scale is not None
    first = schedule.blocks[0]
    total = schedule.num_patches * width * 3 * backbone.patch_size**2
    if backbone.pre_norm:
        total += first.attn_tokens * width
    block_macs = []
    for plan in schedule.blocks:
        macs = reduction_macs(model, plan.stage)
        macs += attention_macs(plan.attn_tokens, width, layer_scale)
        macs += mlp_macs(plan.mlp_tokens, width, hidden, layer_scale)
        if plan.cached and model.clca.include_gap:
            macs += width  # the GAP token's mean
        block_macs.append(macs)
    total += sum(block_macs) + head_macs(model, schedule.tokens_out)
    return CostReport(schedule, tuple(block_macs), total)


def xla_flops(model: VisionTransformer) -> float | None:
    """XLA's FLOP count of the compiled batch-1 evaluation forward (None if unavailable)."""
    images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jax.numpy.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x)[0])
    analysis = forward.lower(model.abstract_variables(), images).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None else None


def report_dict(model: VisionTransformer, with_xla: bool = True) -> dict:
    """The JSON form: `gmacs`, `blocks` (attention / MLP tokens per block) and XLA's count.

    `model` may come from `create_model(config, check_cache=False)`: a model that cannot run
    still gets its table, with a warning instead of XLA's count.
    """
    cost = count_macs(model)
    result = {
        "gmacs": cost.gmacs,
        "blocks": [
            {"attn_tokens": plan.attn_tokens, "mlp_tokens": plan.mlp_tokens}
            for plan in cost.schedule.blocks
        ],
        "block_gmacs": [macs / 1e9 for macs in cost.block_macs],
        "tokens_out": cost.schedule.tokens_out,
    }
    if cost.schedule.empty_gap_blocks:
        result["warning"] = (
            f"the cache's GAP token averages nothing after block "
            f"{cost.schedule.empty_gap_blocks[0]}; this model cannot be built"
        )
    elif with_xla:
        flops = xla_flops(model)
        result["xla_gflops"] = flops / 1e9 if flops is not None else None
    return result


def format_table(model_config: ml_collections.ConfigDict, result: dict) -> str:
    """The human-readable table of a `report_dict`; `model_config` names the model."""
    reduction = model_config.reduction
    lines = [
        f"{model_config.backbone} at {model_config.img_size}px, reduction {reduction.method} "
        f"(keep rate {reduction.keep_rate}, blocks {tuple(reduction.locations)}), "
        f"CLCA head {model_config.clca.head}, cache {'on' if model_config.clca.clc else 'off'}",
        f"{'block':>5} {'attn tokens':>12} {'mlp tokens':>11} {'GMACs':>8}",
    ]
    for index, (block, gmacs) in enumerate(
        zip(result["blocks"], result["block_gmacs"], strict=True)
    ):
        lines.append(
            f"{index:>5} {block['attn_tokens']:>12} {block['mlp_tokens']:>11} {gmacs:>8.3f}"
        )
    lines.append(f"total: {result['gmacs']:.2f} GMACs (torchprofile convention, batch 1)")
    if result.get("xla_gflops") is not None:
        lines.append(
            f"XLA: {result['xla_gflops']:.2f} GFLOPs = {result['xla_gflops'] / 2:.2f} G "
            "multiply-adds (counts every op, softmax and GELU included)"
        )
    if "warning" in result:
        lines.append("warning: " + result["warning"])
    return "\n".join(lines)


def directory_model_config(directory: str) -> ml_collections.ConfigDict:
    """The `model` section of a training workdir's saved config, or of a converted model
    directory (`clca-convert --out`)."""
    from clca_jax.training import workdirs

    directory = os.path.expanduser(directory)
    if pretrained.is_converted_model(directory):
        return pretrained.read_model_config(directory)
    return workdirs.read_run_config(directory).model


def main(argv) -> None:
    from absl import app, flags

    from clca_jax import user_errors

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    with user_errors.reported(flags.FLAGS.debug):
        if config is None and workdir is None:
            raise ValueError("give --config (a config's name or path) or --workdir (a run).")
        if config is not None and workdir is not None:
            raise ValueError("give --config or --workdir, not both.")
        model_config = config.model if config is not None else directory_model_config(workdir)
        model = create_model(model_config, check_cache=False)
        result = report_dict(model, with_xla=not flags.FLAGS.skip_xla)
    if flags.FLAGS.json:
        print(json.dumps(result))
    else:
        print(format_table(model_config, result))


def cli() -> None:
    """`python -m clca_jax.flops`, the `clca-flops` command."""
    from absl import flags

    from clca_jax import commands, config_files

    config_files.DEFINE_config("config", None, "Config name or file (its `model` section is used).")
    flags.DEFINE_string(
        "workdir", None, "Instead of --config: a training workdir or converted model directory."
    )
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.DEFINE_bool("skip_xla", False, "Do not compile the model for XLA's count.")
    flags.DEFINE_bool("debug", False, "Show the traceback of a config or workdir error.")
    commands.run(main, doc=__doc__, config_help=True)


if __name__ == "__main__":
    cli()
