"""Command line of `tools/convert_timm_weights.py` (also `python -m clca_jax.convert.cli`)."""

from __future__ import annotations

import argparse
import sys
import time

import ml_collections

from clca_jax.convert.timm import (
    ConversionError,
    convert_state_dict,
    is_openclip,
    load_state_dict,
    openclip_to_timm,
)
from clca_jax.models import default_model_config, get_backbone
from clca_jax.pretrained import save_pretrained


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a timm (or OpenCLIP) PyTorch checkpoint into a clca_jax model "
        "directory (orbax variables + config.json).",
    )
    parser.add_argument("--checkpoint", required=True, help=".pth/.pt/.bin/.safetensors file")
    parser.add_argument(
        "--model", required=True, help="timm name, e.g. vit_base_patch16_224.orig_in21k"
    )
    parser.add_argument("--out", required=True, help="output directory (must not exist yet)")
    parser.add_argument(
        "--img-size", type=int, default=None, help="target image size (default: the backbone's)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="head outputs (default: the checkpoint head's, else 1000)",
    )
    parser.add_argument(
        "--embed-dim", type=int, default=None, help="size override for non-standard checkpoints"
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="size override for non-standard checkpoints"
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="size override for non-standard checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly created parameters")
    parser.add_argument(
        "--verify", action="store_true", help="compare logits with the timm model (needs torch)"
    )
    return parser


def model_config_from_args(args: argparse.Namespace, state: dict) -> ml_collections.ConfigDict:
    """The target model config: CLI values, else the backbone's and the checkpoint's."""
    config = default_model_config()
    config.backbone = args.model
    config.img_size = args.img_size or get_backbone(args.model).img_size
    for field in ("embed_dim", "depth", "num_heads"):
        if getattr(args, field) is not None:
            config[field] = getattr(args, field)
    if args.num_classes is not None:
        config.num_classes = args.num_classes
    elif "head.weight" in state:
        config.num_classes = int(state["head.weight"].shape[0])
    else:
        config.num_classes = 1000
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        print(f"reading {args.checkpoint}", flush=True)
        state = load_state_dict(args.checkpoint)
        timm_state = openclip_to_timm(state) if is_openclip(state) else state
        config = model_config_from_args(args, timm_state)
        print(
            f"converting to {config.backbone} at {config.img_size}px, {config.num_classes} classes",
            flush=True,
        )
        variables, report = convert_state_dict(state, config, seed=args.seed)
        print(report.summary())
        save_pretrained(args.out, variables, config, notes=report.summary())
        print(f"wrote {args.out} in {time.time() - start:.1f}s")
        if args.verify:
            from clca_jax.convert.verify import compare_with_timm

            diff = compare_with_timm(timm_state, variables, config)
            print(f"verify: max |logits - timm logits| = {diff:.3g}")
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
