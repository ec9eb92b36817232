"""The user's own data: a folder of class sub-folders, or CSV split files (`dir,class_id`).

Folder route (`data.name='folder'`), two layouts under `data.dir`:

* class layout: one sub-folder per class (`dir/<class>/**/<image>`). Class ids follow the
  sorted folder names. The whole folder is the `train_val` list; `train` and `val` are carved
  from it per class in file order (first 80 %, spec 6.3), so the defaults
  `train_split='train'`, `eval_split='val'` need nothing else.
* split layout: every sub-folder of `data.dir` is a split name (`train`, `val`, `train_val`,
  `test`), each holding class sub-folders. Class ids follow the sorted class folders of the
  training split; a missing `train`/`val` is carved from `train_val`.

CSV route (`data.name='csv'`): `data.dir/<split>.csv` with the columns `dir,class_id`; an image
is at `data.dir/<data.image_folder>/<dir>` (`image_folder` empty: the CSV folder itself). A
missing `train.csv`/`val.csv` is carved from `train_val.csv`.

Both routes leave out hidden files and folders (a name starting with `.`) at every depth, and
check, before any training: no empty class, every label in `0..C-1` with C the number of
distinct class ids of the training split, and every listed file present. Unreadable images
(broken symbolic links included) stop the run with the file's name, or with
`data.skip_bad_images` are decoded once up front, left out and listed in the log. Paths outside
the image folder, images listed twice and evaluation images that are also training images are
legal, and each logs one warning line.
"""

from __future__ import annotations

import os

from clca_jax.data import records, splits
from clca_jax.data.splits import DataError, SplitList

SPLIT_NAMES = ("train", "val", "train_val", "test")


def load_folder(
    root: str, train_split: str, eval_split: str, skip_bad_images: bool = False
) -> records.LoadedData:
    """Builds the train and eval sources of a class-per-folder dataset.

    Args:
      root: the dataset folder (`data.dir`).
      train_split: split to train on.
      eval_split: split to evaluate on.
      skip_bad_images: leave out (and log) images that cannot be decoded.

    Returns:
      The two splits with the class count and class names.
    """
    _check_dir(root, "data.dir (folder route)")
    subfolders = _subfolders(root)
    if subfolders and all(name in SPLIT_NAMES for name in subfolders):
        lists, class_names = _split_layout(root, subfolders, train_split)
    else:
        class_names = _require_classes(root, subfolders)
        lists = {"train_val": _class_folder_rows(root, class_names, prefix="")}
    where = f"folder {root}"
    chosen = {
        train_split: splits.resolve_split(train_split, lists, where),
        eval_split: splits.resolve_split(eval_split, lists, where),
    }
    num_classes = len(class_names)
    splits.check_labels(chosen, train_split, num_classes, where)
    return _finish(root, chosen, train_split, eval_split, num_classes, class_names, skip_bad_images)


def load_csv(
    root: str,
    train_split: str,
    eval_split: str,
    image_folder: str = "",
    skip_bad_images: bool = False,
) -> records.LoadedData:
    """Builds the train and eval sources of a dataset described by CSV split files.

    Args:
      root: folder holding `<split>.csv` (`data.dir`).
      train_split: split to train on.
      eval_split: split to evaluate on.
      image_folder: sub-folder of `root` that the CSV `dir` values are relative to.
      skip_bad_images: leave out (and log) images that cannot be decoded.

    Returns:
      The two splits with the class count (class names are unknown: None).
    """
    _check_dir(root, "data.dir (csv route)")
    lists = read_csv_lists(root, (train_split, eval_split, "train_val"))
    where = f"CSV files in {root}"
    chosen = {
        train_split: splits.resolve_split(train_split, lists, where),
        eval_split: splits.resolve_split(eval_split, lists, where),
    }
    num_classes = splits.count_classes(chosen[train_split])
    splits.check_labels(chosen, train_split, num_classes, where)
    image_root = os.path.join(root, image_folder)
    return _finish(image_root, chosen, train_split, eval_split, num_classes, None, skip_bad_images)


def read_csv_lists(root: str, wanted: tuple[str, ...]) -> dict[str, SplitList]:
    """Reads `<name>.csv` from `root` for each wanted split name that has a file.

    Args:
      root: folder holding the CSV files.
      wanted: split names to look for.

    Returns:
      The split lists found, by name (missing files are simply absent).
    """
    lists = {}
    for name in dict.fromkeys(wanted):
        path = os.path.join(root, f"{name}.csv")
        if os.path.isfile(path):
            lists[name] = splits.read_split_csv(path)
    if not lists:
        present = sorted(f for f in os.listdir(root) if f.endswith(".csv"))
        raise DataError(
            f"no split file {[f'{n}.csv' for n in dict.fromkeys(wanted)]} in {root}; CSV files "
            f"there: {present}. Put `<split>.csv` files (columns dir,class_id) in data.dir."
        )
    return lists


def _finish(
    image_root: str,
    chosen: dict[str, SplitList],
    train_split: str,
    eval_split: str,
    num_classes: int,
    class_names: list[str] | None,
    skip_bad_images: bool,
) -> records.LoadedData:
    """Checks the files exist, optionally drops unreadable ones, and wraps the splits."""
    splits.check_files_exist(image_root, chosen, skip_broken_links=skip_bad_images)
    splits.warn_about_rows(image_root, chosen, train_split, eval_split)
    train = records.FileSource(image_root, chosen[train_split])
    evaluation = records.FileSource(image_root, chosen[eval_split])
    if skip_bad_images:
        train = drop_bad_images(train, f"split {train_split!r}")
        if eval_split == train_split:
            evaluation = train
        else:
            evaluation = drop_bad_images(evaluation, f"split {eval_split!r}")
        splits.check_labels(
            {train_split: train.rows, eval_split: evaluation.rows},
            train_split,
            num_classes,
            f"{image_root} after skipping unreadable images",
        )
    return records.LoadedData(train, evaluation, num_classes, class_names)


def drop_bad_images(source: records.FileSource, where: str) -> records.FileSource:
    """Decodes every image of `source` once and returns a source without the broken ones.

    Args:
      source: the file source to scan.
      where: which split this is, for the log.

    Returns:
      A source holding only the rows whose image decodes.
    """
    bad = records.find_bad_images(len(source), source.__getitem__)
    records.log_skipped(bad, where)
    bad_rows = {index for index, _, _ in bad}
    kept = [row for index, row in enumerate(source.rows) if index not in bad_rows]
    return records.FileSource(source.root, kept)


def _split_layout(
    root: str, split_folders: list[str], train_split: str
) -> tuple[dict[str, SplitList], list[str]]:
    """Reads `root/<split>/<class>/...`; class ids come from the training split's folders."""
    class_source = train_split if train_split in split_folders else "train_val"
    if class_source not in split_folders:
        raise DataError(
            f"{root} has split folders {split_folders} but none for training split "
            f"{train_split!r} (nor train_val to carve it from). Add that folder or change "
            "data.train_split."
        )
    class_names = _require_classes(os.path.join(root, class_source), None)
    lists = {}
    for split in split_folders:
        split_root = os.path.join(root, split)
        unknown = sorted(set(_subfolders(split_root)) - set(class_names))
        if unknown:
            raise DataError(
                f"{split_root} has class folder(s) {unknown} that the training split "
                f"{class_source!r} does not have, so their labels would lie outside the class "
                "range. Add them to the training split or remove them."
            )
        present = [c for c in class_names if os.path.isdir(os.path.join(split_root, c))]
        lists[split] = _class_folder_rows(root, present, prefix=split, class_names=class_names)
    return lists, class_names


def _class_folder_rows(
    root: str, present: list[str], prefix: str, class_names: list[str] | None = None
) -> SplitList:
    """Lists `root/prefix/<class>/**` images as rows, class by class, files sorted by path."""
    class_ids = {name: i for i, name in enumerate(class_names or present)}
    rows = []
    for name in present:
        class_dir = os.path.join(prefix, name)
        files = image_files(os.path.join(root, class_dir))
        if not files:
            raise DataError(
                f"class folder {os.path.join(root, class_dir)} holds no image "
                f"(extensions {list(records.IMAGE_EXTENSIONS)}): an empty class. "
                "Add images or remove the folder."
            )
        rows.extend((os.path.join(class_dir, f), class_ids[name]) for f in files)
    return rows


def image_files(folder: str) -> list[str]:
    """Image files under `folder` (recursively), relative to it, sorted; hidden ones left out.

    Hidden names (`.ipynb_checkpoints/`, macOS `._x.png`) are skipped at every depth, as the
    CSV route skips rows naming them.
    """
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not splits.is_hidden(d)]
        for f in files:
            if f.lower().endswith(records.IMAGE_EXTENSIONS) and not splits.is_hidden(f):
                found.append(os.path.relpath(os.path.join(parent, f), folder))
    return sorted(found)


def _require_classes(root: str, subfolders: list[str] | None) -> list[str]:
    """The class folder names of `root`, sorted; an error if there are none."""
    subfolders = _subfolders(root) if subfolders is None else subfolders
    if not subfolders:
        raise DataError(
            f"{root} has no sub-folders; the folder route needs one sub-folder per class "
            "(dir/<class>/<image>)."
        )
    return subfolders


def _subfolders(root: str) -> list[str]:
    """Sorted names of the visible sub-folders of `root`."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not splits.is_hidden(e.name))


def _check_dir(path: str, what: str) -> None:
    """Raises when `path` is not an existing folder."""
    if not path or not os.path.isdir(path):
        raise DataError(f"{what} = {path!r} is not a folder; set it to the dataset's folder.")
