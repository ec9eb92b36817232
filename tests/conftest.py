"""Fixtures shared by several test modules."""

import pytest

from clca_jax import train
from tests.test_train_loop import fabricated_folder, tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Data and a workdir holding a finished 1-epoch run (checkpoints 2 and 3)."""
    root = tmp_path_factory.mktemp("inputs")
    data_dir = fabricated_folder(str(root / "data"))
    workdir = str(root / "finished")
    train.train_and_evaluate(tiny_config(data_dir, train__epochs=1), workdir)
    return root, data_dir, workdir
