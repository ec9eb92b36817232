"""Demo data from the animal-mnist package, and the data layer working without TensorFlow."""

import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

import clca_jax.data as data
from clca_jax.data import demo
from clca_jax.data.splits import DataError


def test_raw_package_data_has_the_known_duplicates():
    images, labels = demo.load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(demo.first_occurrences(images)) == 10000 - 284


def test_first_occurrences_keeps_the_first_copy():
    images = np.array([[1], [2], [1], [3], [2]], np.uint8)
    np.testing.assert_array_equal(demo.first_occurrences(images), [0, 1, 3])


def test_demo_split_is_fixed_disjoint_and_duplicate_free():
    info = data.dataset_info(data.default_data_config("demo"))
    assert (info.num_classes, info.num_train, info.num_eval) == (10, 7769, 1947)
    assert info.class_names[0] == "bear" and info.class_names[-1] == "zebra"
    images, labels = demo.demo_splits()
    both = np.concatenate([images["train"], images["test"]]).reshape(9716, -1)
    assert len(np.unique(both, axis=0)) == 9716
    # The carve: int(0.8 n) per class; elephants, giraffes and zebras keep all 1000 images.
    assert np.bincount(labels["train"])[5] == 800 and np.bincount(labels["test"])[5] == 200


def test_demo_batches_are_rgb_and_resized():
    config = data.default_data_config("demo")
    batch = next(data.make_train_loader(config, img_size=32, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3)
    # Gray silhouettes become RGB with three equal channels before normalisation.
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    pixels = batch["image"] * std + mean
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)


def test_demo_unknown_split_is_an_error():
    config = data.default_data_config("demo")
    config.eval_split = "val"
    with pytest.raises(DataError, match=r"demo data has no split 'val'; its splits are"):
        data.dataset_info(config)


def _site_packages_without_tensorflow(target):
    """A folder of links to every installed package except TensorFlow itself."""
    site_packages = sysconfig.get_paths()["purelib"]
    target.mkdir()
    for entry in os.listdir(site_packages):
        if entry == "tensorflow" or entry.startswith("tensorflow-"):
            continue
        os.symlink(os.path.join(site_packages, entry), target / entry)
    return target


def test_data_layer_runs_without_tensorflow(tmp_path):
    # CI installs without TensorFlow; here it is hidden by running on a copy of site-packages
    # without it (python -S skips the real site-packages).
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None
        import clca_jax.data as data
        from clca_jax.data import ufgir
        from clca_jax.data import fabricate

        config = data.default_data_config("demo")
        next(data.make_train_loader(config, img_size=16, global_batch_size=4, seed=0))
        fabricate.leaf_dataset({str(tmp_path)!r} + "/manual", "cotton", "cotton_square_new")
        builder = ufgir.prepare("cotton", {str(tmp_path)!r} + "/manual",
                                {str(tmp_path)!r} + "/tfds", check_published_counts=False)
        assert ufgir.TfdsSource(builder, "test")[0].label == 0
        assert "tensorflow" not in sys.modules
        print("ok")
        """
    )
    site = _site_packages_without_tensorflow(tmp_path / "site")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, str(site)]))
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
