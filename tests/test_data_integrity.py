"""No silent wrong data: hidden files, deep pixels, odd CSV files, broken links, stale TFDS data.

Each case builds its own small images and split files. The prepared-data cases compare the
TFDS folder before and after (`snapshot`), so "nothing changed on disk" is checked, not
assumed.
"""

import hashlib
import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from clca_jax.data import fabricate, folder, records, splits, ufgir
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


# --- hidden files and folders (issue 14, item 4) ---------------------------------------------


def _add_hidden_files(class_dir):
    """What Jupyter and macOS leave in a class folder: a checkpoint copy and an AppleDouble."""
    fabricate.write_image(os.path.join(class_dir, ".ipynb_checkpoints", "img-checkpoint.png"), 7)
    fabricate.write_image(os.path.join(class_dir, "sub", ".cache", "deep.png"), 8)
    with open(os.path.join(class_dir, "._img_000.png"), "wb") as f:
        f.write(b"\x00\x05\x16\x07 AppleDouble resource fork")


def test_folder_route_ignores_hidden_files_and_folders_at_every_depth(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path), [5, 5])
    _add_hidden_files(str(tmp_path / "class_00"))
    fabricate.write_image(str(tmp_path / ".trash" / "x.png"), seed=9)
    loaded = folder.load_folder(str(tmp_path), "train_val", "val", skip_bad_images=False)
    assert loaded.class_names == ["class_00", "class_01"]
    assert len(loaded.train) == 10
    assert not any(splits.is_hidden(path) for path, _ in loaded.train.rows)
    for index in range(len(loaded.train)):  # the AppleDouble file would not decode
        records.decode_rgb(loaded.train[index])


def test_split_folders_ignore_hidden_files(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path / "train"), [2, 2])
    fabricate.class_folder_dataset(str(tmp_path / "test"), [1, 1])
    _add_hidden_files(str(tmp_path / "test" / "class_01"))
    loaded = folder.load_folder(str(tmp_path), "train", "test")
    assert [path for path, _ in loaded.eval.rows] == [
        os.path.join("test", "class_00", "img_000.png"),
        os.path.join("test", "class_01", "img_000.png"),
    ]


def test_csv_route_leaves_out_the_same_hidden_files_as_the_folder_route(tmp_path, caplog):
    fabricate.class_folder_dataset(str(tmp_path), [5, 5])
    _add_hidden_files(str(tmp_path / "class_01"))
    # A CSV made by listing everything on disk, hidden files included.
    on_disk = [
        os.path.relpath(os.path.join(parent, f), tmp_path)
        for parent, _, files in os.walk(tmp_path)
        for f in files
    ]
    on_disk = [(path, int(path.split(os.sep)[0][-2:])) for path in sorted(on_disk)]
    fabricate.write_csv(str(tmp_path / "train_val.csv"), on_disk)
    with caplog.at_level(logging.WARNING):
        from_csv = folder.load_csv(str(tmp_path), "train_val", "train_val")
    from_folder = folder.load_folder(str(tmp_path), "train_val", "train_val")
    assert sorted(from_csv.train.rows) == sorted(from_folder.train.rows)
    assert len(from_csv.train) == 10
    assert "left out 3 row(s) naming hidden files or folders" in caplog.text


def test_csv_naming_only_hidden_files_is_refused(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("dir,class_id\n.ipynb_checkpoints/a.png,0\nc/._b.png,1\n")
    with pytest.raises(DataError, match=r"train.csv has a header but no rows other than hidden"):
        splits.read_split_csv(str(path))


# --- images of more than 8 bits (item 5) -----------------------------------------------------


def test_16_bit_grayscale_png_and_tiff_are_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    deep[0, :3] = [0, 257 * 100, 65535]
    expected = np.round(deep / 257.0).astype(np.uint8)
    Image.fromarray(deep).save(tmp_path / "g16.png")
    Image.fromarray(deep.astype(">u2")).save(tmp_path / "g16b.tif")  # big-endian TIFF
    for name in ("g16.png", "g16b.tif"):
        pixels = _decode_file(tmp_path / name)
        assert pixels.shape == (6, 7, 3) and pixels.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], expected)
    assert list(_decode_file(tmp_path / "g16.png")[0, :3, 0]) == [0, 100, 255]


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.linspace(0.0, 1.0, 20, dtype=np.float32).reshape(4, 5)
    Image.fromarray(values).save(tmp_path / "f.tif")
    pixels = _decode_file(tmp_path / "f.tif")
    np.testing.assert_array_equal(pixels[..., 1], np.round(values * 255.0).astype(np.uint8))


@pytest.mark.parametrize(
    "values, message",
    [
        (np.arange(20, dtype=np.int32).reshape(4, 5) * 5000, r"32-bit integer .*values 0\.\.95000"),
        (np.linspace(0, 300, 20, dtype=np.float32).reshape(4, 5), r"floating-point .*0\.0\.\.300"),
        (np.full((4, 5), np.nan, np.float32), r"floating-point .*values nan"),
    ],
)
def test_deep_images_without_a_standard_scale_are_refused_with_their_name(
    tmp_path, values, message
):
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(records.BadImageError, match=rf"deep.tif: .*{message}"):
        _decode_file(path)


def test_exif_orientation_is_not_applied_as_in_the_reference(tmp_path):
    # A 12 x 8 JPEG tagged "rotate 90 degrees": the loader keeps the stored 12 x 8 pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (12, 8), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert _decode_file(tmp_path / "r.jpg").shape == (8, 12, 3)


# --- broken symbolic links (item 12) ---------------------------------------------------------


def _prepare(manual, tfds_dir, **kwargs):
    return ufgir.prepare(
        "cotton", str(manual), str(tfds_dir), check_published_counts=False, **kwargs
    )


def _csv_data_with_broken_links(root):
    rows = [(f"{i}.png", i % 2) for i in range(6)]
    for rel, _ in rows[:4]:
        fabricate.write_image(str(root / rel), seed=len(rel))
    os.symlink(root / "gone.png", root / "4.png")  # dangling
    os.symlink(root / "5.png", root / "5.png")  # a loop
    fabricate.write_csv(str(root / "train_val.csv"), rows)
    return rows


def test_broken_symlinks_are_named_as_such(tmp_path):
    _csv_data_with_broken_links(tmp_path)
    with pytest.raises(DataError) as caught:
        folder.load_csv(str(tmp_path), "train_val", "train_val")
    message = str(caught.value)
    assert "split 'train_val': 2 broken symbolic link(s) (target missing, or a loop)" in message
    assert "[4.png, 5.png]" in message and "missing, e.g." not in message


def test_skip_bad_images_skips_broken_symlinks_in_csv_and_folder_routes(tmp_path, caplog):
    csv_dir = tmp_path / "csv"
    _csv_data_with_broken_links(csv_dir)
    fabricate.class_folder_dataset(str(tmp_path / "folder"), [3, 3])
    os.symlink(tmp_path / "nowhere.png", tmp_path / "folder" / "class_01" / "img_009.png")
    with caplog.at_level(logging.WARNING):
        from_csv = folder.load_csv(str(csv_dir), "train_val", "train_val", skip_bad_images=True)
        from_folder = folder.load_folder(
            str(tmp_path / "folder"), "train_val", "train_val", skip_bad_images=True
        )
    assert [path for path, _ in from_csv.train.rows] == ["0.png", "1.png", "2.png", "3.png"]
    assert len(from_folder.train) == 6
    assert caplog.text.count("(broken symbolic link to") == 3
    with pytest.raises(DataError, match=r"1 broken symbolic link"):
        folder.load_folder(str(tmp_path / "folder"), "train_val", "train_val")


def test_skip_bad_images_skips_broken_symlinks_when_preparing_a_leaf_dataset(tmp_path, caplog):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    link = manual / "cotton_square_new" / lists["test"][1][0]
    os.remove(link)
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(DataError, match=r"1 broken symbolic link"):
        _prepare(manual, tmp_path / "tfds")
    builder = _prepare(manual, tmp_path / "tfds", skip_bad_images=True)
    assert builder.info.splits["test"].num_examples == 5
    assert f"skipped {link} (broken symbolic link" in caplog.text


# --- legal rows that are usually a mistake (warned) ----------------------------------------


def test_csv_rows_outside_the_folder_twice_or_in_both_splits_each_warn(tmp_path, caplog):
    data_dir = tmp_path / "data"
    for name in ("a", "b", "c", "d"):
        fabricate.write_image(str(data_dir / f"{name}.png"), seed=ord(name))
    fabricate.write_image(str(tmp_path / "elsewhere.png"), seed=0)
    train = [("a.png", 0), ("b.png", 1), ("./b.png", 0), ("../elsewhere.png", 1)]
    fabricate.write_csv(str(data_dir / "train_val.csv"), train)
    fabricate.write_csv(str(data_dir / "test.csv"), [("c.png", 0), ("a.png", 0), ("d.png", 1)])
    with caplog.at_level(logging.WARNING):
        loaded = folder.load_csv(str(data_dir), "train_val", "test")
    assert (len(loaded.train), len(loaded.eval)) == (4, 3)  # warnings only
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 3, lines
    assert "split 'train_val': 1 path(s) outside" in lines[0] and "../elsewhere.png" in lines[0]
    assert "lists 1 image(s) more than once (1 of them with different class ids)" in lines[1]
    assert (
        "1 image(s) of evaluation split 'test' are also in training split 'train_val'" in (lines[2])
    )


# --- prepared leaf data follows data.dir (item 2) --------------------------------------------


def snapshot(root):
    """Every file under `root` by content hash and mtime, skipping the extraction cache."""
    listing = {}
    for parent, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "downloads"]
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                listing[os.path.relpath(path, root)] = (
                    hashlib.sha256(f.read()).hexdigest(),
                    os.stat(path).st_mtime_ns,
                )
    return listing


def _labels(builder, split):
    source = ufgir.TfdsSource(builder, split)
    return [source[i].label for i in range(len(source))]


def test_corrected_split_file_is_prepared_again(tmp_path, caplog):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    assert _labels(_prepare(manual, tfds_dir), "test")[0] == 0
    corrected = [(lists["test"][0][0], 2)] + lists["test"][1:]
    fabricate.write_csv(str(manual / "test.csv"), corrected)
    with caplog.at_level(logging.WARNING):
        builder = _prepare(manual, tfds_dir)
    assert _labels(builder, "test") == [label for _, label in corrected]
    assert "split files changed: test.csv" in caplog.text
    assert sorted(os.listdir(tfds_dir)) == ["downloads", "ufgir_cotton"]  # no staging left


def test_data_dir_with_other_images_is_prepared_again(tmp_path):
    first, second, tfds_dir = tmp_path / "first", tmp_path / "second", tmp_path / "tfds"
    lists = fabricate.leaf_dataset(str(first), "cotton", "cotton_square_new")
    shutil.copytree(first, second)
    replaced = second / "cotton_square_new" / lists["test"][0][0]
    fabricate.write_image(str(replaced), seed=12345, size=(9, 9))
    _prepare(first, tfds_dir)
    record = ufgir.TfdsSource(_prepare(second, tfds_dir), "test")[0]
    assert record.image == replaced.read_bytes()


def test_unchanged_source_uses_the_prepared_data(tmp_path, caplog):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    _prepare(manual, tfds_dir)
    before = snapshot(tfds_dir)
    with caplog.at_level(logging.WARNING):
        _prepare(manual, tfds_dir)
    assert snapshot(tfds_dir) == before
    assert "preparing it again" not in caplog.text


def test_changed_source_that_fails_to_prepare_leaves_the_prepared_data(tmp_path):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    _prepare(manual, tfds_dir)
    before = snapshot(tfds_dir)
    bad = manual / "cotton_square_new" / lists["train_val"][3][0]
    fabricate.write_corrupt(str(bad))
    with pytest.raises(records.BadImageError, match=str(bad)):
        _prepare(manual, tfds_dir)
    assert snapshot(tfds_dir) == before
    assert sorted(os.listdir(tfds_dir)) == ["downloads", "ufgir_cotton"]


def test_replaced_archive_is_extracted_and_prepared_again(tmp_path):
    staging, manual, tfds_dir = tmp_path / "staging", tmp_path / "manual", tmp_path / "tfds"
    lists = fabricate.leaf_dataset(str(staging / "Cotton80"), "cotton", "cotton_square_new")
    manual.mkdir()
    for split in lists:
        shutil.move(staging / "Cotton80" / f"{split}.csv", manual / f"{split}.csv")
    shutil.make_archive(str(manual / "Cotton80"), "zip", staging)
    first = ufgir.TfdsSource(_prepare(manual, tfds_dir), "test")[0].image
    changed = staging / "Cotton80" / "cotton_square_new" / lists["test"][0][0]
    fabricate.write_image(str(changed), seed=4242, size=(9, 9))
    os.remove(manual / "Cotton80.zip")
    shutil.make_archive(str(manual / "Cotton80"), "zip", staging)
    os.utime(manual / "Cotton80.zip", ns=(1, 10**18))  # another stamp, even within one tick
    second = ufgir.TfdsSource(_prepare(manual, tfds_dir), "test")[0].image
    assert first != second == changed.read_bytes()


def test_prepared_data_without_its_data_dir_is_refused(tmp_path):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    _prepare(manual, tfds_dir)
    with pytest.raises(
        DataError, match=rf"data.dir = '{tmp_path}/moved' is not a folder.*{manual}"
    ):
        _prepare(tmp_path / "moved", tfds_dir)


def test_changed_preparation_settings_prepare_again(tmp_path):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    fabricate.write_corrupt(str(manual / "cotton_square_new" / lists["test"][1][0]))
    assert _prepare(manual, tfds_dir, skip_bad_images=True).info.splits["test"].num_examples == 5
    with pytest.raises(records.BadImageError):  # skipping is no longer asked for
        _prepare(manual, tfds_dir)


def test_published_counts_are_checked_when_prepared_data_is_reused(tmp_path):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    _prepare(manual, tfds_dir)  # a subset, prepared on purpose
    before = snapshot(tfds_dir)
    with pytest.raises(DataError, match=r"rows of test.csv: 6, published 240"):
        ufgir.prepare("cotton", str(manual), str(tfds_dir), check_published_counts=True)
    assert snapshot(tfds_dir) == before


def test_array_records_keep_working_after_the_swap(tmp_path):
    # The swap moves prepared files between folders; their paths are relative.
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    _prepare(manual, tfds_dir)
    (manual / "test.csv").write_bytes((manual / "test.csv").read_bytes() + b"\n")
    builder = _prepare(manual, tfds_dir)
    record = ufgir.TfdsSource(builder, "train_val")[14]
    assert records.decode_rgb(record).mode == "RGB"
    assert io.BytesIO(record.image).read(4) == b"\x89PNG"
