"""Split lists: reading `dir,class_id` CSV files, the 80 % carve and label checks.

A split list is a list of `(relative_path, label)` pairs in file order. Every route that reads
files (the user's folder, the user's CSV files and the Ultra-FGVC builders) goes through these
functions, so the same input gives the same error whichever route reads it.

The carve reproduces the reference `data_split.py` (spec 6.3): per class, in file order, the
first `int(0.8 * n)` rows go to `train`, the rest to `val`, and `train_val` is the whole list.
It draws nothing at random, so it needs no seed; each carved split logs one line saying so.
"""

from __future__ import annotations

import collections
import csv
import io
import logging
import os
import re
from collections.abc import Mapping, Sequence

SplitList = list[tuple[str, int]]

TRAIN_FRACTION = 0.8
# How many offending entries an error message lists before it only gives the count.
MAX_LISTED = 10
# A class id as a CSV holds it: ASCII digits, optionally signed (int() would also take "1_0").
_INTEGER = re.compile(r"[+-]?[0-9]+")


class DataError(ValueError):
    """The data on disk disagrees with what the configuration asks for."""


def read_split_csv(csv_path: str) -> SplitList:
    """Reads one split file with the columns `dir` and `class_id` (any order, header first).

    The file is UTF-8, with or without the byte-order mark spreadsheet programs write. Rows
    naming a hidden file or folder (a path part starting with `.`, such as
    `.ipynb_checkpoints/` or macOS `._x.png`) are left out, as the folder route leaves them
    out, and counted in the log.

    Args:
      csv_path: path of the CSV file.

    Returns:
      The `(dir, class_id)` rows in file order.
    """
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{csv_path} line {line}: byte {data[err.start]:#04x} is not UTF-8 text; save the "
            "file as UTF-8 (a spreadsheet's 'CSV UTF-8' format)."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        if not header:
            raise DataError(f"{csv_path} is empty; it needs a header `dir,class_id` and rows.")
        missing = [c for c in ("dir", "class_id") if c not in header]
        if missing:
            hint = ""
            if any(";" in name for name in header):
                hint = " (the file looks semicolon-separated; use commas)"
            raise DataError(
                f"{csv_path}: missing column(s) {missing}; header seen: {header}{hint}. "
                "A split file needs a header with the columns `dir,class_id`."
            )
        rows = [_parse_row(csv_path, reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise DataError(
            f"{csv_path} line {reader.line_num}: not a readable CSV row ({err}); fix that line."
        ) from None
    kept = [row for row in rows if not is_hidden(row[0])]
    if len(kept) < len(rows):
        hidden = [path for path, _ in rows if is_hidden(path)]
        logging.warning(
            "%s: left out %d row(s) naming hidden files or folders, e.g. %s",
            csv_path,
            len(hidden),
            _listed(hidden),
        )
    if not kept:
        raise DataError(
            f"{csv_path} has a header but no rows"
            + (" other than hidden files" if rows else "")
            + "; add one `dir,class_id` row per image."
        )
    return kept


def _parse_row(csv_path: str, line: int, row: Mapping[str, str]) -> tuple[str, int]:
    """Turns one CSV row into `(dir, class_id)`, naming the line when it is malformed."""
    path, label = (row.get("dir") or "").strip(), (row.get("class_id") or "").strip()
    if not path:
        raise DataError(f"{csv_path} line {line}: empty `dir` value; every row names an image.")
    if not _INTEGER.fullmatch(label):
        raise DataError(
            f"{csv_path} line {line}: class_id {label!r} is not an integer; "
            "class ids are integers 0..C-1."
        )
    class_id = int(label)
    if class_id < 0:
        raise DataError(
            f"{csv_path} line {line}: class_id {class_id} is negative; class ids are integers "
            "0..C-1."
        )
    return path, class_id


def is_hidden(path: str) -> bool:
    """True when a part of `path` is a hidden name (starts with `.`; `.` and `..` are not)."""
    return any(part.startswith(".") and part not in (".", "..") for part in path.split("/"))


def carve_train_val(
    rows: SplitList, fraction: float = TRAIN_FRACTION
) -> tuple[SplitList, SplitList]:
    """Splits one list into train and val per class, keeping file order (spec 6.3).

    Args:
      rows: the whole list (`train_val`).
      fraction: share of each class that goes to train; `int(fraction * n)` rows.

    Returns:
      `(train, val)`, each in the order of `rows`.
    """
    per_class = collections.Counter(label for _, label in rows)
    quota = {label: int(fraction * n) for label, n in per_class.items()}
    seen: collections.Counter[int] = collections.Counter()
    train, val = [], []
    for path, label in rows:
        (train if seen[label] < quota[label] else val).append((path, label))
        seen[label] += 1
    return train, val


def resolve_split(name: str, lists: Mapping[str, SplitList], where: str) -> SplitList:
    """Returns the split called `name`, carving `train`/`val` from `train_val` if needed.

    Args:
      name: requested split, e.g. `train`, `val`, `train_val`, `test`.
      lists: the split lists that exist on disk, by name.
      where: what holds the lists (a folder), for the error message.

    Returns:
      The split list.
    """
    if name in lists:
        return lists[name]
    if name in ("train", "val") and "train_val" in lists:
        train, val = carve_train_val(lists["train_val"])
        carved = train if name == "train" else val
        share = TRAIN_FRACTION if name == "train" else 1 - TRAIN_FRACTION
        logging.info(
            "split %r: carved %d of the %d images of 'train_val' in %s (%.0f %% of each class, "
            "in file order; no seed, the same every run)",
            name,
            len(carved),
            len(lists["train_val"]),
            where,
            100 * share,
        )
        return carved
    available = sorted(set(lists) | ({"train", "val"} if "train_val" in lists else set()))
    raise DataError(
        f"split {name!r} not found in {where}; available splits: {available}. "
        "Set data.train_split / data.eval_split to one of them."
    )


def count_classes(train: SplitList) -> int:
    """Number of classes = number of distinct class ids in the training list (spec 6.3)."""
    return len({label for _, label in train})


def check_labels(
    splits: Mapping[str, SplitList], train_name: str, num_classes: int, where: str
) -> None:
    """Checks that every label lies in `0..num_classes-1` and that no class is empty.

    Args:
      splits: split lists by name.
      train_name: the split whose labels define the classes; every class needs an image there.
      num_classes: the class count.
      where: what holds the lists, for the error message.
    """
    train = splits[train_name]
    empty = sorted(set(range(num_classes)) - {label for _, label in train})
    if empty:
        raise DataError(
            f"{where}: class id(s) {_listed(empty)} have no image in split {train_name!r} "
            f"(empty classes; {num_classes} classes expected, ids 0..{num_classes - 1}). "
            "Renumber class ids to 0..C-1 without gaps or add images for these classes."
        )
    for name, rows in splits.items():
        bad = [(path, label) for path, label in rows if not 0 <= label < num_classes]
        if bad:
            raise DataError(
                f"{where}: split {name!r} has {len(bad)} label(s) outside the class range "
                f"0..{num_classes - 1}, e.g. {_listed(bad)}. The class count is the number of "
                f"distinct class ids in split {train_name!r}; fix the class ids."
            )


BROKEN_LINK = "broken symbolic link(s) (target missing, or a loop)"


def file_problem(path: str) -> str | None:
    """Why `path` is not a readable image file, or None when it is a regular file."""
    if os.path.isfile(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return BROKEN_LINK
    if os.path.exists(path):
        return "not a regular file (a folder?)"
    return "missing"


def check_files_exist(
    root: str, splits: Mapping[str, SplitList], skip_broken_links: bool = False
) -> None:
    """Raises a `DataError` listing the rows whose image is missing or not a readable file.

    Args:
      root: the folder the `dir` values are relative to.
      splits: split lists by name.
      skip_broken_links: let broken symbolic links (missing target, or a loop) pass; the
        caller leaves them out with the other unreadable images.
    """
    problems = []
    for name, rows in splits.items():
        found = collections.defaultdict(list)
        for path, _ in rows:
            problem = file_problem(os.path.join(root, path))
            if problem and not (skip_broken_links and problem == BROKEN_LINK):
                found[problem].append(path)
        problems += [
            f"split {name!r}: {len(paths)} {problem}, e.g. {_listed(paths)}"
            for problem, paths in found.items()
        ]
    if problems:
        raise DataError(
            f"image files named in the split lists cannot be read under {root}: "
            + "; ".join(problems)
            + ". Check data.dir (and the image folder), restore the files or repair the "
            "symbolic links (data.skip_bad_images=True leaves broken links out)."
        )


def warn_about_rows(
    root: str, splits: Mapping[str, SplitList], train_name: str, eval_name: str
) -> None:
    """Logs one line each for rows that are legal but usually a mistake.

    Paths leaving `root` (absolute, or `..` above it), the same image twice in one split, and
    evaluation images that are also training images (the accuracy then measures memorisation).
    Images are compared by their resolved paths.

    Args:
      root: the folder the `dir` values are relative to.
      splits: the split lists of the run, by name.
      train_name: the training split.
      eval_name: the evaluation split.
    """
    resolved = {
        name: [os.path.realpath(os.path.join(root, path)) for path, _ in rows]
        for name, rows in splits.items()
    }
    for name, rows in splits.items():
        outside = [p for p, _ in rows if os.path.isabs(p) or _leaves_root(p)]
        if outside:
            logging.warning(
                "split %r: %d path(s) outside %s, e.g. %s",
                name,
                len(outside),
                root,
                _listed(outside),
            )
        labels = collections.defaultdict(set)
        seen, repeated = set(), []
        for image, (path, label) in zip(resolved[name], rows, strict=True):
            labels[image].add(label)
            if image in seen:
                repeated.append((image, path))
            seen.add(image)
        if repeated:
            conflicting = {image for image, _ in repeated if len(labels[image]) > 1}
            logging.warning(
                "split %r lists %d image(s) more than once (%d of them with different class "
                "ids), e.g. %s",
                name,
                len({image for image, _ in repeated}),
                len(conflicting),
                _listed([path for _, path in repeated]),
            )
    if eval_name == train_name:
        logging.warning("the evaluation split is the training split %r", train_name)
        return
    training = set(resolved[train_name])
    shared = [
        path
        for image, (path, _) in zip(resolved[eval_name], splits[eval_name], strict=True)
        if image in training
    ]
    if shared:
        logging.warning(
            "%d image(s) of evaluation split %r are also in training split %r, e.g. %s",
            len(shared),
            eval_name,
            train_name,
            _listed(shared),
        )


def _leaves_root(path: str) -> bool:
    """True for a relative path that climbs above its root (`../x`, `a/../../x`)."""
    return os.path.normpath(path).split(os.sep)[0] == ".."


def _listed(items: Sequence) -> str:
    """Formats up to `MAX_LISTED` items, then how many more there are."""
    shown = ", ".join(str(x) for x in items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"[{shown}" + (f", ... and {more} more]" if more > 0 else "]")
