"""Convert a timm / OpenCLIP PyTorch checkpoint into a clca_jax model directory.

Example:
  python tools/convert_timm_weights.py --checkpoint vit_b16_in21k.pth \
      --model vit_base_patch16_224.orig_in21k --img_size 448 --num_classes 1938 \
      --out pretrained/vit_b16_in21k_448
"""

import sys

from clca_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
