"""The training config: every field with its default, and the one up-front validation.

A config is an `ml_collections.ConfigDict` grouped as `data`, `model`, `init`, `optim`,
`train`, `eval`, `checkpoint` and `mesh`, plus `seed`. `default_config()` holds every field a
user may set, with the reference recipe (spec 6.1) as defaults; `clca_jax/configs/common.py`
starts from it. `validate_config` checks a config once, before any device, file or compile is
touched, and says which field is wrong, the value it saw and what it accepts.
"""

from __future__ import annotations

import difflib
import math
import os
import sys

import ml_collections
from absl import flags

from clca_jax.config_values import merge_saved
from clca_jax.data import default_data_config, validate_data_config
from clca_jax.models import VisionTransformer, create_model, default_model_config
from clca_jax.training.mixup import default_mixup_config, validate_mixup_config
from clca_jax.training.optim import ALWAYS_FROZEN, OPTIMIZERS, SCHEDULE_UNITS

ON_NONFINITE = ("stop", "skip")
EVAL_WEIGHTS = ("raw", "ema")


def default_config() -> ml_collections.ConfigDict:
    """Every training field, with spec 6.1's recipe as the defaults.

    Returns:
      A ConfigDict. `optim`: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.05 off for 1-D
      parameters, biases and embeddings), a learning rate stepped per epoch: linear warm-up from
      `warmup_lr` over `warmup_epochs`, cosine from `lr` to `min_lr` until `epochs -
      cooldown_epochs`, then `min_lr`. `train`: 50 epochs of batch 32. `eval`: batch 48, only
      after the last epoch (`every_epochs=0`). `mesh`: all devices on `data` (`-1`).
      `train.on_nonfinite`: what a step whose loss or gradient is NaN or infinite does:
      `stop` (the run stops, naming the step and the quantity, without saving) or `skip` (the
      step leaves the model unchanged and the run goes on); either way no bad update is applied.
      The training-recipe fields (`optim.name`, `optim.schedule_unit`, `optim.layer_decay`,
      `optim.backbone_lr_scale`, `optim.freeze_backbone_steps`, `train.label_smoothing`,
      `train.ema_decay`, `train.ema_warmup`, `eval.select`, and the model's
      `drop_path_rate` and `dropout_rate`) default to the reference recipe; the README's
      "Training recipe" section describes each.
      `train.mixup`: Mixup/CutMix of each global batch (`training.mixup`), off by default.
      `train.log_gradient_norms`: also log the gradient norm of every top-level parameter
      (each block, the CLA/IFA head, the CLR tokens, the patch embedding, the classifier) to
      TensorBoard as `grad_norm/<part>` every `log_every_steps`; off by default.
    """
    return ml_collections.ConfigDict(
        {
            "seed": 1,
            "data": default_data_config("csv"),
            "model": default_model_config(),
            "init": {"checkpoint": ""},
            "optim": {
                "lr": 1e-4,
                "weight_decay": 0.05,
                "b1": 0.9,
                "b2": 0.999,
                "eps": 1e-8,
                "warmup_epochs": 2,
                "warmup_lr": 1e-6,
                "min_lr": 1e-5,
                "cooldown_epochs": 5,
                "grad_clip_norm": 0.0,
                "name": "adamw",
                "momentum": 0.9,
                "nesterov": False,
                "schedule_unit": "epoch",
                "layer_decay": 1.0,
                "backbone_lr_scale": 1.0,
                "freeze_backbone_steps": 0,
            },
            "train": {
                "epochs": 50,
                "batch_size": 32,
                "log_every_steps": 50,
                "on_nonfinite": "stop",
                "label_smoothing": 0.0,
                "ema_decay": 0.0,
                "ema_warmup": False,
                "log_gradient_norms": False,
                "accumulation_steps": 1,
                "mixup": default_mixup_config(),
            },
            "eval": {"batch_size": 48, "every_epochs": 0, "select": "raw"},
            "checkpoint": {"every_steps": 1000, "max_to_keep": 2, "keep_best": True},
            "mesh": {"data": -1, "fsdp": 1, "heartbeat_timeout_seconds": 100},
        }
    )


def validate_config(config: ml_collections.ConfigDict) -> VisionTransformer:
    """Checks a whole training config; reads no data and starts no device.

    Returns:
      The model `config.model` describes (built once here; see `create_model`).

    Raises:
      ValueError: a field is unknown, missing, of the wrong type or out of range (the data
        section raises `clca_jax.data.DataError`, a ValueError).
    """
    _check_fields(config, default_config(), "config")
    _check_seed(config.seed)
    validate_data_config(config.data)
    model = create_model(config.model)  # checks every model field and the token schedule
    _check_optim(config.optim)
    _check_positive(
        config.train, ("epochs", "batch_size", "log_every_steps", "accumulation_steps"), "train"
    )
    if config.train.batch_size % config.train.accumulation_steps:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} does not split into "
            f"train.accumulation_steps={config.train.accumulation_steps} equal micro-batches; "
            "use a batch size that is a multiple of it."
        )
    _check_choice(config.train, "on_nonfinite", ON_NONFINITE, "train")
    _check_recipe(config)
    validate_mixup_config(config.train.mixup)
    _check_positive(config.eval, ("batch_size",), "eval")
    _check_non_negative(config.eval, ("every_epochs",), "eval")
    _check_non_negative(config.checkpoint, ("every_steps",), "checkpoint")
    _check_positive(config.checkpoint, ("max_to_keep",), "checkpoint")
    _check_mesh(config.mesh)
    _check_init(config.init)
    return model


def _check_fields(
    config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str
) -> None:
    """Unknown and missing fields, compared with `default_config()`, recursively."""
    for key in config.keys():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
            raise ValueError(
                f"{prefix}.{key} is not a known config field (known: "
                f"{', '.join(sorted(reference.keys()))}).{hint}"
            )
    for key in reference.keys():
        if key not in config:
            raise ValueError(
                f"{prefix}.{key} is missing; start configs from "
                "clca_jax.training.config.default_config() (clca_jax/configs/common.py does)."
            )
        if isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise ValueError(f"{prefix}.{key} must be a section, got {config[key]!r}.")
            _check_fields(config[key], reference[key], f"{prefix}.{key}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_choice(section: ml_collections.ConfigDict, field: str, choices, name: str):
    value = section[field]
    if value not in choices:
        raise ValueError(f"{name}.{field} must be one of {choices}, got {value!r}.")


MAX_SEED = 2**31 - 1  # the data loader's and NumPy's seeds take any value up to here


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}.")


def _check_positive(section: ml_collections.ConfigDict, fields: tuple[str, ...], name: str):
    for field in fields:
        value = section[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}.")


def _check_non_negative(section: ml_collections.ConfigDict, fields: tuple[str, ...], name: str):
    for field in fields:
        value = section[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}.{field} must be an integer >= 0, got {value!r}.")


def _check_optim(optim: ml_collections.ConfigDict) -> None:
    for field in ("lr", "warmup_lr", "min_lr", "weight_decay", "eps", "grad_clip_norm"):
        value = optim[field]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"optim.{field} must be a finite number >= 0, got {value!r}.")
    if optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {optim.lr!r}.")
    for field in ("b1", "b2"):
        value = optim[field]
        if not _is_number(value) or not 0 <= value < 1:
            raise ValueError(f"optim.{field} must be in [0, 1), got {value!r}.")
    _check_non_negative(optim, ("warmup_epochs", "cooldown_epochs"), "optim")


def _check_fraction(section: ml_collections.ConfigDict, field: str, name: str) -> None:
    value = section[field]
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name}.{field} must be a number in [0, 1), got {value!r}.")


def _check_bool(section: ml_collections.ConfigDict, field: str, name: str) -> None:
    if not isinstance(section[field], bool):
        raise ValueError(f"{name}.{field} must be True or False, got {section[field]!r}.")


def _check_recipe(config: ml_collections.ConfigDict) -> None:
    """The optimizer choice, layer-wise rates, freezing, label smoothing and EMA fields."""
    optim, train = config.optim, config.train
    _check_choice(optim, "name", OPTIMIZERS, "optim")
    _check_choice(optim, "schedule_unit", SCHEDULE_UNITS, "optim")
    _check_fraction(optim, "momentum", "optim")
    _check_bool(optim, "nesterov", "optim")
    if optim.nesterov and optim.name == "sgd" and not optim.momentum:
        raise ValueError("optim.nesterov=True needs optim.momentum > 0, got 0.")
    layer_decay = optim.layer_decay
    if not _is_number(layer_decay) or not 0 < layer_decay <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1] (1: off), got {layer_decay!r}.")
    scale = optim.backbone_lr_scale
    if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"optim.backbone_lr_scale must be a finite number > 0, got {scale!r}; freeze the "
            "backbone with optim.freeze_backbone_steps instead of a scale of 0."
        )
    steps = optim.freeze_backbone_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < ALWAYS_FROZEN:
        raise ValueError(
            f"optim.freeze_backbone_steps must be an integer >= 0, or {ALWAYS_FROZEN} "
            f"(always frozen), got {steps!r}."
        )
    _check_fraction(train, "label_smoothing", "train")
    _check_fraction(train, "ema_decay", "train")
    _check_bool(train, "ema_warmup", "train")
    _check_bool(train, "log_gradient_norms", "train")
    _check_choice(config.eval, "select", EVAL_WEIGHTS, "eval")
    if config.eval.select == "ema" and not train.ema_decay:
        raise ValueError(
            "eval.select='ema' needs the weight average: set train.ema_decay in (0, 1), "
            "e.g. 0.9998, or select 'raw'."
        )


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
    for field in ("data", "fsdp"):
        value = mesh[field]
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(
                f"mesh.{field} must be a positive device count or -1 (all remaining devices), "
                f"got {value!r}."
            )
    if mesh.data == -1 and mesh.fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1; at most one axis can take the rest.")
    _check_positive(mesh, ("heartbeat_timeout_seconds",), "mesh")


def _check_init(init: ml_collections.ConfigDict) -> None:
    path = init.checkpoint
    if not isinstance(path, str):
        raise ValueError(f"init.checkpoint must be a directory path or '', got {path!r}.")
    if path and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        raise ValueError(
            f"init.checkpoint={path!r} is not a converted model directory (no config.json in "
            "it). Convert weights with clca-convert --out DIR, or set "
            "--config.init.checkpoint='' to train from scratch."
        )


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A training config from plain values (a workdir's config.json), typed by the defaults.

    Raises:
      ValueError: a field is unknown to this version.
    """
    config = default_config()
    merge_saved(config, values, "config")
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors are one line and status 1, as absl's own parser reports
    them (`app.parse_flags_with_usage`): a bad value (`--config.train.batch_size=eight`), an
    unknown config name or flag, and an override of a field the config lacks
    (`--config.train.epoch=3`), none of which absl's handler catches once a command parses its
    own flags."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)
    except (AttributeError, KeyError) as error:
        overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
        print(
            f"FATAL Flags parsing error: one of {overrides} names a field the config does not "
            f"have ({_innermost_message(error)}). The config file's get_config() lists the "
            "fields; overrides cannot add new ones.",
            file=sys.stderr,
        )
        sys.exit(1)


def _innermost_message(error: BaseException) -> str:
    """ml_collections wraps the KeyError of the missing field in an AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return message.replace("\n", " ")
