"""Images per second of the training input pipeline (decode, resize, crop, flip, normalise).

Without --name it writes a small folder dataset of JPEG files (smooth synthetic images of
--source_size pixels, about the size of the leaf images) to a temporary folder and reads it
through the folder route; with --name/--dir it reads that dataset instead.

    python tools/bench_input.py                  # 448 px, batch 32, fabricated JPEGs
    python tools/bench_input.py --name=soygene --dir=/data/soygene
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

import clca_jax.data as data


def write_jpegs(root: str, count: int, side: int, classes: int = 4) -> None:
    """Writes `count` smooth random JPEG images of `side` x `side` into class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def measure(config, img_size: int, batch: int, steps: int, warmup: int) -> float:
    """Runs the training loader and returns images per second after `warmup` batches."""
    loader = data.make_train_loader(config, img_size=img_size, global_batch_size=batch, seed=0)
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    """Parses the flags, prepares the data and prints the throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img_size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0 = one per core")
    parser.add_argument("--num_images", type=int, default=192)
    parser.add_argument("--source_size", type=int, default=600)
    parser.add_argument("--name", default="", help="dataset name; empty = fabricated JPEGs")
    parser.add_argument("--dir", default="", help="dataset folder for --name")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = data.default_data_config(args.name or "folder")
        config.dir = args.dir
        if not args.name:
            write_jpegs(tmp, args.num_images, args.source_size)
            config.update(dir=tmp, train_split="train_val")
        config.num_threads = args.threads
        rate = measure(config, args.img_size, args.batch, args.steps, args.warmup)
    source = args.name or f"fabricated {args.source_size}px JPEG"
    print(
        f"train input pipeline: {rate:.1f} images/s at {args.img_size}px "
        f"(batch {args.batch}, {source}, {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
