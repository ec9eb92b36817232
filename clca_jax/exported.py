"""Reading an export directory (written by `clca_jax.export`) without the model code.

Layout:

    DIR/export.json       what the files take and give (`read_info`)
    DIR/model.stablehlo   `jax.export` serialisation, batch dimension symbolic
    DIR/model.onnx        the same function as an ONNX graph (when exported)

Both files map a float32 batch `images` [batch, S, S, 3] (NHWC, already normalised as
`export.json`'s `input` says: RGB in [0, 255] -> `(x / 255 - mean) / std` after the evaluation
resize and centre crop) to `logits` [batch, classes]; the token reduction is inside them.
`export.json` also holds the class names (or null), the model config and the parity checks
made when the files were written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

INFO_FILE = "export.json"
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
FILES = {"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE}
INFO_VERSION = 1


def is_export_directory(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, INFO_FILE))


def read_info(directory: str) -> dict:
    """The export's `export.json`.

    Raises:
      FileNotFoundError: `directory` has no `export.json`.
      ValueError: it is not an export description this version reads.
    """
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} is not an export directory (no {INFO_FILE}); write one with "
            "clca-export --workdir=W --out=DIR."
        )
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(info, dict) or info.get("version") != INFO_VERSION:
        raise ValueError(
            f"{path} is not a version-{INFO_VERSION} export description; export the model again."
        )
    problem = _info_problem(info)
    if problem:
        raise ValueError(f"{path}: {problem}; export the model again.")
    return info


def _info_problem(info: dict) -> str | None:
    """What makes a version-1 description unusable (a missing or ill-typed field), or None."""

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    spec = info.get("input")
    if not isinstance(spec, dict):
        return "no `input` section"
    for field in ("crop", "resize"):
        if not positive_int(spec.get(field)):
            return f"input.{field} is {spec.get(field)!r}, not a positive integer"
    for field in ("mean", "std"):
        values = spec.get(field)
        if not (
            isinstance(values, list)
            and len(values) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            return f"input.{field} is {values!r}, not three numbers"
    if any(v <= 0 for v in spec["std"]):
        return f"input.std {spec['std']} has a value that is not positive"
    if spec.get("shape") != ["batch", spec["crop"], spec["crop"], 3]:
        return f"input.shape is {spec.get('shape')!r}, not ['batch', crop, crop, 3]"
    num_classes = info.get("num_classes")
    if not positive_int(num_classes):
        return f"num_classes is {num_classes!r}, not a positive integer"
    names = info.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != num_classes
        or not all(isinstance(n, str) for n in names)
    ):
        return f"class_names is not null or a list of {num_classes} strings"
    formats = info.get("formats")
    if not isinstance(formats, list) or not formats or any(f not in FILES for f in formats):
        return f"formats is {formats!r}, not a non-empty list of {', '.join(FILES)}"
    return None


def load_stablehlo(directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported function of `DIR/model.stablehlo`: float32 images -> logits (jax arrays).

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: it is not a `jax.export` serialisation this jax reads.
    """
    from jax import export

    path = os.path.join(directory, STABLEHLO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no {STABLEHLO_FILE}.")
    with open(path, "rb") as f:
        serialised = f.read()
    try:
        exported = export.deserialize(bytearray(serialised))
    except Exception as error:  # flatbuffers and jax raise several unrelated types
        raise ValueError(
            f"{path} cannot be read as a jax.export serialisation ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); export the model again."
        ) from None
    return exported.call


def load(directory: str, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """float32 images [batch, S, S, 3] -> NumPy logits through one exported file.

    Args:
      directory: an export directory.
      fmt: `onnx` (ONNX Runtime, one thread per core) or `stablehlo` (jax).

    Raises:
      FileNotFoundError, ValueError: the file is missing, unreadable, or takes another input
        than `export.json` describes; ONNX Runtime is not installed.
    """
    if fmt == "onnx":
        return OnnxModel(directory)
    if fmt == "stablehlo":
        function = load_stablehlo(directory)
        return lambda images: np.asarray(function(np.asarray(images, np.float32)))
    raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FILES)}.")


class OnnxModel:
    """`DIR/model.onnx` (or a `.onnx` file beside its `export.json`) in ONNX Runtime.

    Attributes:
      info: the export's `export.json`.
      path: the ONNX file.
    """

    def __init__(self, path: str, threads: int = 0):
        """Args:
        path: an export directory or its `model.onnx`.
        threads: ONNX Runtime's intra-op threads; 0 for one per CPU core.
        """
        try:
            import onnxruntime
        except ImportError:
            raise ValueError(
                "running model.onnx needs ONNX Runtime: pip install 'clca_jax[export]' (or use "
                "the export's model.stablehlo, which needs jax alone)."
            ) from None

        path = os.path.abspath(os.path.expanduser(path))
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        self.info = read_info(directory)
        self.path = path if not os.path.isdir(path) else os.path.join(path, ONNX_FILE)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"{directory} holds no {ONNX_FILE} (exported with --formats="
                f"{','.join(self.info.get('formats', []))}); export it with --formats=onnx."
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(
                self.path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, Fail)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"{self.path} cannot be loaded by ONNX Runtime ({type(error).__name__}: "
                f"{reason}); export the model again."
            ) from None
        (graph_input,) = self.session.get_inputs()
        self.input_name = graph_input.name
        expected = list(self.info["input"]["shape"][1:])
        if list(graph_input.shape[1:]) != expected:
            raise ValueError(
                f"{self.path} takes images of shape {graph_input.shape}, but its "
                f"{INFO_FILE} describes {self.info['input']['shape']}; export the model again."
            )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits [batch, classes] of normalised float32 images [batch, S, S, 3]."""
        return self.session.run(None, {self.input_name: np.asarray(images, np.float32)})[0]
