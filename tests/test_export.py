"""clca_jax.export: StableHLO and ONNX files of every reduction method give the model's logits
at batch sizes 1 and 8 from one file; what ONNX cannot express is refused, nothing written."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax import export, exported, pretrained
from clca_jax.models import METHODS, NO_REDUCTION, create_model, default_model_config

IMG_SIZE = 32  # patch 8: a 4x4 grid
TOLERANCE = 1e-4
# jax2onnx 0.17.1 has no ONNX form of lax.pad with interior padding, which ATS's
# float64-emulating cumulative sum (an associative scan) lowers to.
ONNX_REFUSED = {"ats": "lax.pad with interior padding"}


def tiny_config(method: str, clca: bool):
    config = default_model_config()
    config.backbone = "vit_small_patch8_224"
    config.update(img_size=IMG_SIZE, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    if method != NO_REDUCTION:
        config.reduction.update(method=method, keep_rate=0.5, locations=(1, 2))
    if clca:
        config.clca.update(head="cla", clc=True, num_clr=1)
    return config


def converted(tmp_path, method: str, clca: bool):
    config = tiny_config(method, clca)
    model = create_model(config)
    variables = model.init(jax.random.key(1), jnp.zeros((1, IMG_SIZE, IMG_SIZE, 3)))
    directory = str(tmp_path / "model")
    pretrained.save_pretrained(directory, variables, config)
    return model, variables, directory


def images(batch: int) -> np.ndarray:
    rng = np.random.default_rng(100 + batch)
    return rng.normal(size=(batch, IMG_SIZE, IMG_SIZE, 3)).astype(np.float32)


CASES = [(NO_REDUCTION, False)] + [
    (m, clca) for m in METHODS if m != NO_REDUCTION for clca in (False, True)
]


@pytest.mark.parametrize("method,clca", CASES, ids=[f"{m}-clca{int(c)}" for m, c in CASES])
def test_export_round_trip_gives_the_models_logits(tmp_path, method, clca):
    model, variables, directory = converted(tmp_path, method, clca)
    out = str(tmp_path / "export")
    formats = ["stablehlo"] if method in ONNX_REFUSED else ["stablehlo", "onnx"]
    info = export.export(out, model_dir=directory, formats=formats)
    assert sorted(os.listdir(out)) == sorted(
        [exported.INFO_FILE] + [exported.FILES[f] for f in formats]
    )
    assert exported.read_info(out) == json.loads(json.dumps(info))
    assert info["input"]["shape"] == ["batch", IMG_SIZE, IMG_SIZE, 3]
    assert info["input"]["mean"] == pytest.approx(list(model.input_normalization[0]))
    assert info["model"]["reduction"]["method"] == method
    runners = {"stablehlo": exported.load_stablehlo(out)}
    if "onnx" in formats:
        runners["onnx"] = exported.OnnxModel(out)
    for batch in (1, 8):  # one file, two batch sizes
        x = images(batch)
        want = np.asarray(model.apply(variables, x, train=False)[0])
        for fmt, run in runners.items():
            got = np.asarray(run(x))
            assert got.shape == (batch, 5), fmt
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=fmt)


@pytest.mark.parametrize("method", sorted(ONNX_REFUSED))
def test_onnx_refuses_what_it_cannot_express_naming_the_operation(tmp_path, method):
    _, _, directory = converted(tmp_path, method, True)
    out = tmp_path / "export"
    with pytest.raises(export.ExportError, match=ONNX_REFUSED[method]) as error:
        export.export(str(out), model_dir=directory)
    assert method in str(error.value) and "stablehlo" in str(error.value)
    assert not out.exists() and os.listdir(tmp_path) == ["model"]


def test_an_existing_export_is_replaced_only_when_asked(tmp_path):
    _, _, directory = converted(tmp_path, "evit", False)
    out = str(tmp_path / "export")
    export.export(out, model_dir=directory, formats=["stablehlo"])
    before = os.path.getmtime(os.path.join(out, exported.STABLEHLO_FILE))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(out, model_dir=directory, formats=["stablehlo"])
    assert os.path.getmtime(os.path.join(out, exported.STABLEHLO_FILE)) == before
    export.export(out, model_dir=directory, formats=["onnx"], overwrite=True)
    assert sorted(os.listdir(out)) == [exported.INFO_FILE, exported.ONNX_FILE]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other than a clca_jax export"):
        export.export(str(other), model_dir=directory, overwrite=True)
    assert os.listdir(other) == ["keep.txt"]


def test_a_file_whose_logits_differ_is_refused(tmp_path, monkeypatch):
    _, _, directory = converted(tmp_path, "evit", True)
    original = export.inference_function

    def off_by_a_little(model, variables):
        function = original(model, variables)
        return lambda x: function(x) + 1e-3

    monkeypatch.setattr(export, "inference_function", off_by_a_little)
    out = tmp_path / "export"
    with pytest.raises(export.ExportError, match="away from the model's"):
        export.export(str(out), model_dir=directory)
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"formats": []}, "--formats is empty"),
        ({"formats": ["tflite"]}, "unknown"),
        ({"tolerance": 0.0}, "must be positive"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.export(str(tmp_path / "export"), model_dir=str(tmp_path / "absent"), **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", [NO_REDUCTION, "evit"])
def test_the_papers_vit_b16_at_448_exports_with_the_models_logits(tmp_path, method):
    """The paper's model (CLIP ViT-B/16 at 448 px, CLA head and cache, 1,938 classes; EViT at
    keep rate 0.1, or no reduction) through both formats: `export` itself refuses a file whose
    logits at batch sizes 1 and 8 differ by more than 1e-4, and the files are run again here."""
    from clca_jax.configs import soyglobal

    config = soyglobal.get_config().model
    config.reduction.update(method=method, keep_rate=0.1 if method != NO_REDUCTION else 1.0)
    model = create_model(config)
    size = config.img_size
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    directory = str(tmp_path / "model")
    pretrained.save_pretrained(directory, variables, config)
    out = str(tmp_path / "export")
    info = export.export(out, model_dir=directory)
    assert all(check["max_abs_difference"] <= TOLERANCE for check in info["checks"].values())
    x = np.random.default_rng(7).normal(size=(2, size, size, 3)).astype(np.float32)
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, x))
    for run in (exported.load_stablehlo(out), exported.OnnxModel(out)):
        np.testing.assert_allclose(np.asarray(run(x)), want, rtol=0, atol=TOLERANCE)


def test_the_export_command_as_typed(tmp_path):
    """`python -m clca_jax.export --model=DIR --out=OUT` (the `clca-export` command): the files,
    a line per format, and an existing --out kept as it was with one error line."""
    import subprocess
    import sys

    _, _, directory = converted(tmp_path, "evit", True)
    out = tmp_path / "export"
    command = [sys.executable, "-m", "clca_jax.export", f"--model={directory}", f"--out={out}"]
    done = subprocess.run(
        [*command, "--formats=stablehlo"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["export.json", "model.stablehlo"]
    assert "model.stablehlo: logits within" in done.stdout
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--overwrite" in lines[-1], again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
