"""The Python half of `tools/device_check.sh`: the logits check and the results table.

    python tools/device_check.py logits [--smoke]   # exit 1 if accelerator and CPU disagree
    python tools/device_check.py table OUT          # OUT/device_table.md from OUT/*/benchmark.csv

`logits` builds the paper's model (CLIP ViT-B/16 at 448 px, CLA head and cache, 1,938 classes)
with random weights for no reduction, EViT 0.1 and ToMe 0.1, and compares the logits of the
default device in bfloat16 with fused attention against the CPU's in float32 with the
per-image attention. The bound is relative to the logits' scale: bfloat16 keeps 8 bits of
mantissa, and through 12 blocks the logits move by about 1 % of their scale.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys

BF16_TOLERANCE = 0.05  # of the largest |logit|


def logits_check(smoke: bool) -> int:
    import jax
    import numpy as np

    from clca_jax.configs import soyglobal
    from clca_jax.models import create_model

    config = soyglobal.get_config("tiny" if smoke else None).model
    cpu = jax.devices("cpu")[0]
    device = jax.devices()[0]
    failures = 0
    for method in ("none", "evit", "tome"):
        config.reduction.update(method=method, keep_rate=1.0 if method == "none" else 0.1)
        reference = create_model(config).clone(dtype=np.float32, attention="per_image")
        fast = reference.clone(dtype=jax.numpy.bfloat16, attention="fused")
        size = config.img_size
        images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
        with jax.default_device(cpu):
            variables = jax.jit(reference.init)(jax.random.key(0), images[:1])
            want = np.asarray(jax.jit(reference.apply)(variables, images)[0])
        on_device = jax.device_put(variables, device)
        got = np.asarray(jax.jit(fast.apply)(on_device, jax.device_put(images, device))[0])
        scale = float(np.abs(want).max())
        error = float(np.abs(got - want).max()) / scale
        ok = math.isfinite(error) and error <= BF16_TOLERANCE
        failures += not ok
        print(
            f"logits {method:>5}: {device.platform} bfloat16 fused vs cpu float32 per_image: "
            f"max |diff| = {error:.2e} of the scale {scale:.3g} "
            f"({'ok' if ok else 'BEYOND'} the bound {BF16_TOLERANCE})"
        )
    return 1 if failures else 0


def results_table(out: str) -> str:
    """One Markdown table of every benchmark CSV under `out` (one folder per call)."""
    lines = [
        "| run | method | keep | mode | batch | img/s | ms/batch | compile s | peak % | "
        "device GiB | traces | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(glob.glob(os.path.join(out, "*", "benchmark.csv"))):
        run = os.path.basename(os.path.dirname(path))
        batch = run.rsplit("_b", 1)[-1] if "_b" in run else ""
        with open(path) as f:
            for row in csv.DictReader(f):
                lines.append(
                    f"| {run} | {row['method']} | {float(row['keep_rate']):g} | {row['mode']} | "
                    f"{batch} | {float(row['images_per_s']):.1f} | {float(row['latency_ms']):.1f} "
                    f"| {float(row['compile_s']):.1f} | {100 * float(row['peak_fraction']):.1f} | "
                    f"{float(row['device_peak_gib']):.1f} | {row['traces']} | {row['device']} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) >= 2 and argv[1] == "logits":
        return logits_check(smoke="--smoke" in argv[2:])
    if len(argv) == 3 and argv[1] == "table":
        table = results_table(argv[2])
        with open(os.path.join(argv[2], "device_table.md"), "w") as f:
            f.write(table)
        print(table)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
