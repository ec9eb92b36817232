"""Split files, the 80 % carve and label checks."""

import os

import pytest

from clca_jax.data import fabricate, splits
from clca_jax.data.splits import DataError


def test_read_split_csv_accepts_either_column_order(tmp_path):
    rows = [("a/1.png", 0), ("b/2.png", 1)]
    fabricate.write_csv(str(tmp_path / "first.csv"), rows, class_first=True)
    fabricate.write_csv(str(tmp_path / "second.csv"), rows, class_first=False)
    assert splits.read_split_csv(str(tmp_path / "first.csv")) == rows
    assert splits.read_split_csv(str(tmp_path / "second.csv")) == rows


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,label\na.png,0\n", "missing column"),
        ("dir,class_id\n", "no rows"),
        ("dir,class_id\na.png,zero\n", "line 2: class_id 'zero' is not an integer"),
        ("dir,class_id\n,1\n", "line 2: empty `dir`"),
    ],
)
def test_read_split_csv_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        splits.read_split_csv(str(path))


def test_carve_takes_first_80_percent_of_each_class_in_file_order():
    # Interleaved classes: 5 of class 0, 3 of class 1 -> int(4.0)=4 and int(2.4)=2 to train.
    rows = [(f"f{i}", label) for i, label in enumerate([0, 1, 0, 0, 1, 0, 1, 0])]
    train, val = splits.carve_train_val(rows)
    assert train == [("f0", 0), ("f1", 1), ("f2", 0), ("f3", 0), ("f4", 1), ("f5", 0)]
    assert val == [("f6", 1), ("f7", 0)]


def test_resolve_split_carves_only_train_and_val():
    lists = {"train_val": [("a", 0)] * 5, "test": [("t", 0)]}
    assert len(splits.resolve_split("train", lists, "here")) == 4
    assert len(splits.resolve_split("val", lists, "here")) == 1
    with pytest.raises(DataError, match=r"split 'valid' not found in here; available splits"):
        splits.resolve_split("valid", lists, "here")


def test_check_labels_reports_label_outside_range():
    lists = {"train": [("a", 0), ("b", 1)], "test": [("c", 0), ("d", 2)]}
    with pytest.raises(
        DataError, match=r"split 'test' has 1 label\(s\) outside .* 0\.\.1.*\('d', 2\)"
    ):
        splits.check_labels(lists, "train", 2, "here")


def test_check_labels_reports_empty_class():
    lists = {"train": [("a", 0), ("b", 2)]}
    with pytest.raises(DataError, match=r"class id\(s\) \[1\] have no image .*empty classes"):
        splits.check_labels(lists, "train", 3, "here")


def test_check_files_exist_lists_missing_files(tmp_path):
    fabricate.write_image(os.path.join(tmp_path, "here.png"), seed=0)
    lists = {"train": [("here.png", 0), ("gone.png", 0)]}
    with pytest.raises(DataError, match=r"split 'train': 1 missing, e.g. \[gone.png\]"):
        splits.check_files_exist(str(tmp_path), lists)
