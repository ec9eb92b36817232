"""Exports a trained model, its token reduction inside, to StableHLO and ONNX.

    # a training workdir (its best checkpoint; --checkpoint=latest for the latest)
    python -m clca_jax.export --workdir=runs/folder_tiny --out=exported/folder_tiny
    # a converted model directory, StableHLO only
    python -m clca_jax.export --model=pretrained/clca_soyglobal --out=exported/x --formats=stablehlo

The exported function maps a float32 batch of normalised images [batch, S, S, 3] (NHWC) to
logits; the batch size is free (a symbolic dimension) and the token schedule is static, so
every method's reduction (top-k gathers, merges, samples, masks) is part of the graph. The
export directory (`clca_jax.exported` reads it) holds `model.stablehlo` (`jax.export`,
callable from Python with jax alone), `model.onnx` (jax2onnx) and `export.json`: the input's
size and normalisation, the class names, the model config and the checks made here.

Each file is checked before anything is written: its logits at batch sizes 1 and 8 (from one
file) must equal the JAX model's within `--tolerance` (1e-4). A method whose operations the
ONNX converter cannot express is refused with the converter's words naming the operation;
`--formats=stablehlo` exports every method. The output folder is written whole or not at all,
and an existing export is replaced only with `--overwrite`.

The ONNX graph is made by jax2onnx (a maintained converter of jaxprs, with flax modules and
dynamic batch dimensions; tf2onnx would need TensorFlow and jax2tf in between). Install it
with `pip install 'clca_jax[export]' && pip install --no-deps jax2onnx==0.17.1`: its metadata
caps orbax-checkpoint below the version this package pins, which its converter does not use.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax import export as jax_export

from clca_jax import commands, exported, predict, pretrained, user_errors
from clca_jax.data import pipeline
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import sharding, workdirs

FORMATS = tuple(exported.FILES)
CHECK_BATCH_SIZES = (1, 8)
DEFAULT_TOLERANCE = 1e-4
ONNX_OPSET = 21
JAX2ONNX_INSTALL = "pip install 'clca_jax[export]' && pip install --no-deps jax2onnx==0.17.1"


class ExportError(ValueError):
    """A format cannot express the model, or its logits differ from the model's."""


def inference_function(model, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """images [b, S, S, 3] -> logits [b, C], with the variables as constants.

    Attention runs batched (one pass over the batch, as on accelerators) rather than in the
    CPU's per-image loop, which would be a loop in the graph; the reduction noise of
    evaluation (DPC-KNN's 1e-6 tie-breaker) is left out, as `model.apply` without a
    `reduction` key does.
    """
    model = model.clone(attention="batched")
    constants = jax.tree.map(np.asarray, variables)

    def logits(images):
        return model.apply(constants, images, train=False)[0]

    return logits


def check_images(img_size: int, seed: int = 0) -> list[np.ndarray]:
    """One batch per `CHECK_BATCH_SIZES` entry of normalised-looking random images."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(b, img_size, img_size, 3)).astype(np.float32) for b in CHECK_BATCH_SIZES
    ]


def max_difference(run: Callable, expected: Sequence[np.ndarray], batches) -> float:
    return max(
        float(np.max(np.abs(np.asarray(run(x), np.float64) - want)))
        for x, want in zip(batches, expected, strict=True)
    )


def export_stablehlo(function, img_size: int) -> bytes:
    """`jax.export` of `function` with a symbolic batch dimension, serialised."""
    (batch,) = jax_export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, img_size, img_size, 3), jnp.float32)
    return bytes(jax_export.export(jax.jit(function))(spec).serialize())


def export_onnx(function, img_size: int, method: str) -> bytes:
    """The ONNX graph of `function` (input `images`, output `logits`, batch dimension free).

    Raises:
      ExportError: jax2onnx is missing, or cannot express an operation of the model.
    """
    try:
        import jax2onnx
    except ImportError:
        raise ExportError(
            f"the ONNX export needs jax2onnx: {JAX2ONNX_INSTALL} (or --formats=stablehlo)."
        ) from None
    try:
        proto = jax2onnx.to_onnx(
            function,
            [("batch", img_size, img_size, 3)],
            model_name="clca_jax",
            opset=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
        )
    except (NotImplementedError, jax.errors.JAXTypeError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"ONNX cannot express reduction method {method!r} with jax2onnx "
            f"{_version('jax2onnx')}: {reason}. Nothing was written; --formats=stablehlo "
            "exports every method."
        ) from None
    return proto.SerializeToString()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run_onnx(serialised: bytes) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def _run_stablehlo(serialised: bytes) -> Callable[[np.ndarray], np.ndarray]:
    return jax_export.deserialize(bytearray(serialised)).call


RUNNERS = {"stablehlo": _run_stablehlo, "onnx": _run_onnx}


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if not formats:
        raise ValueError(f"--formats is empty; choose from {', '.join(FORMATS)}.")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}.")
    return tuple(dict.fromkeys(formats))


def export(
    out: str,
    *,
    workdir: str | None = None,
    model_dir: str | None = None,
    checkpoint_name: str = "best",
    formats: Sequence[str] = FORMATS,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> dict:
    """Exports a workdir's or a converted model's model to `out` (see the module docstring).

    Returns:
      The `export.json` written.

    Raises:
      ExportError: a format cannot express the model or does not reproduce its logits.
      ValueError, OSError: a flag, the model or `out` is unusable. Nothing is written then.
    """
    formats = check_formats(formats)
    if not tolerance > 0:
        raise ValueError(f"--tolerance={tolerance} must be positive.")
    recognise = exported.is_export_directory
    directory = pretrained.check_output_dir(out, overwrite, "clca_jax export", recognise)
    metrics_lib.quiet_library_logs()
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    source = predict.load_predictor(workdir, model_dir, checkpoint_name, mesh)
    model = source.model
    method = model.reduction.method
    function = inference_function(model, jax.device_get(source.variables))
    batches = check_images(model.img_size)
    reference = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    expected = [np.asarray(reference(source.variables, x), np.float64) for x in batches]
    files, checks = {}, {}
    for fmt in formats:
        logging.info("Exporting the %s to %s.", source.source, fmt)
        start = time.perf_counter()
        if fmt == "stablehlo":
            files[fmt] = export_stablehlo(function, model.img_size)
        else:
            files[fmt] = export_onnx(function, model.img_size, method)
        difference = max_difference(RUNNERS[fmt](files[fmt]), expected, batches)
        if not difference <= tolerance:
            raise ExportError(
                f"the {fmt} export of reduction method {method!r} gives logits up to "
                f"{difference:.3g} away from the model's (tolerance {tolerance:g}); nothing "
                "was written."
            )
        checks[fmt] = {"batch_sizes": list(CHECK_BATCH_SIZES), "max_abs_difference": difference}
        logging.info(
            "%s: %.1f MB, logits within %.2g of the model's at batch sizes %s (%.1f s).",
            fmt,
            len(files[fmt]) / 1e6,
            difference,
            CHECK_BATCH_SIZES,
            time.perf_counter() - start,
        )
    mean, std = model.input_normalization
    info = {
        "version": exported.INFO_VERSION,
        "formats": list(formats),
        "files": {fmt: exported.FILES[fmt] for fmt in formats},
        "input": {
            "name": "images",
            "shape": ["batch", model.img_size, model.img_size, 3],
            "dtype": "float32",
            "layout": "NHWC, RGB",
            "resize": pipeline.resize_size(model.img_size),
            "crop": model.img_size,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "normalise": "bicubic resize to resize x resize, centre crop, (x / 255 - mean) / std",
        },
        "output": {"name": "logits", "shape": ["batch", model.num_classes]},
        "num_classes": model.num_classes,
        "class_names": source.class_names,
        "source": source.source,
        "model": _model_config(workdir, model_dir),
        "checks": checks,
        "tolerance": tolerance,
        "versions": {p: _version(p) for p in ("jax", "jax2onnx", "onnx", "onnxruntime")},
        "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
    }

    def write(folder: str) -> None:
        for fmt, data in files.items():
            with open(os.path.join(folder, exported.FILES[fmt]), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, exported.INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")

    pretrained.write_directory(
        directory,
        write,
        lambda: pretrained.check_output_dir(directory, overwrite, "clca_jax export", recognise),
    )
    return info


def _model_config(workdir: str | None, model_dir: str | None) -> dict:
    if model_dir:
        config = pretrained.read_model_config(os.path.abspath(os.path.expanduser(model_dir)))
    else:
        directory = os.path.abspath(os.path.expanduser(workdir))
        config = workdirs.read_run_config(directory).model
    return ml_collections.ConfigDict(config).to_dict()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    with user_errors.reported(FLAGS.debug):
        info = export(
            FLAGS.out,
            workdir=FLAGS.workdir,
            model_dir=FLAGS.model,
            checkpoint_name=FLAGS.checkpoint,
            formats=FLAGS.formats,
            tolerance=FLAGS.tolerance,
            overwrite=FLAGS.overwrite,
        )
    out = os.path.abspath(FLAGS.out)
    for fmt in info["formats"]:
        check = info["checks"][fmt]
        print(
            f"{os.path.join(out, info['files'][fmt])}: logits within "
            f"{check['max_abs_difference']:.2g} of the model's at batch sizes "
            f"{check['batch_sizes']}."
        )
    print(f"Input {info['input']['shape']} float32 NHWC, normalised as {out}/export.json says.")


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "A training workdir to export.")
    flags.DEFINE_string("model", None, "Instead of --workdir: a converted model directory.")
    flags.DEFINE_enum(
        "checkpoint", "best", ["best", "latest"], "Which checkpoint of a training workdir."
    )
    flags.DEFINE_string("out", None, "The export directory to write.")
    flags.DEFINE_list("formats", list(FORMATS), f"Formats, comma-separated: {', '.join(FORMATS)}.")
    flags.DEFINE_float(
        "tolerance", DEFAULT_TOLERANCE, "Largest logit difference from the model accepted."
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out.")
    flags.DEFINE_bool("debug", False, "Show the traceback of an error.")
    flags.mark_flag_as_required("out")


def cli() -> None:
    """`python -m clca_jax.export`, the `clca-export` command."""
    define_flags()
    commands.run(main, doc=__doc__)


if __name__ == "__main__":
    cli()
