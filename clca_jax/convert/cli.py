"""Command line of the converter: `clca-convert`, `python -m clca_jax.convert.cli` or, from a
checkout, `python tools/convert_timm_weights.py`."""

from __future__ import annotations

import argparse
import sys
import time

import ml_collections

from clca_jax import config_files, normalization
from clca_jax.convert.timm import (
    ConversionError,
    convert_state_dict,
    is_openclip,
    load_state_dict,
    openclip_to_timm,
)
from clca_jax.models import default_model_config, get_backbone
from clca_jax.models.config import NO_HEAD
from clca_jax.pretrained import check_output_dir, save_pretrained


def _add_argument(parser: argparse.ArgumentParser, flag: str, **options) -> None:
    """`--flag_name`, the one spelling of every command's flags, and `--flag-name`, the
    spelling of earlier versions, accepted but not shown."""
    parser.add_argument(flag, **options)
    hidden = {**options, "help": argparse.SUPPRESS, "dest": flag[2:]}
    parser.add_argument(flag.replace("_", "-"), **hidden)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clca-convert",
        description="Convert a timm (or OpenCLIP) PyTorch checkpoint into a clca_jax model "
        "directory (orbax variables + config.json).",
    )
    parser.add_argument("--checkpoint", required=True, help=".pth/.pt/.bin/.safetensors file")
    parser.add_argument(
        "--model", default=None, help="timm name, e.g. vit_base_patch16_224.orig_in21k"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="config whose `model` section describes the target: reduction method, keep rate, "
        "CLCA head and cache (official CLCA checkpoints); a shipped config's name "
        "(soyglobal, soygene:tiny) or a config file's path",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: new or empty (an existing converted model only with --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the converted model already in --out (other non-empty folders are refused)",
    )
    _add_argument(
        parser,
        "--img_size",
        type=int,
        default=None,
        help="target image size (default: the backbone's)",
    )
    _add_argument(
        parser,
        "--num_classes",
        type=int,
        default=None,
        help="head outputs (default: the checkpoint head's, else 1000)",
    )
    _add_argument(
        parser,
        "--embed_dim",
        type=int,
        default=None,
        help="size override for non-standard checkpoints",
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="size override for non-standard checkpoints"
    )
    _add_argument(
        parser,
        "--num_heads",
        type=int,
        default=None,
        help="size override for non-standard checkpoints",
    )
    parser.add_argument(
        "--normalization",
        choices=normalization.CHOICES,
        default=None,
        help="input normalisation recorded in the model's config (model.normalization; "
        "default imagenet, as the reference; backbone: the constants of --model's tag)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly created parameters")
    _add_argument(
        parser,
        "--trust_pickle",
        action="store_true",
        help="also unpickle Python objects stored beside the tensors (trusted files only)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare logits with the timm model (needs torch)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def checkpoint_classes(state: dict, head: str) -> int | None:
    """Classes of the checkpoint's classifier for the model's head, if it has one."""
    key = "head.weight" if head == NO_HEAD else "ifa_head.0.4.weight"
    return int(state[key].shape[0]) if key in state else None


def model_config_from_args(args: argparse.Namespace, state: dict) -> ml_collections.ConfigDict:
    """The target model config: CLI values, else the config file's, the checkpoint's and the
    backbone's."""
    if args.config:
        config = config_files.load(args.config).model
    elif args.model:
        config = default_model_config()
    else:
        raise ValueError("give --model (a timm name) or --config (a config name or file).")
    if args.model:
        config.backbone = args.model
        if args.img_size is None and not args.config:
            config.img_size = get_backbone(args.model).img_size
    if args.img_size is not None:
        config.img_size = args.img_size
    for field in ("embed_dim", "depth", "num_heads", "normalization"):
        if getattr(args, field) is not None:
            config[field] = getattr(args, field)
    stored = checkpoint_classes(state, config.clca.head)
    if args.num_classes is not None:
        config.num_classes = args.num_classes
    elif stored is not None:
        config.num_classes = stored
    elif not args.config:
        config.num_classes = 1000
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        check_output_dir(args.out, args.overwrite)  # before the (slow) reading and converting
        print(f"reading {args.checkpoint}", flush=True)
        state = load_state_dict(args.checkpoint, trust_pickle=args.trust_pickle)
        timm_state = openclip_to_timm(state) if is_openclip(state) else state
        config = model_config_from_args(args, timm_state)
        print(
            f"converting to {config.backbone} at {config.img_size}px, {config.num_classes} classes",
            flush=True,
        )
        variables, report = convert_state_dict(state, config, seed=args.seed)
        print(report.summary())
        save_pretrained(args.out, variables, config, report.summary(), args.overwrite)
        print(f"wrote {args.out} in {time.time() - start:.1f}s")
        if args.verify:
            from clca_jax.convert.verify import compare_with_timm

            diff = compare_with_timm(timm_state, variables, config)
            print(f"verify: max |logits - timm logits| = {diff:.3g}")
    except (ConversionError, ValueError, OSError, ImportError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """`python -m clca_jax.convert.cli`, the `clca-convert` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
