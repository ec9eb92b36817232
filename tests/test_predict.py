"""The predict command: a finished tiny run predicts images; the CSV holds the model's softmax of
the evaluation view, unreadable files are listed, an existing CSV is kept."""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from clca_jax import data, export, exported, predict, pretrained
from clca_jax.models import create_model
from clca_jax.training import evaluation, workdirs
from clca_jax.training.evaluation import apply_model
from tests import command_line
from tests.test_train_loop import restore_state

TOP_K = 2


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def reference_probabilities(workdir: str):
    """The evaluation split's files and the model's softmax of each, batch by batch through
    evaluation's own loader (its preprocessing) and `apply_model`."""
    config = workdirs.read_run_config(workdir)
    model = create_model(config.model)
    state, _ = restore_state(config, workdir)
    loader = evaluation.eval_loader(config, config.model.img_size)
    rng = jax.random.wrap_key_data(evaluation.eval_key(config.seed))
    probabilities = []
    for index, batch in enumerate(loader):
        key = jax.random.fold_in(rng, index)
        logits, _, _ = apply_model(model, state.variables(), batch["image"], train=False, key=key)
        probabilities.append(np.asarray(jax.nn.softmax(logits, axis=-1))[batch["mask"]])
    source = data.load_data(config.data).eval
    files = [os.path.join(source.root, path) for path, _ in source.rows]
    return files, np.concatenate(probabilities), config.eval.batch_size


def test_probabilities_are_the_models_softmax_of_the_evaluation_view(finished, tmp_path):
    _, _, workdir = finished
    files, expected, batch_size = reference_probabilities(workdir)
    out = str(tmp_path / "predictions.csv")
    report = predict.predict(
        files,
        out,
        workdir=workdir,
        checkpoint_name="latest",
        top_k=TOP_K,
        batch_size=batch_size,
        progress=False,
    )
    assert report["predicted"] == len(files) and not report["unreadable"]
    rows = read_rows(out)
    assert [row["file"] for row in rows] == files
    names = workdirs.read_classes(workdir)["names"]
    order = np.argsort(-expected, axis=1, kind="stable")[:, :TOP_K]
    for row, probabilities, ranked in zip(rows, expected, order, strict=True):
        written = [float(row[f"prob_{rank + 1}"]) for rank in range(TOP_K)]
        np.testing.assert_allclose(written, probabilities[ranked], rtol=0, atol=1e-6)
        assert row["class_1"] == names[int(np.argmax(probabilities))]
        assert [row[f"class_{rank + 1}"] for rank in range(TOP_K)] == [names[i] for i in ranked]
        assert row["error"] == ""


def test_run_saves_its_class_names(finished):
    _, data_dir, workdir = finished
    classes = workdirs.read_classes(workdir)
    assert classes == {"num_classes": 3, "names": sorted(os.listdir(data_dir))}


def test_command_lists_unreadable_files_and_predicts_the_others(finished, tmp_path):
    _, data_dir, workdir = finished
    images = tmp_path / "new"
    (images / "sub").mkdir(parents=True)
    good = os.path.join(data_dir, "class_01", "img_000.png")
    shutil.copy(good, images / "good.png")
    shutil.copy(good, images / "sub" / "deep.png")
    with open(good, "rb") as f:
        (images / "truncated.png").write_bytes(f.read()[:60])
    (images / "notes.jpg").write_text("not an image\n")
    (images / ".hidden.png").write_text("hidden files are left out\n")
    readme = tmp_path / "readme.txt"
    readme.write_text("named on the command line\n")
    out = tmp_path / "out" / "predictions.csv"
    done = command_line.run(
        [
            "-m",
            "clca_jax.predict",
            f"--workdir={workdir}",
            f"--images={images},{readme}",
            f"--out={out}",
            "--top_k=5",
            "--batch_size=2",
        ],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["file"]: row for row in read_rows(str(out))}
    bad = [str(images / "notes.jpg"), str(images / "truncated.png"), str(readme)]
    predicted = [str(images / "good.png"), str(images / "sub" / "deep.png")]
    assert sorted(rows) == sorted(bad + predicted)
    for file in bad:
        assert rows[file]["error"] and rows[file]["class_1"] == ""
        assert f"  {file}: " in done.stdout
    assert "3 file(s) could not be read" in done.stdout
    assert "not an image file PIL can read" in rows[str(readme)]["error"]
    assert "truncated" in rows[str(images / "truncated.png")]["error"]
    names = workdirs.read_classes(workdir)["names"]
    for file in predicted:
        row = rows[file]
        assert row["error"] == "" and "prob_4" not in row  # top_k=5 is cut to the 3 classes
        probabilities = [float(row[f"prob_{rank}"]) for rank in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert sorted(row[f"class_{rank}"] for rank in (1, 2, 3)) == names
    # The same image gives the same prediction wherever it lies.
    assert rows[predicted[0]] | {"file": ""} == rows[predicted[1]] | {"file": ""}


def test_command_refuses_an_existing_out_and_leaves_it(finished, tmp_path):
    _, data_dir, workdir = finished
    out = tmp_path / "predictions.csv"
    out.write_text("keep me\n")
    args = [
        "-m",
        "clca_jax.predict",
        f"--workdir={workdir}",
        f"--images={os.path.join(data_dir, 'class_00')}",
        f"--out={out}",
    ]
    done = command_line.run(args, cwd=str(tmp_path), tmp=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --out={out} already exists")
    assert out.read_text() == "keep me\n"
    done = command_line.run([*args, "--overwrite"], cwd=str(tmp_path), tmp=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_rows(str(out))) == 10
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


def test_converted_model_predicts_class_ids_and_says_so(finished, tmp_path):
    _, data_dir, workdir = finished
    config = workdirs.read_run_config(workdir)
    state, _ = restore_state(config, workdir)
    model_dir = str(tmp_path / "converted")
    pretrained.save_pretrained(model_dir, jax.device_get(state.variables()), config.model)
    images = os.path.join(data_dir, "class_02")
    from_workdir, from_model = str(tmp_path / "workdir.csv"), str(tmp_path / "model.csv")
    options = {"top_k": 3, "batch_size": 4, "progress": False}
    predict.predict([images], from_workdir, workdir=workdir, checkpoint_name="latest", **options)
    done = command_line.run(
        [
            "-m",
            "clca_jax.predict",
            f"--model={model_dir}",
            f"--images={images}",
            f"--out={from_model}",
            "--top_k=3",
            "--batch_size=4",
        ],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no class names: the CSV holds class ids" in done.stdout
    names = workdirs.read_classes(workdir)["names"]
    for by_name, by_id in zip(read_rows(from_workdir), read_rows(from_model), strict=True):
        for rank in (1, 2, 3):
            assert by_name[f"class_{rank}"] == names[int(by_id[f"class_{rank}"])]
            assert float(by_id[f"prob_{rank}"]) == pytest.approx(
                float(by_name[f"prob_{rank}"]), abs=1e-6
            )


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "give one of --workdir"),
        (["--workdir=W", "--model=M"], "give one of --workdir"),
        (["--workdir=W", "--exported=E"], "give one of --workdir"),
        (["--exported=nowhere"], "--exported="),
        (["--workdir=W", "--top_k=0"], "--top_k=0 must be at least 1"),
        (["--workdir=W", "--images=missing.png"], "--images: missing.png does not exist"),
    ],
)
def test_bad_flags_are_one_error_line(flags, message, finished, tmp_path):
    _, data_dir, workdir = finished
    flags = [flag.replace("=W", f"={workdir}") for flag in flags]
    if not any(flag.startswith("--images") for flag in flags):
        flags.append(f"--images={data_dir}")
    done = command_line.run(
        ["-m", "clca_jax.predict", *flags, f"--out={tmp_path / 'p.csv'}"],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in done.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def exported_run(finished, tmp_path_factory):
    """The finished run's latest checkpoint exported to StableHLO and ONNX."""
    _, _, workdir = finished
    out = str(tmp_path_factory.mktemp("exported") / "export")
    export.export(out, workdir=workdir, checkpoint_name="latest")
    return out


@pytest.mark.parametrize("target", ["folder", exported.ONNX_FILE, exported.STABLEHLO_FILE])
def test_an_export_predicts_what_its_workdir_predicts(target, finished, exported_run, tmp_path):
    _, data_dir, workdir = finished
    images = [os.path.join(data_dir, "class_01"), os.path.join(data_dir, "class_02")]
    from_workdir, from_export = str(tmp_path / "workdir.csv"), str(tmp_path / "export.csv")
    predict.predict(
        images, from_workdir, workdir=workdir, checkpoint_name="latest", top_k=3, progress=False
    )
    path = exported_run if target == "folder" else os.path.join(exported_run, target)
    done = command_line.run(
        [
            "-m",
            "clca_jax.predict",
            f"--exported={path}",
            f"--images={','.join(images)}",
            f"--out={from_export}",
            "--top_k=3",
            "--batch_size=3",
        ],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kind = "stablehlo" if target == exported.STABLEHLO_FILE else "onnx"
    assert f"{kind} export" in done.stderr  # the log names what ran
    expected, written = read_rows(from_workdir), read_rows(from_export)
    assert [row["file"] for row in written] == [row["file"] for row in expected]
    for want, got in zip(expected, written, strict=True):
        assert [got[f"class_{r}"] for r in (1, 2, 3)] == [want[f"class_{r}"] for r in (1, 2, 3)]
        np.testing.assert_allclose(
            [float(got[f"prob_{r}"]) for r in (1, 2, 3)],
            [float(want[f"prob_{r}"]) for r in (1, 2, 3)],
            rtol=0,
            atol=1e-5,
        )
        assert got["error"] == ""


def _damage(export_dir: str, how: str) -> str:
    if how == "no_info":
        os.remove(os.path.join(export_dir, exported.INFO_FILE))
    elif how == "onnx_garbage":
        with open(os.path.join(export_dir, exported.ONNX_FILE), "wb") as f:
            f.write(b"not a protobuf" * 10)
    elif how == "stablehlo_garbage":
        with open(os.path.join(export_dir, exported.STABLEHLO_FILE), "wb") as f:
            f.write(b"\x00\x01garbage")
        return os.path.join(export_dir, exported.STABLEHLO_FILE)
    else:  # a field of export.json removed or changed
        path = os.path.join(export_dir, exported.INFO_FILE)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        field, value = how.split("=")
        section, _, key = field.rpartition(".")
        target = info[section] if section else info
        if value == "missing":
            del target[key]
        else:
            target[key] = json.loads(value)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(info, f)
    return export_dir


@pytest.mark.parametrize(
    "how, message",
    [
        ("no_info", "is not an export directory"),
        ("onnx_garbage", "cannot be loaded by ONNX Runtime"),
        ("stablehlo_garbage", "cannot be read as a jax.export serialisation"),
        ("input.crop=missing", "input.crop is None, not a positive integer"),
        ("input.crop=40", "input.shape is"),
        ("input.std=[0, 1, 1]", "has a value that is not positive"),
        ('class_names=["a"]', "class_names is not null or a list of 3 strings"),
        ('formats=["tflite"]', "formats is"),
    ],
)
def test_a_damaged_export_is_one_error_line(how, message, finished, exported_run, tmp_path):
    _, data_dir, _ = finished
    copy = str(tmp_path / "copy")
    shutil.copytree(exported_run, copy)
    path = _damage(copy, how)
    out = tmp_path / "p.csv"
    done = command_line.run(
        [
            "-m",
            "clca_jax.predict",
            f"--exported={path}",
            f"--images={data_dir}",
            f"--out={out}",
        ],
        cwd=str(tmp_path),
        tmp=str(tmp_path),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not out.exists()
