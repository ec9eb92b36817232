"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The sections follow the data: mesh, input, model, optimizer, state, steps, loop. Each is a
small function that tests call on their own; `train_and_evaluate` strings them together.

Randomness: one seed. The initial parameters use `fold_in(key(seed), 0)`; the train state
carries the base key `fold_in(key(seed), 1)` and step `s` draws its token-reduction noise from
`fold_in(base, s)`, so a resumed run repeats the uninterrupted one; evaluation batch `i` uses
`fold_in(fold_in(key(seed), 2), i)`. The data order and augmentation are the loader's, seeded
with the same seed and resumed from its saved position.

Interruptions lose nothing but the steps since the last checkpoint: a killed run restarted with
the same command resumes from its latest complete checkpoint and ends with the parameters and
metrics of an uninterrupted run; SIGTERM (a preemption notice) makes the run save at the next
step and stop (`Preempted`; `clca_jax.main` then exits with status 0). A step whose loss or
gradient is not finite changes nothing; `train.on_nonfinite` says whether the run then stops
(`NonFiniteError`, before anything else is saved) or goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from clca_jax import data, pretrained
from clca_jax.models import create_model
from clca_jax.models.config import resolve_backbone
from clca_jax.training import checkpoint, optim, sharding
from clca_jax.training import metrics as metrics_lib
from clca_jax.training.config import validate_config
from clca_jax.training.warm_start import warm_start

INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
INIT_REPORT_FILE = "init.txt"
TENSORBOARD_DIR = "tensorboard"
# Test hook: `step:N` or `save:N` makes the run SIGKILL itself there (see `_test_kill_point`).
TEST_KILL_ENV = "CLCA_TEST_KILL_AT"


class Preempted(Exception):
    """Training stopped at a preemption notice (SIGTERM) after saving a checkpoint.

    Attributes:
      step: the step saved; rerunning the same command continues from it.
    """

    def __init__(self, step: int, workdir: str):
        self.step = step
        super().__init__(
            f"preempted (SIGTERM): saved step {step} in {workdir} and stopped; rerun the same "
            "command to continue."
        )


class NonFiniteError(FloatingPointError):
    """A train step's loss or gradient was NaN or infinite and `train.on_nonfinite='stop'`."""


# ----------------------------------------------------------------------------------------------
# Input.


@dataclasses.dataclass
class Input:
    """The loaders of a run and what the model needs to know about the data.

    Attributes:
      train: endless, resumable stream of this process's training batches.
      eval: one pass over the evaluation split, padding masked.
      info: class count and split sizes.
    """

    train: data.TrainLoader
    eval: data.EvalLoader
    info: data.DatasetInfo


def make_input(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Input:
    """Loaders for `config.data`, sized for the model and split over the processes."""
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    processes = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    img_size = config.model.img_size
    train = data.make_train_loader(
        config.data,
        img_size=img_size,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        **processes,
    )
    evaluation = make_eval_loader(config, img_size)
    return Input(train=train, eval=evaluation, info=data.dataset_info(config.data))


def make_eval_loader(config: ml_collections.ConfigDict, img_size: int) -> data.EvalLoader:
    """This process's share of one pass over `config.data.eval_split`."""
    return data.make_eval_loader(
        config.data,
        img_size=img_size,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


# ----------------------------------------------------------------------------------------------
# Model.


def resolve_config(config: ml_collections.ConfigDict, num_classes: int):
    """A copy of `config` whose model has the data's class count (spec 6.3: the classes of the
    training split decide the head)."""
    resolved = config.copy_and_resolve_references()
    if resolved.model.num_classes != num_classes:
        logging.info(
            "model.num_classes: %d in the config, %d in the training split; using %d.",
            resolved.model.num_classes,
            num_classes,
            num_classes,
        )
        resolved.model.num_classes = num_classes
    return resolved


def model_init_fn(model, img_size: int):
    """`key -> variables` of the model, from a dummy batch of one image."""

    def init(key):
        params_key, reduction_key = jax.random.split(key)
        images = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
        return model.init({"params": params_key, "reduction": reduction_key}, images, train=False)

    return init


def init_variables(model, img_size: int, seed: int, mesh: jax.sharding.Mesh) -> dict:
    """Fresh variables, created directly on their shardings."""
    init = model_init_fn(model, img_size)
    key = jax.random.fold_in(jax.random.key(seed), INIT_STREAM)
    shardings = sharding.tree_shardings(jax.eval_shape(init, key), mesh)
    return jax.jit(init, out_shardings=shardings)(key)


def load_init_checkpoint(
    config: ml_collections.ConfigDict, variables: dict, mesh: jax.sharding.Mesh
) -> tuple[dict, list[str]]:
    """Variables warm-started from `config.init.checkpoint` (see `training.warm_start`).

    Returns:
      The variables on the same shardings as `variables`, and the report lines.
    """
    path = os.path.expanduser(config.init.checkpoint)
    _, source = pretrained.load_pretrained(path)
    backbone = resolve_backbone(config.model)
    merged, report = warm_start(
        variables,
        source,
        grid=config.model.img_size // backbone.patch_size,
        no_embed_class=backbone.no_embed_class,
        seed=config.seed,
    )
    shardings = sharding.tree_shardings(variables, mesh)
    return sharding.host_to_global(merged, shardings), [f"from {path}"] + report.lines()


def count_parameters(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def count_gmacs(model_config: ml_collections.ConfigDict) -> float | None:
    """Multiply-accumulates of one image in G (spec 8's convention), or None where
    `clca_jax.flops` is not available."""
    try:
        from clca_jax import flops
    except ImportError:
        return None
    return flops.count_macs(model_config).gmacs


# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """AdamW with the reference mask and its per-epoch schedule; returns (tx, schedule)."""
    schedule = optim.learning_rate_schedule(config.optim, config.train.epochs, steps_per_epoch)
    # The reference's plain ViT decays its CLR tokens (a misspelt exclusion list); keep that.
    decay_clr = config.model.reduction.method == "none"
    return optim.make_optimizer(config.optim, schedule, decay_clr=decay_clr), schedule


# ----------------------------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; all arrays, so orbax saves it whole.

    Attributes:
      step: optimizer steps taken.
      params: model parameters (float32).
      batch_stats: BatchNorm statistics, `{}` for models without BatchNorm.
      opt_state: optimizer state.
      rng: base key data (uint32) of the per-step token-reduction noise.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        """The model variables, as `model.apply` takes them."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def _new_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = variables["params"]
    base_key = jax.random.fold_in(jax.random.key(seed), TRAIN_STREAM)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(base_key),
    )


def abstract_train_state(model, tx, img_size: int, seed: int, mesh: jax.sharding.Mesh):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    init = model_init_fn(model, img_size)
    shapes = jax.eval_shape(lambda key: _new_state(init(key), tx, seed), jax.random.key(seed))
    return checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))


def create_train_state(
    variables: dict, tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh
) -> TrainState:
    """Step 0 of training from the given variables (consumed), every leaf on its sharding."""
    create = functools.partial(_new_state, tx=tx, seed=seed)
    shardings = sharding.tree_shardings(jax.eval_shape(create, variables), mesh)
    return jax.jit(create, out_shardings=shardings, donate_argnums=0)(variables)


def initial_state(config, model, tx, mesh, workdir: str) -> TrainState:
    """Fresh variables, warm-started from `config.init.checkpoint` when set."""
    variables = init_variables(model, config.model.img_size, config.seed, mesh)
    if config.init.checkpoint:
        variables, report = load_init_checkpoint(config, variables, mesh)
        for line in report:
            logging.info("init: %s", line)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, INIT_REPORT_FILE), "w") as f:
                f.write("\n".join(report) + "\n")
    else:
        logging.info("init: from scratch (config.init.checkpoint is empty).")
    return create_train_state(variables, tx, config.seed, mesh)


def restore_or_create_state(config, model, tx, mesh, checkpoints, train_loader, workdir: str):
    """The latest checkpoint of the workdir with its input position, or a new state."""
    if checkpoints.latest_step() is None:
        return initial_state(config, model, tx, mesh, workdir)
    abstract = abstract_train_state(model, tx, config.model.img_size, config.seed, mesh)
    state, loader_state = checkpoints.restore(abstract)
    if int(loader_state["step"]) != int(state.step):
        raise ValueError(
            f"checkpoint {checkpoints.latest_step()} in {workdir} has train step "
            f"{int(state.step)} but input position {loader_state['step']}; it is damaged. "
            "Delete that step's folder to resume from the previous one."
        )
    train_loader.set_state(loader_state)
    logging.info("Resumed from step %d of %s.", int(state.step), workdir)
    return state


# ----------------------------------------------------------------------------------------------
# Steps.


def apply_model(model, variables: dict, images, *, train: bool, key):
    """Logits, aux and the new batch statistics (`{}` when the model has none)."""
    rngs = {"reduction": key}
    if train and "batch_stats" in variables:
        (logits, aux), updates = model.apply(
            variables, images, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return logits, aux, updates["batch_stats"]
    logits, aux = model.apply(variables, images, train=train, rngs=rngs)
    return logits, aux, variables.get("batch_stats", {})


def train_step(state: TrainState, batch: dict, *, model, tx, schedule):
    """One optimizer step on a global batch; returns the new state and its metrics.

    The loss is the mean cross-entropy plus the model's `aux['extra_loss']` (DynamicViT's ratio
    loss), when it reports one.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        variables = state.replace(params=params).variables()
        logits, aux, batch_stats = apply_model(
            model, variables, batch["image"], train=True, key=key
        )
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        loss = cross_entropy.mean() + aux.get("extra_loss", 0.0)
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updated = state.replace(
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    what = nonfinite_what(loss, grads)
    # A bad step changes nothing but the step count, so the data and noise streams stay aligned.
    kept = jax.tree.map(lambda new, old: jnp.where(what < 0, new, old), updated, state)
    new_state = kept.replace(step=state.step + 1)
    step_metrics = metrics_lib.train_step_metrics(
        loss, schedule(state.step), logits, batch["label"], new_state.step, what
    )
    return new_state, step_metrics


def nonfinite_what(loss, grads) -> jax.Array:
    """-1 when the loss and every gradient are finite; else 0 when the loss is not, or `i + 1`
    for the first gradient leaf `i` (in `jax.tree.leaves` order) that is not."""
    finite = jnp.stack(
        [jnp.isfinite(loss).all()] + [jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]
    )
    return jnp.where(finite.all(), -1, jnp.argmin(finite)).astype(jnp.int32)


def leaf_names(tree) -> list[str]:
    """'/'-joined paths of a tree's leaves, in `jax.tree.leaves` order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(key, "key", key)) for key in path) for path, _ in paths]


def eval_step(variables: dict, batch: dict, index, rng, *, model):
    """Metrics of one evaluation batch; `index` picks the batch's noise key from `rng`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), index)
    logits, _, _ = apply_model(model, variables, batch["image"], train=False, key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return metrics_lib.EvalMetrics.single_from_model_output(
        loss=loss, mask=batch["mask"], **metrics_lib.top_k_correct(logits, batch["label"])
    )


def compile_train_step(model, tx, schedule, state_shardings, mesh):
    """The jitted train step: explicit shardings, the state donated."""
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
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


def evaluate(step_fn, variables: dict, loader: data.EvalLoader, mesh, rng) -> dict[str, float]:
    """One pass over the evaluation split.

    Returns:
      `loss`, `top1`, `top5` (fractions) over the real examples, `num_examples`, and
      `images_per_second`: model throughput of the compiled step on a batch already on the
      devices (data loading excluded), or 0 for an empty split.
    """
    batch_sharding = sharding.batch_sharding(mesh)
    total, batch = None, None
    for index, local in enumerate(loader):
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


# ----------------------------------------------------------------------------------------------
# Loop.


class PreemptionNotice:
    """SIGTERM, the notice a preemptible machine gets, asks the loop to save and stop.

    With one process, a handler (installed while the object is entered) sets a flag that the
    loop reads after each step. With several, JAX's preemption service, started by
    `jax.distributed.initialize`, catches the signal and lets all processes agree on the step
    at which they save together.
    """

    def __init__(self):
        self.received = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> PreemptionNotice:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # only a flag: a handler must not log or block

    def reached(self, step: int) -> bool:
        """Whether to save at `step` (steps done) and stop."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received


def _test_kill_point(phase: str, step: int) -> None:
    """Test hook, unset in real runs: `CLCA_TEST_KILL_AT=step:N` SIGKILLs this process right
    after train step N, `save:N` right after the save of step N has started (orbax is then
    writing it in the background), `term:N` sends it SIGTERM after step N; so the tests
    interrupt runs at reproducible points."""
    hook = os.environ.get(TEST_KILL_ENV)
    if hook == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "step" and hook == f"term:{step}":
        os.kill(os.getpid(), signal.SIGTERM)


@dataclasses.dataclass
class Run:
    """What the loop needs besides the state.

    Attributes:
      config: the resolved config.
      inputs: the loaders.
      train_step: the compiled train step.
      run_eval: `variables -> metrics dict`, one pass over the evaluation split.
      checkpoints: the workdir's checkpoints.
      writer: TensorBoard writer.
      total_steps: steps of the whole run.
      param_names: parameter paths, to name a non-finite gradient.
      preemption: tells the loop when to save and stop.
    """

    config: ml_collections.ConfigDict
    inputs: Input
    train_step: Any
    run_eval: Any
    checkpoints: checkpoint.Checkpoints
    writer: metrics_lib.MetricWriter
    total_steps: int
    param_names: list[str]
    preemption: PreemptionNotice


def train_loop(run: Run, state: TrainState, mesh) -> TrainState:
    """Steps from `state.step` to the end: reports, evaluations and checkpoints on the way."""
    config, loader = run.config, run.inputs.train
    batch_sharding = sharding.batch_sharding(mesh)
    progress = metrics_lib.Progress(run.total_steps)
    eval_every = config.eval.every_epochs * loader.steps_per_epoch
    running = None
    for step in range(int(state.step), run.total_steps):
        batch = sharding.global_batch(next(loader), batch_sharding)
        state, step_metrics = run.train_step(state, batch)
        running = metrics_lib.merge(running, step_metrics)
        done = step + 1
        _test_kill_point("step", done)
        if done % config.train.log_every_steps == 0 or done == run.total_steps:
            check_finite(run, running)
            report_train(run, progress, done, loader.steps_per_epoch, running)
            running = None
        if eval_every and done % eval_every == 0 and done < run.total_steps:
            evaluate_and_keep_best(run, state, done)
        every = config.checkpoint.every_steps
        preempted = run.preemption.reached(done)
        if (every and done % every == 0) or done == run.total_steps or preempted:
            if running is not None and config.train.on_nonfinite == "stop":
                check_finite(run, running)  # never save past a bad step
            run.checkpoints.save(done, state, loader.get_state())
            _test_kill_point("save", done)
        if preempted:
            raise Preempted(done, run.checkpoints.workdir)
    return state


def check_finite(run: Run, running) -> None:
    """Acts on the first non-finite step among the running metrics, if any: a warning with
    `train.on_nonfinite='skip'`, else `NonFiniteError` naming the step and the quantity."""
    record = metrics_lib.first_nonfinite(running)
    if record is None:
        return
    step, what, count = record
    quantity = "the loss" if what == 0 else f"the gradient of {run.param_names[what - 1]}"
    if run.config.train.on_nonfinite == "skip":
        logging.warning(
            "step %d: %s is not finite; skipped it (%d such step(s) since the last report, "
            "train.on_nonfinite='skip').",
            step,
            quantity,
            count,
        )
        return
    latest = run.checkpoints.latest_step()
    kept = "no checkpoint was written" if latest is None else f"checkpoint {latest} is intact"
    raise NonFiniteError(
        f"step {step}: {quantity} is not finite (NaN or inf); training stopped without saving "
        f"({kept}; train.on_nonfinite='stop'). Lower optim.lr, set optim.grad_clip_norm, check "
        "the input data, or pass --config.train.on_nonfinite=skip to skip such steps."
    )


def report_train(run: Run, progress, step: int, steps_per_epoch: int, running) -> None:
    """Writes the running averages to TensorBoard and one progress line to the log."""
    scalars = metrics_lib.to_floats(running)
    scalars.update(progress.update(step))
    run.writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
    epoch = -(-step // steps_per_epoch)
    logging.info(progress.line(step, epoch, run.config.train.epochs, scalars))


def evaluate_and_keep_best(run: Run, state: TrainState, step: int) -> dict[str, float]:
    """Evaluates, logs, and offers the model to the best-checkpoint keeper."""
    result = run.run_eval(state.variables())
    split = run.config.data.eval_split
    scalars = {k: result[k] for k in ("loss", "top1", "top5")}
    run.writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    logging.info(
        "eval on %s at step %d: top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images",
        split,
        step,
        100 * result["top1"],
        100 * result["top5"],
        result["loss"],
        result["num_examples"],
    )
    run.checkpoints.save_best(step, state.variables(), scalars)
    return result


def check_same_model(path: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose saved config (at `path`) describes another model: its
    checkpoints cannot continue this one."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = _flat(json.load(f).get("model", {}), "model.")
    now = _flat(json.loads(config.to_json())["model"], "model.")
    changed = {k: (before.get(k), now.get(k)) for k in before.keys() | now.keys()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(
            f"{os.path.dirname(path)} holds a run of another model ({listed}); nothing was "
            "changed. Use a new --workdir for this model, or the saved model settings to "
            "resume that run."
        )


def warn_if_config_changed(path: str, config: ml_collections.ConfigDict) -> None:
    """Logs the fields that differ from the config an earlier run wrote to the workdir."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = _flat(json.load(f))
    now = _flat(json.loads(config.to_json()))
    changed = {k: (before.get(k), now.get(k)) for k in before.keys() | now.keys()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        logging.warning("The config differs from the one this workdir was started with: %s", listed)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_summary(result: dict, config, params, **extra) -> dict:
    """The run's headline numbers (accuracies in %) and its config."""
    return {
        "split": config.data.eval_split,
        "num_examples": result["num_examples"],
        "top1": 100 * result["top1"],
        "top5": 100 * result["top5"],
        "loss": result["loss"],
        "gmacs": count_gmacs(config.model),
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as `config` says, resuming from `workdir` if it holds a checkpoint, then
    evaluates on `config.data.eval_split` and writes `workdir/summary.json`.

    Args:
      config: a training config (see `clca_jax.training.config.default_config`).
      workdir: where checkpoints, logs and the summary go.

    Returns:
      The summary dict.

    Raises:
      Preempted: SIGTERM arrived; the run saved a checkpoint and stopped.
      NonFiniteError: a step was not finite and `train.on_nonfinite='stop'`.
      ValueError, OSError: the config, the workdir, a checkpoint or the data is unusable;
        these are raised before anything in the workdir is changed, except data errors
        found while training, which leave the earlier checkpoints as they were.
    """
    validate_config(config)
    sharding.initialize_distributed()
    metrics_lib.quiet_checkpoint_logs()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpoint.check_writable(workdir)
    # Mesh.
    mesh = sharding.make_mesh(config.mesh)
    logging.info("Mesh %s over %d device(s).", dict(mesh.shape), mesh.size)
    # Input.
    inputs = make_input(config, mesh)
    config = resolve_config(config, inputs.info.num_classes)
    check_same_model(os.path.join(workdir, CONFIG_FILE), config)
    # Model.
    model = create_model(config.model)
    # Optimizer.
    tx, schedule = make_optimizer(config, inputs.train.steps_per_epoch)
    total_steps = config.train.epochs * inputs.train.steps_per_epoch
    # State.
    checkpoints = checkpoint.Checkpoints(
        workdir, config.checkpoint.max_to_keep, config.checkpoint.keep_best
    )
    writer = None
    try:
        state = restore_or_create_state(config, model, tx, mesh, checkpoints, inputs.train, workdir)
        # Written only now, so a refused restart leaves the workdir as it was.
        warn_if_config_changed(os.path.join(workdir, CONFIG_FILE), config)
        metrics_lib.write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))
        writer = metrics_lib.MetricWriter(os.path.join(workdir, TENSORBOARD_DIR))
        logging.info(
            "%s: %d parameters, %d classes, %d steps (%d epochs of %d).",
            config.model.backbone,
            count_parameters(state.params),
            config.model.num_classes,
            total_steps,
            config.train.epochs,
            inputs.train.steps_per_epoch,
        )
        # Steps.
        state_shardings = sharding.tree_shardings(state, mesh)
        eval_fn = compile_eval_step(model, state_shardings.variables(), mesh)
        rng = eval_key(config.seed)
        run = Run(
            config=config,
            inputs=inputs,
            train_step=compile_train_step(model, tx, schedule, state_shardings, mesh),
            run_eval=lambda variables: evaluate(eval_fn, variables, inputs.eval, mesh, rng),
            checkpoints=checkpoints,
            writer=writer,
            total_steps=total_steps,
            param_names=leaf_names(state.params),
            preemption=PreemptionNotice(),
        )
        # Loop.
        start = time.perf_counter()
        with run.preemption:
            state = train_loop(run, state, mesh)
        train_seconds = time.perf_counter() - start
        result = evaluate_and_keep_best(run, state, total_steps)
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
    summary = make_summary(
        result, config, state.params, steps=total_steps, train_seconds=train_seconds
    )
    metrics_lib.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    logging.info("%s; summary in %s", summary_line(summary), os.path.join(workdir, SUMMARY_FILE))
    return summary
