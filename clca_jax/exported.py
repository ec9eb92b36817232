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
    return info


def load_stablehlo(directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported function of `DIR/model.stablehlo`: float32 images -> logits (jax arrays)."""
    from jax import export

    path = os.path.join(directory, STABLEHLO_FILE)
    with open(path, "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    return exported.call


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
        import onnxruntime

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
        self.session = onnxruntime.InferenceSession(
            self.path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits [batch, classes] of normalised float32 images [batch, S, S, 3]."""
        return self.session.run(None, {self.input_name: np.asarray(images, np.float32)})[0]
