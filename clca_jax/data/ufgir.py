"""TFDS builders for the five Ultra-FGVC leaf datasets (manual download), read without TF.

Each builder reads, from a manual directory (`data.dir`):

* the dataset's images, either extracted (`<dir>/<image folder>/...`, also found one or two
  folder levels deeper) or as the `.zip` / `.tar[.gz]` archive left in `<dir>`, which is then
  extracted once under `<tfds_dir>/downloads/manual_extracted/`;
* the split files of spec 7 in `<dir>`: `train_val.csv` and `test.csv` (required),
  `train.csv` and `val.csv` (carved from `train_val.csv` as spec 6.3 when absent) and any
  sub-split file such as SoyAgeing's `train_val_R1.csv` / `test_R1.csv` or SoyGene's
  `train_val_1.csv`. Columns `dir,class_id`; the image of a row is `<image folder>/<dir>`.

Before writing anything the builder checks that every listed file exists (listing the missing
ones), that labels lie in `0..C-1` with no empty class, that `train` + `val` equal `train_val`,
and (unless `check_published_counts=False`, for subsets) that the class count and the
`train_val` / `test` sizes are the benchmark's published figures. Every image is decoded once
while it is written: a broken file stops preparation with its name, or with
`skip_bad_images=True` is left out and listed in the log.

The prepared data records its source (`metadata.json`, key `source`): the SHA-256 of every
split file, the size and modification time of every listed image (or of the archives, when the
images are only there) and the preparation settings. Each later use compares that record with
`data.dir` (one `stat` per image, no image read); on any difference the dataset is prepared
again in `<tfds_dir>/.ufgir_<name>.staging` and swapped in only when complete, so a failed
preparation leaves the old data as it was. Like the first preparation, run it in one process.

Storage choices, all checked with tensorflow-datasets 4.9.10 and TensorFlow not installed:

* `download_and_prepare` works without TF for a `GeneratorBasedBuilder` written in
  `file_format='array_record'`, and `as_data_source` reads it back with random access.
* Images are stored as the original encoded bytes in a scalar `Tensor(dtype=object)` feature,
  not a `tfds.features.Image`: the Image feature decodes on read with a fixed channel count
  (grayscale files would not become RGB) and its errors do not name the file. The pipeline
  decodes with PIL and converts to RGB itself. The file's relative path is stored too, so a
  decoding error names it.
* `disable_shuffling=True` keeps CSV row order in the written files (record i = row i); the
  training pipeline shuffles on its own.
* The label is a plain int64 scalar and the class count lives in the dataset's metadata, since
  the count is only known once the CSV files are read.

Preparing on a pod: run `python -m clca_jax.data.prepare --dataset=soygene --manual_dir=DIR
--tfds_dir=DIR` once before training, so that hosts do not prepare concurrently.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds

from clca_jax.data import records, splits
from clca_jax.data.splits import DataError, SplitList

_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Split files the builders pick up: the four standard ones and their sub-split variants.
_SPLIT_FILE = re.compile(r"^(train|val|train_val|test)(_\w+)?\.csv$")
_REQUIRED_SPLITS = ("train_val", "test")


@dataclasses.dataclass(frozen=True)
class LeafDataset:
    """Published facts of one leaf dataset (spec 7).

    Attributes:
      name: config name (`data.name`).
      title: the benchmark's name for it.
      image_folder: folder the CSV `dir` values are relative to (`.` = the dataset root).
      num_classes: published class count.
      num_train_val: published `train_val` size.
      num_test: published `test` size.
      sub_splits: the extra split files the reference configs use, for the instructions.
    """

    name: str
    title: str
    image_folder: str
    num_classes: int
    num_train_val: int
    num_test: int
    sub_splits: tuple[str, ...] = ()


LEAF_DATASETS = {
    d.name: d
    for d in (
        LeafDataset("cotton", "Cotton80", "cotton_square_new", 80, 240, 240),
        LeafDataset("soylocal", "SoyLocal", "soybean200_square", 200, 600, 600),
        LeafDataset(
            "soygene",
            "SoyGene",
            "images",
            1110,
            12763,
            11143,
            ("train_val_1", "train_val_2", "train_val_4", "train_val_8"),
        ),
        LeafDataset(
            "soyageing",
            "SoyAgeing",
            ".",
            198,
            4950,
            4950,
            tuple(f"{s}_R{r}" for r in (1, 3, 4, 5, 6) for s in ("train_val", "test")),
        ),
        LeafDataset("soyglobal", "SoyGlobal", "soybean2000", 1938, 5814, 5814),
    )
}


def manual_instructions(leaf: LeafDataset) -> str:
    """The text a user reads when the manual directory is missing or incomplete."""
    folder = "the dataset root" if leaf.image_folder == "." else f"`{leaf.image_folder}/`"
    sub = f" Optional sub-split files: {', '.join(s + '.csv' for s in leaf.sub_splits)}." * bool(
        leaf.sub_splits
    )
    return (
        f"{leaf.title} ({leaf.num_classes} classes, {leaf.num_train_val} train_val / "
        f"{leaf.num_test} test images) must be downloaded by hand into the manual directory "
        f"(data.dir):\n"
        f"1. Images: get the {leaf.title} part of the Ultra-FGVC benchmark (Yu et al., ICCV "
        "2021, https://github.com/XiaohanYu-GU/Ultra-FGVC). Either extract it so that "
        f"data.dir holds {folder} with the images the CSV `dir` column names, or leave the "
        ".zip / .tar / .tar.gz archive in data.dir (it is extracted on first use).\n"
        "2. Split files: put train_val.csv and test.csv (columns class_id,dir), and if you have "
        f"them train.csv and val.csv, from the CLCA / FGIR code's `data/{leaf.name}/` folder "
        "into data.dir; without train.csv / val.csv they are carved from train_val.csv "
        f"(first 80 % of each class).{sub}"
    )


class UfgirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder of the leaf datasets; each subclass names its `LeafDataset`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded images, CSV splits of spec 7, record order = CSV order."}
    LEAF: LeafDataset

    def __init__(self, *, skip_bad_images: bool = False, check_published_counts: bool = True, **kw):
        """Creates the builder.

        Args:
          skip_bad_images: leave out undecodable images (listed in the log) instead of failing.
          check_published_counts: compare class count and split sizes with spec 7.
          **kw: `tfds.core.DatasetBuilder` arguments (`data_dir`, `file_format`, ...).
        """
        self.skip_bad_images = skip_bad_images
        self.check_published_counts = check_published_counts
        super().__init__(**kw)

    @property
    def options(self) -> dict[str, bool]:
        """The settings that change what is stored, recorded with the source.

        `check_published_counts` stores nothing different (it passes or stops), so it is not
        among them; `prepare` checks the counts again when a prepared dataset is reused.
        """
        return {"skip_bad_images": self.skip_bad_images}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Ultra-FGVC {self.LEAF.title}, splits from the CLCA CSV files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "file": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            homepage="https://github.com/XiaohanYu-GU/Ultra-FGVC",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        lists = read_leaf_lists(manual_dir, self.LEAF)
        # Taken before any image is read, so a file changed while preparing shows next time.
        self.info.metadata["source"] = source_record(manual_dir, self.LEAF, lists, self.options)
        num_classes = self._check_lists(lists)
        extract_dir = os.path.join(os.fspath(dl_manager.download_dir), "manual_extracted")
        image_root = find_image_root(manual_dir, self.LEAF, lists["test"][0][0], extract_dir)
        splits.check_files_exist(image_root, lists, skip_broken_links=self.skip_bad_images)
        self.info.metadata["num_classes"] = num_classes
        # The class count of a run is that of its training split (spec 6.3), which for a
        # sub-split may be smaller; these let the loader check that without reading records.
        self.info.metadata["split_classes"] = {
            name: {"distinct": splits.count_classes(rows), "max_label": max(c for _, c in rows)}
            for name, rows in lists.items()
        }
        return {name: self._generate_examples(image_root, rows) for name, rows in lists.items()}

    def _check_lists(self, lists: dict[str, SplitList]) -> int:
        """Runs the label and count checks; returns the class count."""
        where = f"{self.LEAF.title} split files"
        num_classes = splits.count_classes(lists["train_val"])
        if self.check_published_counts:
            check_published_counts(self.LEAF, lists)
        splits.check_labels(lists, "train_val", num_classes, where)
        check_carve_consistent(lists, where)
        return num_classes

    def _generate_examples(self, image_root: str, rows: SplitList):
        source = records.FileSource(image_root, rows)
        skipped = []
        for index, (path, label) in enumerate(rows):
            try:
                record = source[index]
                records.decode_rgb(record)
            except records.BadImageError as err:
                if not self.skip_bad_images:
                    raise
                skipped.append((index, err.path, err.reason))
                continue
            yield index, {"image": record.image, "file": path, "label": label}
        records.log_skipped(skipped, f"{self.LEAF.title} ({image_root})")


def _leaf_builder(leaf: LeafDataset) -> type[UfgirBuilder]:
    """Makes the registered builder class of one leaf dataset (TFDS name `ufgir_<name>`)."""
    return type(
        f"Ufgir{leaf.name.capitalize()}",
        (UfgirBuilder,),
        {
            "LEAF": leaf,
            "MANUAL_DOWNLOAD_INSTRUCTIONS": manual_instructions(leaf),
            "__module__": __name__,
            "__doc__": f"Ultra-FGVC {leaf.title} from a manual directory.",
        },
    )


BUILDERS = {name: _leaf_builder(leaf) for name, leaf in LEAF_DATASETS.items()}


def read_leaf_lists(manual_dir: str, leaf: LeafDataset) -> dict[str, SplitList]:
    """Reads every split file of `manual_dir`, carving train/val when they are absent.

    Args:
      manual_dir: the manual directory.
      leaf: which dataset, for the error message.

    Returns:
      Split lists by split name.
    """
    names = [f[: -len(".csv")] for f in split_file_names(manual_dir)]
    missing = [f"{name}.csv" for name in _REQUIRED_SPLITS if name not in names]
    if missing:
        raise DataError(
            f"{manual_dir} lacks the split file(s) {missing} (found: "
            f"{[n + '.csv' for n in names]}).\n{manual_instructions(leaf)}"
        )
    lists = {name: splits.read_split_csv(os.path.join(manual_dir, f"{name}.csv")) for name in names}
    for name in ("train", "val"):
        if name not in lists:
            logging.info("%s: no %s.csv, carving it from train_val.csv", leaf.title, name)
            lists[name] = splits.resolve_split(name, lists, manual_dir)
    return lists


def split_file_names(manual_dir: str) -> list[str]:
    """The split files of `manual_dir` the builders read, sorted."""
    return sorted(f for f in os.listdir(manual_dir) if _SPLIT_FILE.match(f))


def source_record(
    manual_dir: str, leaf: LeafDataset, lists: dict[str, SplitList], options: dict[str, bool]
) -> dict:
    """What a prepared dataset is made from, cheap to take again: no image is read.

    Args:
      manual_dir: the manual directory.
      leaf: which dataset.
      lists: the split lists read from `manual_dir`.
      options: the builder's preparation settings.

    Returns:
      A JSON-able dict: the folder (for messages only), the SHA-256 of every split file, and
      either the count and a digest of `(path, size, mtime)` of every listed image, or, when
      the images are only in archives, the archives' sizes and modification times.
    """
    split_files = {}
    for name in split_file_names(manual_dir):
        with open(os.path.join(manual_dir, name), "rb") as f:
            split_files[name] = hashlib.sha256(f.read()).hexdigest()
    listed = sorted({path for rows in lists.values() for path, _ in rows})
    root = _search_image_root(manual_dir, leaf.image_folder, lists["test"][0][0])
    if root is None:
        images = {
            "archives": {a: _stat(os.path.join(manual_dir, a)) for a in _archives(manual_dir)}
        }
    else:
        digest = hashlib.sha256()
        for path in listed:
            digest.update(json.dumps([path, _stat(os.path.join(root, path))]).encode())
        images = {"count": len(listed), "digest": digest.hexdigest()}
    return {
        "dir": os.path.abspath(manual_dir),
        "split_files": split_files,
        "images": images,
        "options": options,
    }


def _stat(path: str) -> list[int] | None:
    """`[size, mtime_ns]` of a file (following links), None when it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def source_differences(recorded: dict | None, current: dict) -> list[str]:
    """How the source a dataset was prepared from differs from the current one (short phrases)."""
    if recorded is None:
        return ["it was prepared without a record of its source"]
    differences = []
    old_files, new_files = recorded["split_files"], current["split_files"]
    for what, names in (
        ("changed", [n for n in new_files if n in old_files and new_files[n] != old_files[n]]),
        ("added", [n for n in new_files if n not in old_files]),
        ("removed", [n for n in old_files if n not in new_files]),
    ):
        if names:
            differences.append(f"split files {what}: {', '.join(names)}")
    old_images, new_images = recorded["images"], current["images"]
    if old_images != new_images:
        if "count" in old_images and "count" in new_images:
            differences.append(
                f"listed images: {old_images['count']} then, {new_images['count']} now, with "
                "other sizes or modification times"
            )
        else:
            differences.append("the image files or archives differ")
    for option, value in current["options"].items():
        if recorded["options"].get(option) != value:
            differences.append(f"{option}: {recorded['options'].get(option)} then, {value} now")
    return differences


def check_published_counts(leaf: LeafDataset, lists: dict[str, SplitList]) -> None:
    """Raises when class count or split sizes differ from the published figures (spec 7)."""
    seen = {
        "classes in train_val.csv": (splits.count_classes(lists["train_val"]), leaf.num_classes),
        "rows of train_val.csv": (len(lists["train_val"]), leaf.num_train_val),
        "rows of test.csv": (len(lists["test"]), leaf.num_test),
    }
    wrong = [
        f"{what}: {got}, published {want}" for what, (got, want) in seen.items() if got != want
    ]
    if wrong:
        raise DataError(
            f"{leaf.title} split files differ from the published benchmark: "
            + "; ".join(wrong)
            + ". Use the official split files, or set data.check_published_counts=False to "
            "prepare a subset on purpose."
        )


def check_carve_consistent(lists: dict[str, SplitList], where: str) -> None:
    """Raises when `train` and `val` together are not exactly the rows of `train_val`."""
    union = collections.Counter(lists["train"]) + collections.Counter(lists["val"])
    whole = collections.Counter(lists["train_val"])
    if union != whole:
        extra = sorted((union - whole).elements())
        lacking = sorted((whole - union).elements())
        raise DataError(
            f"{where}: train.csv + val.csv differ from train_val.csv: {len(extra)} row(s) not "
            f"in train_val (e.g. {extra[:3]}), {len(lacking)} train_val row(s) in neither "
            f"(e.g. {lacking[:3]}). Use matching split files, or delete train.csv and val.csv "
            "to carve them from train_val.csv."
        )


def find_image_root(manual_dir: str, leaf: LeafDataset, probe: str, extract_dir: str) -> str:
    """Finds the folder the CSV paths are relative to, extracting archives if needed.

    Args:
      manual_dir: the manual directory.
      leaf: which dataset.
      probe: one CSV `dir` value that must exist under the folder.
      extract_dir: where archives found in `manual_dir` are extracted.

    Returns:
      The image folder.
    """
    root = _search_image_root(manual_dir, leaf.image_folder, probe)
    archives = _archives(manual_dir)
    if root is None and archives:
        target = os.path.join(extract_dir, leaf.name)
        for archive in archives:
            _extract_once(os.path.join(manual_dir, archive), target)
        root = _search_image_root(target, leaf.image_folder, probe)
    if root is None:
        raise DataError(
            f"{leaf.title} images not found: no folder under {manual_dir} (searched two levels "
            f"deep{', and in the archives ' + str(archives) if archives else ''}) holds "
            f"{os.path.join(leaf.image_folder, probe)!r}, the first image of test.csv.\n"
            f"{manual_instructions(leaf)}"
        )
    return root


def _archives(manual_dir: str) -> list[str]:
    """Names of the archives in `manual_dir`, sorted."""
    return sorted(f for f in os.listdir(manual_dir) if f.lower().endswith(_ARCHIVE_SUFFIXES))


def _search_image_root(base: str, image_folder: str, probe: str, depth: int = 2) -> str | None:
    """Returns `<d>/<image_folder>` for the shallowest `d` under `base` that holds `probe`."""
    level = [base]
    for _ in range(depth + 1):
        for folder in level:
            candidate = os.path.normpath(os.path.join(folder, image_folder))
            # lexists: a broken link is found here and reported as such by the file check.
            if os.path.lexists(os.path.join(candidate, probe)):
                return candidate
        level = [
            e.path for d in level for e in sorted(os.scandir(d), key=lambda e: e.name) if e.is_dir()
        ]
    return None


def _extract_once(archive: str, target_root: str) -> None:
    """Extracts `archive` into its own folder under `target_root` unless done before.

    The marker holds the archive's size and modification time, so a replaced archive is
    extracted again.
    """
    name = os.path.basename(archive)
    target = os.path.join(target_root, name)
    done_marker = os.path.join(target, ".extracted")
    stamp = json.dumps(_stat(archive))
    if os.path.exists(done_marker):
        with open(done_marker) as f:
            if f.read() == stamp:
                return
    logging.info("extracting %s to %s", archive, target)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    kwargs = {} if archive.lower().endswith(".zip") else {"filter": "data"}
    shutil.unpack_archive(archive, target, **kwargs)
    with open(done_marker, "w") as f:
        f.write(stamp)


def load_leaf(
    name: str,
    manual_dir: str,
    tfds_dir: str,
    train_split: str,
    eval_split: str,
    skip_bad_images: bool = False,
    check_published_counts: bool = True,
) -> records.LoadedData:
    """Prepares a leaf dataset if needed and returns its train and eval sources.

    Args:
      name: `cotton`, `soylocal`, `soygene`, `soyageing` or `soyglobal`.
      manual_dir: the manual directory (`data.dir`).
      tfds_dir: where prepared TFDS data lives (`data.tfds_dir`).
      train_split: split to train on.
      eval_split: split to evaluate on.
      skip_bad_images: at preparation, leave out undecodable images instead of failing.
      check_published_counts: at preparation, compare counts with the published figures.

    Returns:
      The two splits and the class count (no class names: the datasets have none).
    """
    builder = prepare(name, manual_dir, tfds_dir, skip_bad_images, check_published_counts)
    available = sorted(builder.info.splits.keys())
    for split in (train_split, eval_split):
        if split not in available:
            raise DataError(
                f"{name} has no split {split!r}; prepared splits: {available}. Set "
                "data.train_split / data.eval_split to one of them."
            )
    num_classes = split_class_count(builder, train_split, eval_split)
    return records.LoadedData(
        TfdsSource(builder, train_split), TfdsSource(builder, eval_split), num_classes, None
    )


def split_class_count(builder: UfgirBuilder, train_split: str, eval_split: str) -> int:
    """Class count of a run = distinct labels of its training split; checks eval labels fit.

    Args:
      builder: a prepared leaf builder.
      train_split: split to train on.
      eval_split: split to evaluate on.

    Returns:
      The class count.
    """
    classes = builder.info.metadata["split_classes"]
    num_classes = int(classes[train_split]["distinct"])
    for split in (train_split, eval_split):
        if classes[split]["max_label"] >= num_classes:
            raise DataError(
                f"{builder.name}: split {split!r} has label {classes[split]['max_label']}, "
                f"outside the class range 0..{num_classes - 1} of training split "
                f"{train_split!r} (its distinct class ids). Train on a split that has every "
                "class, such as train_val."
            )
    return num_classes


def prepare(
    name: str,
    manual_dir: str,
    tfds_dir: str,
    skip_bad_images: bool = False,
    check_published_counts: bool = True,
) -> UfgirBuilder:
    """Returns the builder of a leaf dataset, prepared from `manual_dir`.

    A dataset prepared before is used when it was made from the same source: the split files'
    contents, the listed images' sizes and modification times (or the archives') and the
    preparation settings. Otherwise it is prepared again, beside the old one, which is
    replaced only once the new one is complete (so a failure leaves the old one as it was).
    """
    if name not in BUILDERS:
        raise DataError(f"unknown leaf dataset {name!r}; choose one of {sorted(BUILDERS)}.")
    tfds_dir = os.path.expanduser(tfds_dir)
    options = dict(skip_bad_images=skip_bad_images, check_published_counts=check_published_counts)
    builder = _builder(name, tfds_dir, options)
    leaf = LEAF_DATASETS[name]
    if not manual_dir or not os.path.isdir(manual_dir):
        if builder.is_prepared():
            recorded = _recorded_source(builder) or {"dir": "an unrecorded folder"}
            raise DataError(
                f"data.dir = {manual_dir!r} is not a folder, so the {name} data prepared in "
                f"{tfds_dir} (from {recorded['dir']}) cannot be checked against it; set "
                "data.dir to the folder with the images and split files."
            )
        raise DataError(
            f"data.dir = {manual_dir!r} is not a folder and {name} is not prepared in "
            f"{tfds_dir}.\n{manual_instructions(leaf)}"
        )
    if not builder.is_prepared():
        _download_and_prepare(builder, manual_dir, tfds_dir)
        return builder
    lists = read_leaf_lists(manual_dir, leaf)
    current = source_record(manual_dir, leaf, lists, builder.options)
    differences = source_differences(_recorded_source(builder), current)
    if not differences:
        builder._check_lists(lists)  # e.g. the published counts, if skipped when prepared
        return builder
    logging.warning(
        "%s in %s does not match data.dir = %s (%s); preparing it again",
        builder.name,
        tfds_dir,
        manual_dir,
        "; ".join(differences),
    )
    _prepare_again(name, manual_dir, tfds_dir, options)
    return _builder(name, tfds_dir, options)


def _staging_dir(name: str, tfds_dir: str) -> str:
    """Where a dataset is prepared again (one preparation at a time, as for the first)."""
    return os.path.join(tfds_dir, f".ufgir_{name}.staging")


def _builder(name: str, tfds_dir: str, options: dict[str, bool]) -> UfgirBuilder:
    return BUILDERS[name](data_dir=tfds_dir, file_format="array_record", **options)


def _recorded_source(builder: UfgirBuilder) -> dict | None:
    try:
        return builder.info.metadata["source"]
    except KeyError:
        return None


def _download_and_prepare(builder: UfgirBuilder, manual_dir: str, tfds_dir: str) -> None:
    """Prepares `builder`; archives are extracted once under `tfds_dir/downloads`."""
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(
        download_dir=os.path.join(tfds_dir, "downloads"), download_config=config
    )


def _prepare_again(name: str, manual_dir: str, tfds_dir: str, options: dict[str, bool]) -> None:
    """Prepares the dataset in a staging folder, then swaps it for the prepared one."""
    staging = _staging_dir(name, tfds_dir)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed preparation left
    try:
        fresh = _builder(name, staging, options)
        _download_and_prepare(fresh, manual_dir, tfds_dir)
        final = os.fspath(_builder(name, tfds_dir, options).data_dir)
        replaced = os.path.join(staging, "replaced")
        os.rename(final, replaced)
        os.rename(os.fspath(fresh.data_dir), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class TfdsSource:
    """Records of one prepared split, read with random access (no TensorFlow).

    Attributes:
      split: the split name.
      num_records: number of records.
    """

    def __init__(self, builder: UfgirBuilder, split: str):
        self.split = split
        self._name = builder.name
        self._data = builder.as_data_source(split)
        self.num_records = len(self._data)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> records.ImageRecord:
        example = self._data[index]
        name = f"{self._name}/{self.split}: {example['file'].decode()}"
        return records.ImageRecord(example["image"], int(example["label"]), name)
