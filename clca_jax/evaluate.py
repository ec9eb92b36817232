"""Evaluates a trained workdir or a converted model directory on a split.

    # a training workdir (its saved config; the latest checkpoint, or --checkpoint=best)
    python -m clca_jax.evaluate --workdir=runs/demo
    # the moving average of the weights of a run with train.ema_decay > 0
    python -m clca_jax.evaluate --workdir=runs/demo --weights=ema
    # a converted model directory (clca-convert --out DIR): the data, eval
    # and mesh sections come from a config file
    python -m clca_jax.evaluate --workdir=pretrained/clca_soyglobal \
        --config=soyglobal --config.data.dir=/data/soyglobal

It prints the summary that training writes to `summary.json` (top-1, top-5, loss, GMACs,
parameters, images/s, config).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags, logging

from clca_jax import commands, config_files, data, pretrained, user_errors
from clca_jax.training import checkpoint, evaluation, sharding, workdirs
from clca_jax.training import metrics as metrics_lib
from clca_jax.training.config import EVAL_WEIGHTS, parse_flags, validate_config


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module defines none)."""
    flags.DEFINE_string(
        "workdir", None, "A training workdir or a converted model directory.", required=True
    )
    config_files.DEFINE_config(
        "config",
        None,
        "Config name or file: required for a converted model directory; for a workdir its "
        "data, eval and mesh sections replace the saved ones.",
    )
    flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
    flags.DEFINE_bool("debug", False, "Show the traceback of a config, data or file error.")
    flags.DEFINE_enum(
        "checkpoint", "latest", ["latest", "best"], "Which checkpoint of a training workdir."
    )
    flags.DEFINE_enum(
        "weights",
        None,
        list(EVAL_WEIGHTS),
        "Which weights of a training workdir's latest checkpoint: raw, or ema (their moving "
        "average; the run needs train.ema_decay > 0). Default: the run's eval.select, the "
        "weights best/ keeps.",
    )


def evaluate_directory(
    directory: str,
    config: ml_collections.ConfigDict | None = None,
    split: str | None = None,
    which: str = "latest",
    weights: str | None = None,
) -> dict:
    """Evaluates the model in `directory` and returns the summary.

    Args:
      directory: a training workdir or a converted model directory.
      config: for a converted model, the config whose data/eval/mesh sections to use
        (required); for a workdir, optional replacement of those sections.
      split: the split to evaluate; default `config.data.eval_split`.
      which: `latest` or `best` checkpoint of a training workdir.
      weights: `raw` or `ema` weights of a training workdir; default the run's `eval.select`
        (`best/` holds only those).

    Raises:
      FileNotFoundError: `directory` is neither kind, or lacks its checkpoint.
      ValueError: the config is invalid, or the model's classes do not fit the data.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    if pretrained.is_converted_model(directory):
        if config is None:
            raise ValueError(
                f"{directory} is a converted model; pass --config (e.g. soyglobal) "
                "to say which data to evaluate it on."
            )
        config, source = _converted_config(directory, config), "converted"
    elif os.path.isdir(os.path.join(directory, checkpoint.LATEST_DIR)):
        config, source = workdir_config(directory, config), which
    else:
        raise FileNotFoundError(
            f"{directory} is neither a training workdir (no {checkpoint.LATEST_DIR}/) nor a "
            f"converted model directory (no {pretrained.VARIABLES_DIR}/)."
        )
    if split:
        config.data.eval_split = split
    model = validate_config(config)
    weights = _check_weights(config, source, weights)
    sharding.initialize_distributed(config.mesh.heartbeat_timeout_seconds)
    metrics_lib.quiet_library_logs()
    mesh = sharding.make_mesh(_mesh_for_this_machine(config.mesh))
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    _check_classes(config)
    variables, step = load_variables(directory, source, model, mesh, weights)
    eval_fn = evaluation.compile_eval_step(model, sharding.tree_shardings(variables, mesh), mesh)
    loader = evaluation.eval_loader(config, model.img_size)
    result = evaluation.evaluate(eval_fn, variables, loader, mesh, evaluation.eval_key(config.seed))
    return evaluation.make_summary(
        result,
        config,
        model,
        variables["params"],
        model_dir=directory,
        checkpoint=source,
        step=step,
        weights=weights,
    )


def _check_weights(config, source: str, weights: str | None) -> str:
    """The weights to evaluate; refuses the average of a run without one, and weights that
    `best/` does not hold."""
    if source == "converted":
        return "raw"
    selected = config.eval.select
    weights = weights or selected
    if weights == "ema" and not config.train.ema_decay:
        raise ValueError(
            "--weights=ema: this run kept no moving average of its weights "
            "(train.ema_decay=0); evaluate --weights=raw."
        )
    if source == "best" and weights != selected:
        raise ValueError(
            f"--weights={weights}: best/ holds the {selected} weights (eval.select={selected!r} "
            f"in training); use --checkpoint=latest for the {weights} weights."
        )
    return weights


def workdir_config(directory: str, override) -> ml_collections.ConfigDict:
    """The run config saved in a workdir; `override`'s data, eval and mesh sections, if given,
    replace the saved ones."""
    config = workdirs.read_run_config(directory)
    if override is not None:
        for section in ("data", "eval", "mesh"):
            config[section] = override[section]
    return config


def _converted_config(directory: str, config) -> ml_collections.ConfigDict:
    model_config = pretrained.read_model_config(directory)
    config = config.copy_and_resolve_references()
    config.model = model_config
    config.init.checkpoint = ""
    return config


def _mesh_for_this_machine(mesh_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The configured mesh, or all devices on `data` when the run was trained on a device
    count this machine does not have (evaluation needs no particular layout)."""
    try:
        sharding.mesh_shape(mesh_config, jax.device_count())
        return mesh_config
    except ValueError as error:
        logging.info("%s Evaluating with all devices on data instead.", error)
        return ml_collections.ConfigDict({"data": -1, "fsdp": 1})


def _check_classes(config) -> None:
    info = data.dataset_info(config.data)
    if info.num_classes != config.model.num_classes:
        raise ValueError(
            f"the model has {config.model.num_classes} classes but the training split of "
            f"data.name={config.data.name!r} has {info.num_classes}; evaluate it on the data it "
            "was trained or converted for."
        )


def load_variables(directory, source, model, mesh, weights="raw") -> tuple[dict, int | None]:
    """The model variables on the mesh, and the training step they come from (no optimizer
    state is built or read); `weights='ema'` reads the latest checkpoint's moving average."""
    if source == "converted":
        _, variables = pretrained.load_pretrained(directory)
        host = jax.tree.map(jax.device_get, variables)
        return sharding.host_to_global(host, sharding.tree_shardings(host, mesh)), None
    shapes = model.abstract_variables()
    abstract = checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    checkpoints = checkpoint.Checkpoints(directory, read_only=True)
    try:
        if source == "best":
            step = checkpoints.best_step()
            return checkpoints.restore_best(abstract), step
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}/{checkpoint.LATEST_DIR} holds no checkpoint.")
        part = "ema" if weights == "ema" else ""
        return checkpoints.restore_variables(abstract, step, part=part), step
    finally:
        checkpoints.close()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    with user_errors.reported(FLAGS.debug):
        summary = evaluate_directory(
            FLAGS.workdir, FLAGS.config, FLAGS.split, FLAGS.checkpoint, FLAGS.weights
        )
    logging.info(evaluation.summary_line(summary))
    print(json.dumps(summary, indent=2, sort_keys=True))


def cli() -> None:
    """`python -m clca_jax.evaluate`, the `clca-evaluate` command."""
    define_flags()
    commands.run(main, flags_parser=parse_flags, doc=__doc__, config_help=True)


if __name__ == "__main__":
    cli()
