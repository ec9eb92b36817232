"""Ultra-FGVC leaf builders: prepared from fabricated folders in the real layouts, read back."""

import os
import shutil

import pytest

import clca_jax.data as data
from clca_jax.data import fabricate, records, ufgir
from clca_jax.data.splits import DataError

LEAVES = sorted(ufgir.LEAF_DATASETS)


def _prepare(name, manual_dir, tfds_dir, **kwargs):
    kwargs.setdefault("check_published_counts", False)
    return ufgir.prepare(name, str(manual_dir), str(tfds_dir), **kwargs)


@pytest.mark.parametrize("name", LEAVES)
def test_leaf_builder_prepares_and_reads_back(tmp_path, name):
    leaf = ufgir.LEAF_DATASETS[name]
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), name, leaf.image_folder)
    if name == "soygene":
        fabricate.write_csv(str(manual / "train_val_1.csv"), lists["train_val"][::5])
        lists["train_val_1"] = lists["train_val"][::5]
    builder = _prepare(name, manual, tmp_path / "tfds")
    assert builder.name == f"ufgir_{name}"
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        s: len(rows) for s, rows in lists.items()
    }
    assert builder.info.metadata["num_classes"] == 3
    for split, rows in lists.items():
        source = ufgir.TfdsSource(builder, split)
        for index in (0, len(rows) - 1):
            record = source[index]
            rel, label = rows[index]
            assert (record.label, record.name.endswith(rel)) == (label, True)
            with open(os.path.join(manual, leaf.image_folder, rel), "rb") as f:
                assert record.image == f.read()
            assert records.decode_rgb(record).mode == "RGB"


def test_leaf_dataset_through_the_public_api_prepares_on_first_use(tmp_path):
    manual = tmp_path / "manual"
    fabricate.leaf_dataset(str(manual), "soyageing", ".", with_train_val_files=False)
    config = data.default_data_config("soyageing")
    config.update(dir=str(manual), tfds_dir=str(tmp_path / "tfds"), check_published_counts=False)
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval, info.class_names) == (3, 15, 6, None)
    config.train_split, config.eval_split = "train", "val"  # carved: int(0.8 * 5) = 4 per class
    info = data.dataset_info(config)
    assert (info.num_train, info.num_eval) == (12, 3)
    batch = next(data.make_train_loader(config, img_size=8, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 8, 8, 3)


def test_published_counts_are_checked(tmp_path):
    manual = tmp_path / "manual"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    with pytest.raises(
        DataError,
        match=r"classes in train_val.csv: 3, published 80.*rows of "
        r"train_val.csv: 15, published 240.*rows of test.csv: 6, published 240",
    ):
        _prepare("cotton", manual, tmp_path / "tfds", check_published_counts=True)


def test_missing_split_files_are_listed_with_instructions(tmp_path):
    manual = tmp_path / "manual"
    fabricate.leaf_dataset(str(manual), "soylocal", "soybean200_square")
    os.remove(manual / "test.csv")
    with pytest.raises(
        DataError, match=r"lacks the split file\(s\) \['test.csv'\](.|\n)*Ultra-FGVC"
    ):
        _prepare("soylocal", manual, tmp_path / "tfds")


def test_partial_image_folder_lists_missing_files(tmp_path):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "soyglobal", "soybean2000")
    gone = lists["train_val"][-1][0]
    os.remove(manual / "soybean2000" / gone)
    with pytest.raises(DataError, match=rf"split 'train_val': 1 missing, e.g. \[{gone}\]"):
        _prepare("soyglobal", manual, tmp_path / "tfds")


def test_missing_image_folder_names_what_was_looked_for(tmp_path):
    manual = tmp_path / "manual"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    shutil.rmtree(manual / "cotton_square_new")
    with pytest.raises(DataError, match=r"Cotton80 images not found.*cotton_square_new/1_0_test"):
        _prepare("cotton", manual, tmp_path / "tfds")


def test_archive_in_manual_dir_is_extracted(tmp_path):
    staging = tmp_path / "staging"
    lists = fabricate.leaf_dataset(str(staging / "Cotton80"), "cotton", "cotton_square_new")
    manual = tmp_path / "manual"
    manual.mkdir()
    for split in lists:
        shutil.move(staging / "Cotton80" / f"{split}.csv", manual / f"{split}.csv")
    shutil.make_archive(str(manual / "Cotton80"), "zip", staging)
    builder = _prepare("cotton", manual, tmp_path / "tfds")
    assert builder.info.splits["test"].num_examples == 6
    assert os.path.isdir(tmp_path / "tfds" / "downloads" / "manual_extracted" / "cotton")


def test_train_and_val_must_match_train_val(tmp_path):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    fabricate.write_csv(str(manual / "val.csv"), lists["val"][:-1])
    with pytest.raises(DataError, match=r"train.csv \+ val.csv differ from train_val.csv"):
        _prepare("cotton", manual, tmp_path / "tfds")


def test_corrupt_image_stops_preparation_with_its_name(tmp_path):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    bad = manual / "cotton_square_new" / lists["test"][1][0]
    fabricate.write_corrupt(str(bad))
    with pytest.raises(records.BadImageError, match=str(bad)):
        _prepare("cotton", manual, tmp_path / "tfds")


def test_skip_bad_images_at_preparation(tmp_path, caplog):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    bad = manual / "cotton_square_new" / lists["test"][1][0]
    fabricate.write_corrupt(str(bad))
    builder = _prepare("cotton", manual, tmp_path / "tfds", skip_bad_images=True)
    assert builder.info.splits["test"].num_examples == 5
    assert f"skipped {bad}" in caplog.text


def test_unknown_split_of_prepared_data_lists_available(tmp_path):
    manual = tmp_path / "manual"
    fabricate.leaf_dataset(str(manual), "cotton", "cotton_square_new")
    with pytest.raises(DataError, match=r"no split 'test_R1'; prepared splits: \['test', 'train'"):
        ufgir.load_leaf(
            "cotton",
            str(manual),
            str(tmp_path / "tfds"),
            "train_val",
            "test_R1",
            check_published_counts=False,
        )


def test_manual_instructions_say_what_to_fetch_and_where():
    text = ufgir.manual_instructions(ufgir.LEAF_DATASETS["soyageing"])
    assert "Ultra-FGVC" in text and "train_val.csv" in text and "test_R1.csv" in text
    assert "data.dir" in text


def test_sub_split_missing_classes_cannot_train_on_the_full_label_range(tmp_path):
    manual = tmp_path / "manual"
    lists = fabricate.leaf_dataset(str(manual), "soygene", "images")
    # A low-data subset holding classes 0 and 1 only: 2 classes, but test has label 2.
    fabricate.write_csv(
        str(manual / "train_val_1.csv"), [r for r in lists["train_val"] if r[1] < 2]
    )
    common = dict(check_published_counts=False)
    loaded = ufgir.load_leaf(
        "soygene", str(manual), str(tmp_path / "tfds"), "train_val_1", "train_val_1", **common
    )
    assert loaded.num_classes == 2
    with pytest.raises(
        DataError, match=r"split 'test' has label 2, outside the class range 0\.\.1"
    ):
        ufgir.load_leaf(
            "soygene", str(manual), str(tmp_path / "tfds"), "train_val_1", "test", **common
        )
