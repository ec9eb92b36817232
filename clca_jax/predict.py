"""Predicts the classes of new images with a trained workdir or a converted model.

    # a training workdir: its best checkpoint (--checkpoint=latest for the latest)
    python -m clca_jax.predict --workdir=runs/folder_tiny --images=NEW_IMAGES --out=predictions.csv
    # a converted model directory (clca-convert --out DIR)
    python -m clca_jax.predict --model=pretrained/clca_soyglobal --images=a.jpg,b.jpg --top_k=3
    # an export folder of clca_jax.export (ONNX Runtime), or one of its files
    python -m clca_jax.predict --exported=exported/folder_tiny --images=NEW_IMAGES

`--images` takes files and folders (searched recursively for image files, hidden ones left
out, as the folder route of training does). Each image is preprocessed as evaluation does it
(`clca_jax.data.pipeline.preprocess_eval`: resize, centre crop, normalise) and the model runs in
batches of `--batch_size`. The CSV (`--out`, written whole or not at all; an existing file is
kept unless `--overwrite`) has one row per image in the order found: `file`, then `class_i` and
`prob_i` for the `--top_k` most probable classes, then `error`. A file that cannot be read or
decoded does not stop the run: its row holds only the reason in `error`, and the files are
listed at the end. The class names are the ones training saved (`WORKDIR/classes.json`); data
without names (the csv route, a converted model) gives class ids, and the command says so.

`--exported` runs an export instead of the model code: `model.onnx` in ONNX Runtime (the
folder's default; the `export` extra) or `model.stablehlo` with jax when that file is named or
is the only one. Size, normalisation and class names come from the folder's `export.json`, so
the CSV is the one the workdir would give, within the export's checked tolerance.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging

from clca_jax import commands, evaluate, exported, pretrained, user_errors
from clca_jax.data import folder, pipeline, records
from clca_jax.models import VisionTransformer, create_model
from clca_jax.training import evaluation, sharding, workdirs
from clca_jax.training import metrics as metrics_lib
from clca_jax.training.config import default_config

# ----------------------------------------------------------------------------------------------
# The images.


def find_images(paths: Sequence[str]) -> list[str]:
    """The files to predict: each file as given, each folder's image files (recursively,
    sorted, hidden ones left out), in the order of `paths`.

    Raises:
      ValueError: no path given, a path does not exist, or nothing is found.
    """
    if not paths:
        raise ValueError("--images is empty; name image files or folders (comma-separated).")
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [os.path.join(path, f) for f in folder.image_files(path)]
        elif os.path.lexists(path):
            found.append(path)
        else:
            raise ValueError(f"--images: {path} does not exist; name image files or folders.")
    if not found:
        raise ValueError(
            f"--images={','.join(paths)} holds no image file (extensions "
            f"{list(records.IMAGE_EXTENSIONS)})."
        )
    return found


def read_image(path: str, img_size: int, norm: pipeline.Normalizer) -> np.ndarray | str:
    """The evaluation view of one image file, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            encoded = f.read()
        return pipeline.preprocess_eval(records.ImageRecord(encoded, 0, path), img_size, norm)
    except records.BadImageError as error:
        # PIL's own words name its in-memory buffer (`<_io.BytesIO object at 0x...>`).
        if error.reason.startswith("cannot identify image file"):
            return "not an image file PIL can read"
        return error.reason
    except OSError as error:
        return error.strerror or str(error)


def read_batches(
    paths: Sequence[str], batch_size: int, read, threads: int
) -> Iterator[list[np.ndarray | str]]:
    """`read(path)` of each path, `batch_size` at a time, on `threads` threads; the next batch
    is read while the caller works on the current one."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = None
        for start in range(0, len(paths), batch_size):
            submitted = [pool.submit(read, p) for p in paths[start : start + batch_size]]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = submitted
        if pending is not None:
            yield [f.result() for f in pending]


# ----------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class Predictor:
    """A model ready to predict.

    Attributes:
      model: the model.
      variables: its variables on the mesh.
      class_names: names by class id, or None when the model has none.
      seed: seeds the token-reduction noise as evaluation does.
      source: what was loaded, for the log.
    """

    model: VisionTransformer
    variables: dict
    class_names: list[str] | None
    seed: int
    source: str


def load_predictor(
    workdir: str | None, model_dir: str | None, which: str, mesh: jax.sharding.Mesh
) -> Predictor:
    """The model of a training workdir (its `which` checkpoint) or of a converted model.

    Raises:
      ValueError, FileNotFoundError: not exactly one of the two, or it cannot be read.
    """
    if bool(workdir) == bool(model_dir):
        raise ValueError(
            "give one of --workdir (a training workdir) or --model (a converted model "
            f"directory); got --workdir={workdir!r} and --model={model_dir!r}."
        )
    if model_dir:
        directory = os.path.abspath(os.path.expanduser(model_dir))
        if not pretrained.is_converted_model(directory):
            raise FileNotFoundError(
                f"--model={model_dir} is not a converted model directory (no "
                f"{pretrained.VARIABLES_DIR}/ in it); for a training workdir use --workdir."
            )
        model, variables = pretrained.load_pretrained(directory)
        host = jax.tree.map(jax.device_get, variables)
        placed = sharding.host_to_global(host, sharding.tree_shardings(host, mesh))
        return Predictor(model, placed, None, default_config().seed, f"converted model {directory}")
    directory = os.path.abspath(os.path.expanduser(workdir))
    config = workdirs.read_run_config(directory)
    model = create_model(config.model)
    variables, step = evaluate.load_variables(directory, which, model, mesh)
    classes = workdirs.read_classes(directory)
    names = classes["names"] if classes else None
    source = f"{which} checkpoint (step {step}) of {directory}"
    return Predictor(model, variables, names, config.seed, source)


@dataclasses.dataclass
class Classifier:
    """What `predict_images` runs: the input it takes and the top-k of a batch.

    Attributes:
      img_size: the crop size the evaluation view is made at.
      normalization: (mean, std) of the evaluation view.
      num_classes: the class count.
      class_names: names by class id, or None.
      source: what was loaded, for the log.
      top_k: `(images [b, S, S, 3] float32, batch index, k) -> (probabilities, class ids)`,
        each [b, k] as NumPy arrays, most probable first.
      batch_multiple: batch sizes must be a multiple of this (the devices a model is sharded
        over; 1 for an export).
    """

    img_size: int
    normalization: tuple[Sequence[float], Sequence[float]]
    num_classes: int
    class_names: list[str] | None
    source: str
    top_k: Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
    batch_multiple: int = 1


def model_classifier(predictor: Predictor, mesh: jax.sharding.Mesh) -> Classifier:
    """The `Classifier` of a loaded model: `predict_step` jitted over the mesh (one compile per
    k)."""
    model = predictor.model
    batch_sharding = sharding.batch_sharding(mesh)
    rng = evaluation.eval_key(predictor.seed)
    steps = {}

    def top_k(images: np.ndarray, index: int, k: int):
        if k not in steps:
            steps[k] = jax.jit(
                functools.partial(predict_step, model=model, top_k=k),
                in_shardings=(
                    sharding.tree_shardings(predictor.variables, mesh),
                    batch_sharding,
                    sharding.replicated(mesh),
                    sharding.replicated(mesh),
                ),
            )
        batch = sharding.global_batch({"image": images}, batch_sharding)["image"]
        return jax.device_get(steps[k](predictor.variables, batch, np.int32(index), rng))

    return Classifier(
        img_size=model.img_size,
        normalization=model.input_normalization,
        num_classes=model.num_classes,
        class_names=predictor.class_names,
        source=predictor.source,
        top_k=top_k,
        batch_multiple=mesh.size,
    )


def exported_classifier(path: str) -> Classifier:
    """The `Classifier` of an export folder (its ONNX file, else its StableHLO file) or of one
    of its files.

    Raises:
      FileNotFoundError, ValueError: not an export, its file is missing or unreadable, or the
        runtime it needs is not installed.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--exported={path} does not exist.")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    info = exported.read_info(directory)
    if os.path.isdir(path):
        # ONNX Runtime when it is installed, else (or for a StableHLO-only export) jax.
        fmt = "onnx" if "onnx" in info["formats"] else "stablehlo"
        if fmt == "onnx" and "stablehlo" in info["formats"] and not _has_onnxruntime():
            logging.info("ONNX Runtime is not installed: running %s.", exported.STABLEHLO_FILE)
            fmt = "stablehlo"
    else:
        fmt = {name: f for f, name in exported.FILES.items()}.get(os.path.basename(path))
        if fmt is None:
            raise ValueError(
                f"--exported={path} is neither an export folder nor one of its files "
                f"({', '.join(exported.FILES.values())})."
            )
    run = exported.load(directory, fmt)
    spec = info["input"]
    size = spec["crop"]
    if spec["resize"] != pipeline.resize_size(size):
        raise ValueError(
            f"{directory}/{exported.INFO_FILE}: resize {spec['resize']} for crop {size} is not "
            f"this version's evaluation view ({pipeline.resize_size(size)}); export again."
        )

    def top_k(images: np.ndarray, index: int, k: int):
        del index  # an export has no evaluation noise
        logits = np.asarray(run(images), np.float64)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
        classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        return np.take_along_axis(probabilities, classes, axis=-1), classes

    return Classifier(
        img_size=size,
        normalization=(spec["mean"], spec["std"]),
        num_classes=info["num_classes"],
        class_names=info.get("class_names"),
        source=f"{fmt} export {os.path.join(directory, exported.FILES[fmt])}",
        top_k=top_k,
    )


def _has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def predict_step(variables, images, index, rng, *, model, top_k: int):
    """The `top_k` most probable classes of a batch: (probabilities, class ids), each [b, k]."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), index)
    logits, _, _ = evaluation.apply_model(model, variables, images, train=False, key=key)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probabilities, top_k)


# ----------------------------------------------------------------------------------------------
# The command.


def predict_images(
    classifier: Classifier,
    paths: Sequence[str],
    *,
    top_k: int,
    batch_size: int,
    progress: bool = True,
) -> list[tuple[list[tuple[int, float]], str]]:
    """Top-k predictions of each image file.

    Returns:
      One `(predictions, error)` per path: `(class id, probability)` pairs, most probable
      first, and '' for an image that was read; `[]` and the reason for one that was not.
    """
    if batch_size % classifier.batch_multiple:
        raise ValueError(
            f"--batch_size={batch_size} does not split over the {classifier.batch_multiple} "
            f"devices; use a multiple of {classifier.batch_multiple}."
        )
    norm = pipeline.Normalizer(*classifier.normalization)  # as evaluation normalises
    size = classifier.img_size
    threads = pipeline.default_threads(0)
    results = []
    bar = tqdm.tqdm(
        total=len(paths), unit="image", file=sys.stderr, ascii=True, disable=not progress
    )
    with bar:
        batches = read_batches(paths, batch_size, lambda p: read_image(p, size, norm), threads)
        for index, read in enumerate(batches):
            images = np.zeros((batch_size, size, size, 3), np.float32)  # padding: one shape
            for slot, item in enumerate(read):
                if not isinstance(item, str):
                    images[slot] = item
            probabilities, classes = classifier.top_k(images, index, top_k)
            for slot, item in enumerate(read):
                if isinstance(item, str):
                    results.append(([], item))
                else:
                    pairs = zip(classes[slot].tolist(), probabilities[slot].tolist(), strict=True)
                    results.append((list(pairs), ""))
            bar.update(len(read))
    return results


def check_out(out: str, overwrite: bool) -> str:
    """The absolute path of the CSV to write; refuses an existing file unless `overwrite`."""
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(path):
        raise ValueError(f"--out={out} is a folder; name the CSV file to write.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"--out={out} already exists; nothing was written. Pass --overwrite to replace it, "
            "or choose another file."
        )
    return path


def write_csv(
    path: str,
    paths: Sequence[str],
    results: Sequence[tuple[list[tuple[int, float]], str]],
    top_k: int,
    class_names: list[str] | None,
) -> None:
    """Writes the predictions' CSV whole or not at all (a temporary file, then a rename)."""
    header = ["file"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"prob_{rank}"]
    header.append("error")
    folder_name = os.path.dirname(path)
    os.makedirs(folder_name, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder_name, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for file, (pairs, error) in zip(paths, results, strict=True):
                row = [file]
                for class_id, probability in pairs:
                    row += [
                        class_names[class_id] if class_names else class_id,
                        f"{probability:.9g}",
                    ]
                row += [""] * (2 * (top_k - len(pairs))) + [error]
                writer.writerow(row)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def predict(
    images: Sequence[str],
    out: str,
    *,
    workdir: str | None = None,
    model_dir: str | None = None,
    exported_path: str | None = None,
    checkpoint_name: str = "best",
    top_k: int = 5,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Predicts `images` with a workdir's or a converted model's model, or with an export, and
    writes `out`.

    Returns:
      `predicted` (images read), `unreadable` (`(file, reason)` pairs), `top_k` (as written,
      at most the class count), `class_names` (False when the CSV holds class ids) and `out`.

    Raises:
      ValueError, OSError: a flag, the model or `out` is unusable; nothing is written then.
    """
    for name, value in (("--top_k", top_k), ("--batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    given = [
        name
        for name, v in (
            ("--workdir", workdir),
            ("--model", model_dir),
            ("--exported", exported_path),
        )
        if v
    ]
    if len(given) != 1:
        raise ValueError(
            "give one of --workdir (a training workdir), --model (a converted model directory) "
            f"or --exported (an export folder or file); got {', '.join(given) or 'none'}."
        )
    path = check_out(out, overwrite)
    paths = find_images(images)
    metrics_lib.quiet_library_logs()
    if exported_path:
        classifier = exported_classifier(exported_path)
    else:
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
        classifier = model_classifier(
            load_predictor(workdir, model_dir, checkpoint_name, mesh), mesh
        )
    logging.info("Predicting %d file(s) with the %s.", len(paths), classifier.source)
    num_classes = classifier.num_classes
    if top_k > num_classes:
        logging.info(
            "--top_k=%d: the model has %d classes; writing %d.", top_k, num_classes, num_classes
        )
        top_k = num_classes
    results = predict_images(
        classifier, paths, top_k=top_k, batch_size=batch_size, progress=progress
    )
    write_csv(path, paths, results, top_k, classifier.class_names)
    unreadable = [(p, error) for p, (_, error) in zip(paths, results, strict=True) if error]
    return {
        "predicted": len(paths) - len(unreadable),
        "unreadable": unreadable,
        "top_k": top_k,
        "class_names": classifier.class_names is not None,
        "out": path,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    with user_errors.reported(FLAGS.debug):
        report = predict(
            FLAGS.images,
            FLAGS.out,
            workdir=FLAGS.workdir,
            model_dir=FLAGS.model,
            exported_path=FLAGS.exported,
            checkpoint_name=FLAGS.checkpoint,
            top_k=FLAGS.top_k,
            batch_size=FLAGS.batch_size,
            overwrite=FLAGS.overwrite,
        )
    if not report["class_names"]:
        print("The model has no class names: the CSV holds class ids (0 .. C-1).")
    print(f"Predicted {report['predicted']} image(s): top-{report['top_k']} in {report['out']}.")
    if report["unreadable"]:
        print(f"{len(report['unreadable'])} file(s) could not be read (the `error` column):")
        for file, reason in report["unreadable"]:
            print(f"  {file}: {reason}")


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "A training workdir to predict with.")
    flags.DEFINE_string("model", None, "Instead of --workdir: a converted model directory.")
    flags.DEFINE_string(
        "exported",
        None,
        "Instead of --workdir: an export folder of clca_jax.export (its model.onnx in ONNX "
        "Runtime) or one of its files (model.onnx, model.stablehlo).",
    )
    flags.DEFINE_enum(
        "checkpoint", "best", ["best", "latest"], "Which checkpoint of a training workdir."
    )
    flags.DEFINE_list(
        "images", None, "Image files and folders (searched recursively), comma-separated."
    )
    flags.DEFINE_string("out", "predictions.csv", "The CSV file to write.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
    flags.DEFINE_integer("top_k", 5, "How many of the most probable classes to write.")
    flags.DEFINE_integer("batch_size", 32, "Images per batch.")
    flags.DEFINE_bool("debug", False, "Show the traceback of a workdir, model or file error.")


def cli() -> None:
    """`python -m clca_jax.predict`, the `clca-predict` command."""
    define_flags()
    commands.run(main, doc=__doc__)


if __name__ == "__main__":
    cli()
