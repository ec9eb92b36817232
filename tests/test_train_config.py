"""Validation of a whole training config, before anything runs."""

import pytest

from clca_jax.training.config import config_from_dict, default_config, validate_config


def _valid():
    config = default_config()
    config.data.name = "demo"
    config.data.train_split, config.data.eval_split = "train", "test"
    return config


def test_defaults_are_valid_and_round_trip_through_json():
    config = _valid()
    validate_config(config)
    import json

    again = config_from_dict(json.loads(config.to_json()))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.train.__setitem__("epochs", 0), r"train.epochs must be a positive integer"),
        (lambda c: c.optim.__setitem__("lr", 0.0), r"optim.lr must be > 0"),
        (lambda c: c.optim.__setitem__("b2", 1.0), r"optim.b2 must be in \[0, 1\)"),
        (lambda c: c.mesh.__setitem__("fsdp", 0), r"mesh.fsdp must be a positive device count"),
        (lambda c: c.eval.__setitem__("batch_size", -4), r"eval.batch_size must be a positive"),
        (
            lambda c: c.init.__setitem__("checkpoint", "/nonexistent/model"),
            r"init.checkpoint='/nonexistent/model' is not a converted model directory",
        ),
        (lambda c: c.model.__setitem__("img_size", 100), r"model.img_size=100 is not divisible"),
    ],
)
def test_bad_values_name_the_field_and_the_value(mutate, message):
    config = _valid()
    mutate(config)
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_unknown_and_missing_fields_are_errors():
    config = _valid()
    config.train.unlock()
    config.train.epoch = 3
    with pytest.raises(ValueError, match=r"config.train.epoch is not a known.*config.train.epochs"):
        validate_config(config)
    config = _valid()
    del config.optim["min_lr"]
    with pytest.raises(ValueError, match=r"config.optim.min_lr is missing"):
        validate_config(config)


def test_saved_config_with_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match=r"config.train.foo in the saved config"):
        config_from_dict({"train": {"foo": 1}})
