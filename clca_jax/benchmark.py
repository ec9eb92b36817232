"""Throughput, compile time, MACs and memory of token reduction methods, beside PyTorch timm.

    python -m clca_jax.benchmark --config=soyglobal --methods=none,evit \\
        --keep_rates=0.1,0.7 --batch_size=8 --out=bench_out [--torch]
    clca-benchmark ...              # the same, installed; tools/benchmark.py ... from a checkout

Each (method, keep rate, mode) runs in its own process, so peak memory and compile counts are
its own. Times are medians of `--repeats` runs after a warm-up, with the device synchronised; the
input batch is already on the device. Inference is the evaluation forward; training is one
AdamW step (forward, backward, update, donated state); `train_grad_norms` is that step plus the
per-part gradient norms that `train.log_gradient_norms` logs (what the option costs), JAX only.
`peak_fraction` is the achieved
2 x MACs per second over the dense matmul peak measured in the same run. With `--torch`, the
timm model of the same backbone and size (no reduction) is timed on the same inputs and threads.
With `--onnx`, every model timed for inference is also exported as `clca-export` does (same
random weights) and its ONNX file timed in ONNX Runtime with one intra-op thread per core, after
its logits are checked against JAX's (the serving comparison; a method the converter cannot
express gets a row without figures). `latency_ms` is the median time of one batch.
Every worker, PyTorch's included, runs with the same host allocator settings (`--host_malloc`).

Writes `OUT/benchmark.csv` (one row per framework, method, keep rate and mode) and
`OUT/benchmark.png` (images/s and GMACs against keep rate), and prints the table.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from clca_jax import commands, config_files, user_errors

FLAGS = flags.FLAGS

# XLA:CPU allocates a step's scratch buffers afresh on every call, and glibc hands blocks over
# 32 MiB straight back to the kernel, so each training step page-faults its working set again
# (about 1.3 s of a 14 s ViT-B/16 448 px step here). One heap that is never trimmed keeps them.
RETAIN_HOST_MEMORY = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
)

COLUMNS = [
    "framework", "method", "keep_rate", "mode", "images_per_s", "latency_ms", "compile_s", "gmacs",
    "xla_gflops", "peak_fraction", "peak_rss_gib", "device_peak_gib", "traces", "device",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Measurements (run inside a worker process)


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` (which must block until the device is done)."""
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(repeats: int, dtype="float32") -> float:
    """Dense matmul FLOP/s of this device in `dtype`, the model's compute dtype (the best of a
    few sizes; accelerators get larger ones). Random operands: zeros run faster on some GPUs."""
    import jax

    matmul = jax.jit(lambda x, y: x @ y)
    sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)
    best = 0.0
    for size in sizes:
        operand = jax.random.normal(jax.random.key(0), (size, size), dtype)
        run = functools.partial(synchronised, matmul, operand, operand)
        best = max(best, 2 * size**3 / median_seconds(run, repeats))
    return best


def device_memory_peak_gib() -> float:
    """Peak memory in use on the first device (NaN where the runtime does not say: the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return float("nan") if peak is None else peak / 2**30


def device_name() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}".replace(",", " ")


def synchronised(function, *arguments):
    """Calls `function` and waits for the device."""
    import jax

    return jax.block_until_ready(function(*arguments))


class TrainLoop:
    """Calls a donated train step repeatedly, feeding each call the previous state."""

    def __init__(self, step, state, images, labels):
        self.step, self.state, self.images, self.labels = step, state, images, labels

    def __call__(self):
        import jax

        self.state, outputs = self.step(self.state, self.images, self.labels)
        jax.block_until_ready((self.state, outputs))


def jax_measurement(spec: dict) -> dict:
    """Times one model config in one mode; returns its row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from clca_jax.flops import count_macs
    from clca_jax.models import create_model
    from clca_jax.pretrained import model_config_from_dict
    from clca_jax.training import metrics as metrics_lib

    config = model_config_from_dict(spec["model"])
    model = create_model(config)
    batch, size = spec["batch_size"], config.img_size
    images = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32
    )
    labels = jnp.zeros((batch,), jnp.int32)
    rngs = {"params": jax.random.key(0), "reduction": jax.random.key(1)}
    variables = jax.jit(model.init)(rngs, images[:1])
    gmacs = count_macs(model).gmacs
    peak = matmul_peak_flops(spec["repeats"], model.dtype)
    traces = []

    def forward(variables, images):
        traces.append(1)
        return model.apply(variables, images, rngs={"reduction": jax.random.key(2)})[0]

    optimizer = optax.adamw(1e-4, weight_decay=0.05)
    mode = spec["mode"]

    def train_step(state, images, labels):
        traces.append(1)
        params, extra, opt_state = state

        def loss_fn(params):
            (logits, aux), updates = model.apply(
                {"params": params, **extra}, images, train=True,
                rngs={"reduction": jax.random.key(3)}, mutable=list(extra),
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss + aux["extra_loss"], updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        norms = metrics_lib.gradient_norms(grads) if mode == "train_grad_norms" else {}
        return (optax.apply_updates(params, changes), updates, opt_state), norms

    if mode == "inference":
        function = jax.jit(forward)
        arguments = (variables, images)
    else:
        params = variables["params"]
        extra = {k: v for k, v in variables.items() if k != "params"}
        function = jax.jit(train_step, donate_argnums=0)
        arguments = ((params, extra, optimizer.init(params)), images, labels)
    start = time.perf_counter()
    compiled = function.lower(*arguments).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    xla_flops = float((analysis or {}).get("flops", float("nan")))
    if mode == "inference":
        run = functools.partial(synchronised, function, *arguments)
    else:
        run = TrainLoop(function, *arguments)
    seconds = median_seconds(run, spec["repeats"])
    # Training does about 3x the forward's multiply-adds (forward + two for backward).
    model_flops = 2 * gmacs * 1e9 * batch * (1 if mode == "inference" else 3)
    return {
        "framework": "jax",
        "method": spec["method"],
        "keep_rate": spec["keep_rate"],
        "mode": mode,
        "images_per_s": batch / seconds,
        "latency_ms": 1e3 * seconds,
        "compile_s": compile_s,
        "gmacs": gmacs,
        "xla_gflops": xla_flops / batch / 1e9,
        "peak_fraction": model_flops / seconds / peak,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device_peak_gib": device_memory_peak_gib(),
        "traces": len(traces),
        "device": device_name(),
    }


def torch_measurement(spec: dict) -> dict:
    """The timm model of the same backbone and size, no reduction, eager PyTorch."""
    import torch

    from clca_jax.convert.verify import build_timm_model
    from clca_jax.models import NO_REDUCTION
    from clca_jax.pretrained import model_config_from_dict

    torch.set_num_threads(os.cpu_count())
    config = model_config_from_dict(spec["model"])
    model = build_timm_model(config)
    batch, size = spec["batch_size"], config.img_size
    images = torch.randn(batch, 3, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mode = spec["mode"]
    if mode == "inference":
        model.eval()

        def run():
            with torch.no_grad():
                model(images)

    else:
        model.train()

        def run():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    seconds = median_seconds(run, spec["repeats"])
    return {
        "framework": "torch",
        "method": NO_REDUCTION,
        "keep_rate": 1.0,
        "mode": mode,
        "images_per_s": batch / seconds,
        "latency_ms": 1e3 * seconds,
        "compile_s": 0.0,
        "gmacs": float("nan"),
        "xla_gflops": float("nan"),
        "peak_fraction": float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device_peak_gib": float("nan"),
        "traces": 0,
        "device": "cpu:torch",
    }


def onnx_measurement(spec: dict) -> dict:
    """The model's ONNX export (random weights as in `jax_measurement`) in ONNX Runtime."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnxruntime

    from clca_jax import export
    from clca_jax.flops import count_macs
    from clca_jax.models import create_model
    from clca_jax.pretrained import model_config_from_dict

    config = model_config_from_dict(spec["model"])
    model = create_model(config)
    batch, size = spec["batch_size"], config.img_size
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    rngs = {"params": jax.random.key(0), "reduction": jax.random.key(1)}
    variables = jax.jit(model.init)(rngs, jnp.asarray(images[:1]))
    row = {
        "framework": "onnxruntime",
        "method": spec["method"],
        "keep_rate": spec["keep_rate"],
        "mode": "inference",
        "gmacs": count_macs(model).gmacs,
        "xla_gflops": float("nan"),
        "peak_fraction": float("nan"),
        "device_peak_gib": float("nan"),
        "traces": 0,
        "device": "cpu:onnxruntime",
    }
    function = export.inference_function(model, jax.device_get(variables))
    start = time.perf_counter()
    try:
        serialised = export.export_onnx(function, size, spec["method"])
    except export.ExportError as error:
        print(f"onnx: {error}", file=sys.stderr)
        return dict(row, images_per_s=float("nan"), latency_ms=float("nan"), compile_s=0.0,
                    peak_rss_gib=float("nan"))  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    export_s = time.perf_counter() - start
    expected = np.asarray(jax.jit(function)(images), np.float64)
    difference = float(np.max(np.abs(session.run(None, {"images": images})[0] - expected)))
    if not difference <= export.DEFAULT_TOLERANCE:
        raise RuntimeError(f"the ONNX logits are {difference:.3g} away from JAX's")
    seconds = median_seconds(lambda: session.run(None, {"images": images}), spec["repeats"])
    return dict(
        row,
        images_per_s=batch / seconds,
        latency_ms=1e3 * seconds,
        compile_s=export_s,  # conversion plus session creation
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )


MEASUREMENTS = {"jax": jax_measurement, "torch": torch_measurement, "onnx": onnx_measurement}


# ---------------------------------------------------------------------------------------------
# Orchestration (parent process)


def specs(model_config) -> list[dict]:
    """One worker spec per (method, keep rate, mode), each validated before any worker starts."""
    from clca_jax.models import METHODS, NO_REDUCTION, create_model

    try:
        keep_rates = [float(rate) for rate in FLAGS.keep_rates]
    except ValueError:
        rates = ",".join(FLAGS.keep_rates)
        raise ValueError(f"--keep_rates must be numbers, got {rates}.") from None
    result = []
    for method in FLAGS.methods:
        # An unknown name is refused below, by the model's own validation.
        reduces = method not in METHODS or METHODS[method].reduces
        for keep_rate in keep_rates if reduces else [1.0]:
            model = model_config.copy_and_resolve_references()
            model.reduction.method = method
            model.reduction.keep_rate = keep_rate
            try:
                create_model(model)
            except ValueError as error:
                raise ValueError(f"--methods: {method} at keep rate {keep_rate}: {error}") from None
            for mode in FLAGS.modes:
                result.append(
                    {
                        "kind": "jax",
                        "method": method,
                        "keep_rate": keep_rate,
                        "model": model.to_dict(),
                        "batch_size": FLAGS.batch_size,
                        "repeats": FLAGS.repeats,
                        "mode": mode,
                    }
                )
    if FLAGS.onnx:
        inference = [spec for spec in result if spec["mode"] == "inference"]
        result += [dict(spec, kind="onnx") for spec in inference]
    if FLAGS.torch:
        for mode in [mode for mode in FLAGS.modes if mode in TORCH_MODES]:
            result.append(
                dict(result[0], kind="torch", method=NO_REDUCTION, keep_rate=1.0, mode=mode)
            )
    return result


def worker_environment() -> dict[str, str]:
    """This process's environment, plus the host allocator setting `--host_malloc` asks for."""
    environment = dict(os.environ)
    if FLAGS.host_malloc == "retain":
        environment.setdefault("GLIBC_TUNABLES", RETAIN_HOST_MEMORY)
    return environment


def run_worker(spec: dict) -> dict:
    """Runs one spec in a fresh process and returns its row."""
    label = f"{spec['kind']} {spec['method']} kr={spec['keep_rate']} {spec['mode']}"
    print(f"measuring {label} ...", flush=True)
    command = [sys.executable, "-m", "clca_jax.benchmark", f"--worker={json.dumps(spec)}"]
    result = subprocess.run(command, capture_output=True, text=True, env=worker_environment())
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'framework':<11} {'method':<12} {'kr':>5} {'mode':<16} {'img/s':>8} {'ms/batch':>9} "
        f"{'compile s':>9} {'GMACs':>7} {'XLA GF':>7} {'peak %':>7} {'RSS GiB':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['framework']:<11} {row['method']:<12} {row['keep_rate']:>5} {row['mode']:<16} "
            f"{row['images_per_s']:>8.2f} {row['latency_ms']:>9.1f} {row['compile_s']:>9.1f} "
            f"{row['gmacs']:>7.3g} "
            f"{row['xla_gflops']:>7.1f} {100 * row['peak_fraction']:>6.1f}% "
            f"{row['peak_rss_gib']:>8.2f}"
        )
    return "\n".join(lines)


OUTPUT_FILES = ("benchmark.csv", "benchmark.png")


def write_csv(rows: list[dict], path: str) -> None:
    """Written beside `path` and renamed onto it: a killed run leaves no half-written table."""
    partial = f"{path}.partial"
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def plot(rows: list[dict], path: str) -> bool:
    """images/s and GMACs against keep rate, one line per method and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (speed, cost) = plt.subplots(1, 2, figsize=(10, 4))
    jax_rows = [row for row in rows if row["framework"] == "jax"]
    for method in sorted({row["method"] for row in jax_rows}):
        for framework in ("jax", "onnxruntime"):
            for mode in sorted({row["mode"] for row in jax_rows}):
                points = sorted(
                    (row["keep_rate"], row["images_per_s"], row["gmacs"])
                    for row in rows
                    if (row["framework"], row["method"], row["mode"]) == (framework, method, mode)
                )
                if not points:
                    continue
                rates = [p[0] for p in points]
                label = f"{method} {mode}" + (" (ONNX Runtime)" if framework != "jax" else "")
                speed.plot(rates, [p[1] for p in points], marker="o", label=label)
                if framework == "jax" and mode == jax_rows[0]["mode"]:
                    cost.plot(rates, [p[2] for p in points], marker="o", label=method)
    speed.set(xlabel="keep rate", ylabel="images / s", title="throughput")
    cost.set(xlabel="keep rate", ylabel="GMACs / image", title="compute")
    speed.legend(fontsize=7)
    cost.legend(fontsize=7)
    figure.tight_layout()
    partial = f"{path}.partial.png"
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)
    return True


MODES = ("inference", "train", "train_grad_norms")
TORCH_MODES = ("inference", "train")


def check_flags() -> None:
    """Fails on a bad command line before any worker starts."""
    import importlib.util

    if not set(FLAGS.modes) <= set(MODES) or not FLAGS.modes:
        raise ValueError(f"--modes takes {', '.join(MODES)}, got {FLAGS.modes}.")
    if FLAGS.batch_size < 1 or FLAGS.repeats < 1:
        raise ValueError("--batch_size and --repeats must be at least 1.")
    if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
        raise ValueError(f"--out={FLAGS.out} is a file; name a folder for the results.")
    written = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(FLAGS.out, name))]
    if written and not FLAGS.overwrite:
        raise ValueError(
            f"--out={FLAGS.out} already holds {' and '.join(written)} of an earlier run; name "
            "another folder, or pass --overwrite to replace them."
        )
    if FLAGS.torch and not all(importlib.util.find_spec(name) for name in ("torch", "timm")):
        raise ValueError("--torch needs PyTorch and timm: pip install -e '.[torch]'.")
    if FLAGS.onnx:
        if "inference" not in FLAGS.modes:
            raise ValueError("--onnx times inference: add inference to --modes.")
        if not all(importlib.util.find_spec(name) for name in ("jax2onnx", "onnxruntime")):
            from clca_jax.export import JAX2ONNX_INSTALL

            raise ValueError(f"--onnx needs jax2onnx and ONNX Runtime: {JAX2ONNX_INSTALL}.")


def main(argv) -> None:
    del argv
    if FLAGS.worker:
        spec = json.loads(FLAGS.worker)
        row = MEASUREMENTS[spec["kind"]](spec)
        print(json.dumps(row))
        return
    with user_errors.reported(FLAGS.debug):
        check_flags()
        todo = specs(FLAGS.config.model)
        os.makedirs(FLAGS.out, exist_ok=True)
    tunables = worker_environment().get("GLIBC_TUNABLES") or "glibc defaults"
    print(f"host malloc: {tunables}", flush=True)
    rows = [run_worker(spec) for spec in todo]
    print(format_table(rows))
    write_csv(rows, os.path.join(FLAGS.out, "benchmark.csv"))
    plotted = plot(rows, os.path.join(FLAGS.out, "benchmark.png"))
    print(f"wrote {FLAGS.out}/benchmark.csv" + (" and benchmark.png" if plotted else ""))


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    config_files.DEFINE_config(
        "config", "soyglobal", "Config (name or file) whose `model` is timed."
    )
    from clca_jax.models.reduction import COMPARED_BY_DEFAULT

    flags.DEFINE_list("methods", list(COMPARED_BY_DEFAULT), "Reduction methods to time.")
    flags.DEFINE_list("keep_rates", ["0.1", "0.7"], "Keep rates (ignored for method none).")
    flags.DEFINE_integer("batch_size", 8, "Images per step.")
    flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median reported).")
    flags.DEFINE_list("modes", ["inference", "train"], f"What to time, of {', '.join(MODES)}.")
    flags.DEFINE_string("out", "bench_out", "Output directory.")
    flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in --out.")
    flags.DEFINE_bool("torch", False, "Also time the PyTorch timm model (needs the torch extra).")
    flags.DEFINE_bool(
        "onnx", False, "Also time each inference model's ONNX export in ONNX Runtime."
    )
    flags.DEFINE_enum(
        "host_malloc",
        "retain",
        ["retain", "system"],
        "retain: every worker (JAX and PyTorch alike) keeps freed host memory in one untrimmed "
        "heap (GLIBC_TUNABLES, unless already set); system: glibc's defaults.",
    )
    flags.DEFINE_bool("debug", False, "Show the traceback of a flag or config error.")
    flags.DEFINE_string("worker", None, "Internal: run one measurement described by this JSON.")


def cli() -> None:
    """`python -m clca_jax.benchmark`, the `clca-benchmark` command."""
    define_flags()
    commands.run(main, doc=__doc__)


if __name__ == "__main__":
    cli()
