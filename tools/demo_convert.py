"""Quick demo: convert a random-weight timm checkpoint and compare logits with timm.

Builds `vit_tiny_patch16_224` with random weights in PyTorch, saves its state dict, converts it
with the same code as `tools/convert_timm_weights.py` at 448 px (position embedding resampled),
prints the JAX logits, and checks them against timm's.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from clca_jax import load_pretrained
from clca_jax.convert.cli import main as convert_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--img_size", type=int, default=448)
    args = parser.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"error: --out={args.out} exists and is not empty; name a new folder.")
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    checkpoint = os.path.join(args.out, "vit_tiny_random.pth")
    torch.save(source.state_dict(), checkpoint)
    converted = os.path.join(args.out, "converted")
    code = convert_main(
        ["--checkpoint", checkpoint, "--model", "vit_tiny_patch16_224.augreg_in21k",
         "--img_size", str(args.img_size), "--out", converted]
    )  # fmt: skip
    if code:
        raise SystemExit(code)

    model, variables = load_pretrained(converted)
    images = np.random.default_rng(0).standard_normal((2, args.img_size, args.img_size, 3))
    images = images.astype(np.float32)
    logits, _ = model.apply(variables, images)

    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=args.img_size
    ).eval()
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.set_printoptions(precision=4, suppress=True)
    print("JAX logits:\n", np.asarray(logits))
    print(f"max |JAX - timm| = {np.abs(np.asarray(logits) - expected).max():.2e}")


if __name__ == "__main__":
    main()
