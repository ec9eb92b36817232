"""Evaluation shared by training, `clca_jax.evaluate` and the tools: the compiled step, one
pass over a split, throughput, and the summary a run writes.

Nothing here builds an optimizer: evaluating a workdir restores its parameters only.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import ml_collections
import numpy as np
import optax

from clca_jax import data, flops
from clca_jax.models.config import input_normalization
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import sharding

EVAL_STREAM = 2  # `fold_in(key(seed), EVAL_STREAM)` seeds the evaluation noise (see train.py)
DROPOUT_STREAM = 1  # a train step's dropout key: `fold_in(step key, DROPOUT_STREAM)`
SUMMARY_FILE = "summary.json"


def eval_loader(config: ml_collections.ConfigDict, img_size: int) -> data.EvalLoader:
    """This process's share of one pass over `config.data.eval_split`."""
    return data.make_eval_loader(
        config.data,
        img_size=img_size,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **normalization_kwargs(config.model),
    )


def normalization_kwargs(model_config: ml_collections.ConfigDict) -> dict:
    """The loaders' `mean` and `std`, from `model.normalization` (ImageNet's by default)."""
    mean, std = input_normalization(model_config)
    return {"mean": mean, "std": std}


def apply_model(model, variables: dict, images, *, train: bool, key):
    """Logits, aux and the new batch statistics (`{}` when the model has none).

    `key` feeds the `reduction` stream; in training `fold_in(key, DROPOUT_STREAM)` feeds
    `dropout` (dropout and stochastic depth), so the reduction noise is the same with or
    without them.
    """
    rngs = {"reduction": key}
    if train:
        rngs["dropout"] = jax.random.fold_in(key, DROPOUT_STREAM)
    if train and "batch_stats" in variables:
        (logits, aux), updates = model.apply(
            variables, images, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return logits, aux, updates["batch_stats"]
    logits, aux = model.apply(variables, images, train=train, rngs=rngs)
    return logits, aux, variables.get("batch_stats", {})


def eval_step(variables: dict, batch: dict, index, rng, *, model):
    """Metrics of one evaluation batch; `index` picks the batch's noise key from `rng`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), index)
    logits, _, _ = apply_model(model, variables, batch["image"], train=False, key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return metrics_lib.EvalMetrics.single_from_model_output(
        loss=loss, mask=batch["mask"], **metrics_lib.top_k_correct(logits, batch["label"])
    )


def compile_eval_step(model, variable_shardings, mesh):
    """The jitted evaluation step."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(variable_shardings, sharding.batch_sharding(mesh), replicated, replicated),
        out_shardings=replicated,
    )


def eval_key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), EVAL_STREAM))


class EvaluationStopped(Exception):
    """`evaluate`'s `should_stop` said to stop before the pass was complete."""


def evaluate(
    step_fn, variables: dict, loader: data.EvalLoader, mesh, rng, should_stop=None
) -> dict[str, float]:
    """One pass over the evaluation split.

    `should_stop`, if given, is asked before each batch; when it says so the pass raises
    `EvaluationStopped` (a preemption notice during the final evaluation).

    Returns:
      `loss`, `top1`, `top5` (fractions) over the real examples, `num_examples`, and
      `images_per_second`: model throughput of the compiled step on a batch already on the
      devices (data loading excluded), or 0 for an empty split.
    """
    batch_sharding = sharding.batch_sharding(mesh)
    total, batch = None, None
    for index, local in enumerate(loader):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        batch = sharding.global_batch(local, batch_sharding)
        total = metrics_lib.merge(total, step_fn(variables, batch, np.int32(index), rng))
    if total is None:
        return {"loss": 0.0, "top1": 0.0, "top5": 0.0, "num_examples": 0, "images_per_second": 0}
    result = metrics_lib.to_floats(total)
    result["num_examples"] = int(total.top1.count)
    result["images_per_second"] = measure_throughput(step_fn, variables, batch, rng)
    return result


def measure_throughput(step_fn, variables, batch, rng, repeats: int = 3) -> float:
    """Images per second of the compiled evaluation step on one resident batch."""
    jax.block_until_ready(step_fn(variables, batch, np.int32(0), rng))
    start = time.perf_counter()
    for index in range(repeats):
        out = step_fn(variables, batch, np.int32(index), rng)
    jax.block_until_ready(out)
    return repeats * batch["image"].shape[0] / (time.perf_counter() - start)


def count_parameters(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def count_gmacs(model) -> float:
    """Multiply-accumulates of one image in G (spec 8's convention)."""
    return flops.count_macs(model).gmacs


def make_summary(result: dict, config, model, params, **extra) -> dict:
    """The run's headline numbers (accuracies in %), its cost and its config.

    With a weight average (`result['by_weights']`, see `train.evaluate_and_keep_best`) the
    headline is of the weights `eval.select` names, and `raw` and `ema` hold each one's
    loss, top-1 and top-5.
    """
    for name, each in result.get("by_weights", {}).items():
        extra[name] = {"loss": each["loss"], "top1": 100 * each["top1"], "top5": 100 * each["top5"]}
    if "by_weights" in result:
        extra["weights"] = config.eval.select
    return {
        "split": config.data.eval_split,
        "num_examples": result["num_examples"],
        "top1": 100 * result["top1"],
        "top5": 100 * result["top5"],
        "loss": result["loss"],
        "gmacs": count_gmacs(model),
        "params": count_parameters(params),
        "images_per_second": result["images_per_second"],
        **extra,
        "config": json.loads(config.to_json()),
    }


def summary_line(summary: dict) -> str:
    return (
        f"{summary['split']} top-1 {summary['top1']:.2f}% (top-5 {summary['top5']:.2f}%, loss "
        f"{summary['loss']:.4f}) on {summary['num_examples']} images"
    )
