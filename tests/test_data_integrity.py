"""No silent wrong data: hidden files, deep pixels, odd CSV files, broken links, stale TFDS data.

Each case builds its own small images and split files. The prepared-data cases compare the
TFDS folder before and after (`snapshot`), so "nothing changed on disk" is checked, not
assumed.
"""

import numpy as np
import pytest

from clca_jax.data import fabricate, folder, records, splits
from clca_jax.data.splits import DataError


def _decode_file(path):
    with open(path, "rb") as f:
        return np.asarray(records.decode_rgb(records.ImageRecord(f.read(), 0, str(path))))


# --- CSV files (item 9) ----------------------------------------------------------------------


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("dir,class_id\r\na.png,0\r\nb.png,1\r\n".encode("utf-8-sig"))
    assert splits.read_split_csv(str(path)) == [("a.png", 0), ("b.png", 1)]


def test_csv_header_with_spaces_is_read(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("class_id, dir\n0, a.png\n")
    assert splits.read_split_csv(str(path)) == [("a.png", 0)]


@pytest.mark.parametrize(
    "content, message",
    [
        ("dir,class_id\na.png,0\nfé.png,1\n".encode("latin-1"), r"line 3: byte 0xe9 is not UTF-8"),
        (b"dir,class_id\na.png,0\nb.png,-1\n", r"line 3: class_id -1 is negative"),
        (b"dir,class_id\na.png,1_0\n", r"line 2: class_id '1_0' is not an integer"),
        (b"dir;class_id\na.png;0\n", r"semicolon-separated"),
        (b"", r"is empty"),
    ],
)
def test_bad_csv_is_refused_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}.*{message}") as caught:
        splits.read_split_csv(str(path))
    assert "\n" not in str(caught.value)


def test_negative_class_id_is_reported_as_a_bad_value_through_the_csv_route(tmp_path):
    for i in range(3):
        fabricate.write_image(str(tmp_path / f"{i}.png"), seed=i)
    fabricate.write_csv(str(tmp_path / "train_val.csv"), [("0.png", 0), ("1.png", 1), ("2.png", 1)])
    fabricate.write_csv(str(tmp_path / "test.csv"), [("0.png", 0), ("2.png", -3)])
    with pytest.raises(DataError, match=r"test.csv line 3: class_id -3 is negative"):
        folder.load_csv(str(tmp_path), "train_val", "test")
