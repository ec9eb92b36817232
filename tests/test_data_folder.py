"""The user's own data: class folders, CSV files, the carve and every bad-input case."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

import clca_jax.data as data
from clca_jax.data import fabricate, folder, records
from clca_jax.data.splits import DataError


def _config(name, root, **overrides):
    config = data.default_data_config(name)
    config.dir = str(root)
    config.num_threads = 2
    config.update(overrides)
    return config


def test_class_folders_read_back_with_80_percent_carve(tmp_path):
    names = fabricate.class_folder_dataset(str(tmp_path), [5, 3, 4])
    loaded = folder.load_folder(str(tmp_path), "train", "val")
    assert loaded.class_names == names
    assert loaded.num_classes == 3
    # int(0.8 n): 4, 2, 3 to train; the rest, in file order, to val.
    assert [label for _, label in loaded.train.rows] == [0] * 4 + [1] * 2 + [2] * 3
    assert loaded.eval.rows == [
        (os.path.join("class_00", "img_004.png"), 0),
        (os.path.join("class_01", "img_002.png"), 1),
        (os.path.join("class_02", "img_003.png"), 2),
    ]
    record = loaded.train[0]
    assert record.label == 0
    with open(tmp_path / "class_00" / "img_000.png", "rb") as f:
        assert record.image == f.read()


def test_class_folders_train_val_is_the_whole_folder(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path), [5, 3])
    info = data.dataset_info(_config("folder", tmp_path, train_split="train_val", eval_split="val"))
    assert (info.num_train, info.num_eval, info.num_classes) == (8, 2, 2)


def test_split_folders_layout(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path / "train"), [2, 2, 2])
    fabricate.class_folder_dataset(str(tmp_path / "test"), [1, 1])
    loaded = folder.load_folder(str(tmp_path), "train", "test")
    assert loaded.class_names == ["class_00", "class_01", "class_02"]
    assert [label for _, label in loaded.eval.rows] == [0, 1]
    assert len(loaded.train) == 6


def test_split_folders_with_unknown_eval_class_is_an_error(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path / "train"), [2, 2])
    fabricate.write_image(str(tmp_path / "test" / "class_09" / "x.png"), seed=1)
    with pytest.raises(DataError, match=r"class folder\(s\) \['class_09'\].*outside the class"):
        folder.load_folder(str(tmp_path), "train", "test")


def test_empty_class_folder_is_an_error(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path), [3, 3])
    os.makedirs(tmp_path / "class_02")
    with pytest.raises(DataError, match=r"class_02 holds no image.*empty class"):
        folder.load_folder(str(tmp_path), "train", "val")


def test_class_left_empty_by_the_carve_is_an_error(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path), [3, 1])
    with pytest.raises(DataError, match=r"class id\(s\) \[1\] have no image in split 'train'"):
        folder.load_folder(str(tmp_path), "train", "val")


def test_csv_route_reads_image_folder_and_carves(tmp_path):
    rows = [(f"c{c}/{i}.png", c) for c in range(2) for i in range(5)]
    for i, (rel, _) in enumerate(rows):
        fabricate.write_image(str(tmp_path / "pics" / rel), seed=i)
    fabricate.write_csv(str(tmp_path / "train_val.csv"), rows)
    fabricate.write_csv(str(tmp_path / "test.csv"), rows[:3], class_first=False)
    config = _config("csv", tmp_path, image_folder="pics", train_split="train", eval_split="test")
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval, info.class_names) == (2, 8, 3, None)
    loaded = data.load_data(config)
    assert loaded.train[0].name == os.path.join(str(tmp_path), "pics", "c0/0.png")


def test_csv_row_pointing_at_missing_file_is_an_error(tmp_path):
    rows = [("a.png", 0), ("b.png", 1), ("missing.png", 1)]
    for i, (rel, _) in enumerate(rows[:2]):
        fabricate.write_image(str(tmp_path / rel), seed=i)
    fabricate.write_csv(str(tmp_path / "train_val.csv"), rows[:2])
    fabricate.write_csv(str(tmp_path / "test.csv"), rows)
    with pytest.raises(
        DataError, match=r"cannot be read.*split 'test': 1 missing, e.g. \[missing.png\]"
    ):
        folder.load_csv(str(tmp_path), "train_val", "test")


def test_csv_label_outside_class_range_is_an_error(tmp_path):
    rows = [("a.png", 0), ("b.png", 1)]
    for i, (rel, _) in enumerate(rows):
        fabricate.write_image(str(tmp_path / rel), seed=i)
    fabricate.write_csv(str(tmp_path / "train_val.csv"), rows)
    fabricate.write_csv(str(tmp_path / "test.csv"), [("a.png", 0), ("b.png", 5)])
    with pytest.raises(
        DataError, match=r"split 'test' has 1 label\(s\) outside the class range 0\.\.1"
    ):
        folder.load_csv(str(tmp_path), "train_val", "test")


def test_csv_missing_split_file_lists_what_exists(tmp_path):
    fabricate.write_image(str(tmp_path / "a.png"), seed=0)
    fabricate.write_csv(str(tmp_path / "train_val.csv"), [("a.png", 0)])
    with pytest.raises(
        DataError, match=r"split 'test' not found .*\['train', 'train_val', 'val'\]"
    ):
        folder.load_csv(str(tmp_path), "train_val", "test")


def test_corrupt_image_stops_with_its_name(tmp_path):
    fabricate.class_folder_dataset(str(tmp_path), [5, 5])
    bad = tmp_path / "class_01" / "img_001.png"
    fabricate.write_corrupt(str(bad))
    loader = data.make_train_loader(
        _config("folder", tmp_path, train_split="train_val"),
        img_size=8,
        global_batch_size=10,
        seed=0,
    )
    with pytest.raises(records.BadImageError, match=rf"{bad}.*data.skip_bad_images=True"):
        next(loader)


def test_skip_bad_images_drops_counts_and_logs_them(tmp_path, caplog):
    fabricate.class_folder_dataset(str(tmp_path), [5, 5])
    bad = tmp_path / "class_01" / "img_001.png"
    fabricate.write_corrupt(str(bad))
    config = _config("folder", tmp_path, train_split="train_val", skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(config)
    assert info.num_train == 9
    assert "skipping 1 unreadable image(s) in split 'train_val'" in caplog.text
    assert str(bad) in caplog.text
    batch = next(data.make_train_loader(config, img_size=8, global_batch_size=9, seed=0))
    assert batch["image"].shape == (9, 8, 8, 3)


def test_grayscale_and_palette_images_become_rgb(tmp_path):
    fabricate.write_image(str(tmp_path / "gray" / "g.png"), seed=0, mode="L")
    Image.new("P", (10, 12), 3).save(tmp_path / "gray" / "p.png")
    source = records.FileSource(str(tmp_path), [("gray/g.png", 0), ("gray/p.png", 0)])
    for i in range(2):
        image = records.decode_rgb(source[i])
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        assert pixels.shape == (12, 10, 3)
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_config_validation_names_the_field():
    config = data.default_data_config("folder")
    with pytest.raises(DataError, match="data.dir is empty"):
        data.dataset_info(config)
    config.name = "imagenet"
    with pytest.raises(DataError, match="data.name = 'imagenet' is unknown"):
        data.dataset_info(config)
