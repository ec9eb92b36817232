"""Training: `train_and_evaluate(config, workdir)`.

The sections follow the data: mesh, input, model, optimizer, state, steps, loop. Each is a
small function that tests call on their own; `train_and_evaluate` strings them together. The
pieces it shares with `clca_jax.evaluate` live in `clca_jax.training`: `evaluation` (the eval
step, one pass over a split, throughput, the summary), `workdirs` (the saved run config and
its checks), `preemption` (SIGTERM), `warm_start`, `checkpoint`, `sharding`, `optim`.

Randomness: one seed. The initial parameters use `fold_in(key(seed), 0)`; the train state
carries the base key `fold_in(key(seed), 1)` and step `s` draws its token-reduction noise from
`fold_in(base, s)` (dropout and stochastic depth from `fold_in` of that key, see
`evaluation.apply_model`; Mixup/CutMix draws from `fold_in(fold_in(base, s), MIX_STREAM)`), so a
resumed run repeats the uninterrupted one; evaluation batch `i` uses
`fold_in(fold_in(key(seed), 2), i)`. The data order and augmentation are the loader's, seeded
with the same seed and resumed from its saved position.

Interruptions lose nothing but the steps since the last checkpoint: a killed run restarted with
the same command resumes from its latest complete checkpoint and ends with the parameters and
metrics of an uninterrupted run; SIGTERM (a preemption notice) makes the run stop at the next
safe point (`Preempted`; `clca_jax.main` then exits with status 0): during training it saves
the next step, during start-up it stops before the first step, during the final evaluation
between batches. One run holds a workdir at a time (`workdirs.WorkdirLock`). A step whose loss or
gradient is not finite changes nothing; `train.on_nonfinite` says whether the run then stops
(`NonFiniteError`, before anything else is saved) or goes on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import jmp
import ml_collections
import optax
from absl import logging

from clca_jax import data, pretrained
from clca_jax.models import VisionTransformer
from clca_jax.training import (
    checkpoint,
    ema,
    evaluation,
    losses,
    optim,
    precision,
    sharding,
    workdirs,
)
from clca_jax.training import metrics as metrics_lib
from clca_jax.training import mixup as mixup_lib
from clca_jax.training.config import validate_config
from clca_jax.training.evaluation import SUMMARY_FILE, apply_model
from clca_jax.training.preemption import Preempted, PreemptionNotice
from clca_jax.training.warm_start import warm_start

INIT_STREAM, TRAIN_STREAM = 0, 1  # and evaluation.EVAL_STREAM = 2
MIX_STREAM = 2  # folded into a step's key for its Mixup/CutMix draws (1 is dropout's)
INIT_REPORT_FILE = "init.txt"
TENSORBOARD_DIR = "tensorboard"
__all__ = ["NonFiniteError", "Preempted", "SUMMARY_FILE", "train_and_evaluate"]


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
    """Loaders for `config.data`, sized for `config.model.img_size`, split over the processes."""
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    micro_batch = config.train.batch_size // config.train.accumulation_steps
    sharding.check_batch_size(
        micro_batch, mesh, "train.batch_size / train.accumulation_steps (the micro-batch)"
    )
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    processes = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    img_size = config.model.img_size
    train = data.make_train_loader(
        config.data,
        img_size=img_size,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        **processes,
        **evaluation.normalization_kwargs(config.model),
    )
    loader = evaluation.eval_loader(config, img_size)
    return Input(train=train, eval=loader, info=data.dataset_info(config.data))


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


def model_init_fn(model: VisionTransformer):
    """`key -> variables` of the model, from a dummy batch of one image."""

    def init(key):
        params_key, reduction_key = jax.random.split(key)
        rngs = {"params": params_key, "reduction": reduction_key}
        return model.init(rngs, model.example_images(), train=False)

    return init


def init_variables(model: VisionTransformer, seed: int, mesh: jax.sharding.Mesh) -> dict:
    """Fresh variables, created directly on their shardings."""
    init = model_init_fn(model)
    key = jax.random.fold_in(jax.random.key(seed), INIT_STREAM)
    shardings = sharding.tree_shardings(jax.eval_shape(init, key), mesh)
    return jax.jit(init, out_shardings=shardings)(key)


def load_init_checkpoint(
    config: ml_collections.ConfigDict,
    model: VisionTransformer,
    variables: dict,
    mesh: jax.sharding.Mesh,
) -> tuple[dict, list[str]]:
    """Variables warm-started from `config.init.checkpoint` (see `training.warm_start`).

    Returns:
      The variables on the same shardings as `variables`, and the report lines.
    """
    path = os.path.expanduser(config.init.checkpoint)
    _, source = pretrained.load_pretrained(path)
    merged, report = warm_start(
        variables,
        source,
        grid=model.grid,
        no_embed_class=model.backbone.no_embed_class,
        seed=config.seed,
    )
    shardings = sharding.tree_shardings(variables, mesh)
    return sharding.host_to_global(merged, shardings), [f"from {path}"] + report.lines()


# ----------------------------------------------------------------------------------------------
# Optimizer.


def optimizer_and_schedule(
    config: ml_collections.ConfigDict, model: VisionTransformer, steps_per_epoch
):
    """The configured optimizer (AdamW with the reference mask by default) and its schedule;
    returns (tx, schedule)."""
    note = optim.shortened_schedule_note(config.optim, config.train.epochs)
    if note:
        logging.info(note)
    schedule = optim.learning_rate_schedule(config.optim, config.train.epochs, steps_per_epoch)
    tx = optim.make_optimizer(
        config.optim, schedule, model.backbone.depth, decay_clr=model.method.decays_clr
    )
    if precision.needs_loss_scale(model.dtype):
        tx = precision.with_dynamic_loss_scale(tx)
    return tx, schedule


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


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """The train state of a run with `train.ema_decay > 0`: a separate class, so that the
    checkpoints of runs without the average keep their layout.

    Attributes:
      ema: the moving average of `variables()` (same tree).
    """

    ema: Any


def _new_state(
    variables: dict, tx: optax.GradientTransformation, seed: int, with_ema: bool = False
) -> TrainState:
    params = variables["params"]
    base_key = jax.random.fold_in(jax.random.key(seed), TRAIN_STREAM)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(base_key),
    )
    if not with_ema:
        return state
    average = jax.tree.map(jnp.copy, state.variables())
    return EmaTrainState(
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, ema=average
    )


def abstract_train_state(model, tx, seed: int, mesh: jax.sharding.Mesh, with_ema: bool = False):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    init = model_init_fn(model)
    shapes = jax.eval_shape(
        lambda key: _new_state(init(key), tx, seed, with_ema), jax.random.key(seed)
    )
    return checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))


def create_train_state(
    variables: dict,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    with_ema: bool = False,
) -> TrainState:
    """Step 0 of training from the given variables (consumed), every leaf on its sharding."""
    create = functools.partial(_new_state, tx=tx, seed=seed, with_ema=with_ema)
    shardings = sharding.tree_shardings(jax.eval_shape(create, variables), mesh)
    return jax.jit(create, out_shardings=shardings, donate_argnums=0)(variables)


def initial_state(config, model, tx, mesh, workdir: str) -> TrainState:
    """Fresh variables, warm-started from `config.init.checkpoint` when set."""
    variables = init_variables(model, config.seed, mesh)
    if config.init.checkpoint:
        variables, report = load_init_checkpoint(config, model, variables, mesh)
        for line in report:
            logging.info("init: %s", line)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, INIT_REPORT_FILE), "w") as f:
                f.write("\n".join(report) + "\n")
    else:
        logging.info("init: from scratch (config.init.checkpoint is empty).")
    return create_train_state(variables, tx, config.seed, mesh, with_ema=uses_ema(config))


def uses_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether the run keeps a moving average of the weights."""
    return config.train.ema_decay > 0


def restore_or_create_state(config, model, tx, mesh, checkpoints, train_loader, workdir: str):
    """The latest checkpoint of the workdir with its input position, or a new state."""
    if checkpoints.latest_step() is None:
        return initial_state(config, model, tx, mesh, workdir)
    abstract = abstract_train_state(model, tx, config.seed, mesh, with_ema=uses_ema(config))
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


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, recipe=None, mixup=None):
    """One optimizer step on a global batch; returns the new state and its metrics.

    The loss is the mean cross-entropy (against `batch['soft_label']` when the batch has it,
    with `recipe.label_smoothing`) plus the model's `aux['extra_loss']` (DynamicViT's ratio
    loss), when it reports one. With `mixup` (a `training.mixup.Mixup`) the batch is mixed first
    with draws from `fold_in(key, MIX_STREAM)`, which sets `batch['soft_label']`. With
    `recipe.accumulation_steps = k` the gradient is the mean over k micro-batches taken one
    after another (`accumulated_gradients`). With `recipe.ema_decay > 0` the weight average
    follows the step. With `recipe.log_gradient_norms` the metrics also hold the norms of the
    step's gradients (before any clipping) per top-level parameter (`metrics.gradient_norms`).
    A float16 model's optimizer carries a dynamic loss scale (`training.precision`): the loss
    is scaled, and a step whose gradients overflow only lowers the scale. No `recipe`:
    `Recipe()`.
    """
    recipe = Recipe() if recipe is None else recipe
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if mixup is not None:
        mix_key = jax.random.fold_in(key, MIX_STREAM)
        images, soft = mixup_lib.mix_batch(
            batch["image"], batch["label"], model.num_classes, mix_key, mixup
        )
        batch = dict(batch, image=images, soft_label=soft)
    loss_scale = precision.loss_scale_of(state.opt_state)

    def loss_fn(params, batch_stats, batch, key):
        variables = state.replace(params=params, batch_stats=batch_stats).variables()
        logits, aux, batch_stats = apply_model(
            model, variables, batch["image"], train=True, key=key
        )
        cross_entropy = losses.cross_entropy(
            logits, losses.targets_of(batch), recipe.label_smoothing
        )
        loss = cross_entropy.mean() + aux.get("extra_loss", 0.0)
        return loss_scale.scale(loss), (loss, logits, batch_stats)

    gradient = jax.value_and_grad(loss_fn, has_aux=True)
    if recipe.accumulation_steps == 1:
        (_, (loss, logits, batch_stats)), grads = gradient(
            state.params, state.batch_stats, batch, key
        )
    else:
        loss, logits, batch_stats, grads = accumulated_gradients(
            gradient, state, batch, key, recipe.accumulation_steps
        )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updated = state.replace(
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if recipe.ema_decay:
        decay = ema.decay_at(state.step + 1, recipe.ema_decay, recipe.ema_warmup)
        updated = updated.replace(ema=ema.update(state.ema, updated.variables(), decay))
    grads = loss_scale.unscale(grads)
    scaled = isinstance(opt_state, precision.LossScaleState)
    # With a loss scale, overflowed gradients are the scale's business (the optimizer skipped
    # the update and lowered it); only a non-finite loss counts as a bad step.
    what = nonfinite_what(loss, {} if scaled else grads)
    # A bad step changes nothing but the step count, so the data and noise streams stay aligned.
    kept = jax.tree.map(lambda new, old: jnp.where(what < 0, new, old), updated, state)
    new_state = kept.replace(step=state.step + 1)
    grad_norms = metrics_lib.gradient_norms(grads) if recipe.log_gradient_norms else None
    scale_metrics = {}
    if scaled:
        overflow = jnp.logical_not(jmp.all_finite(grads))
        scale_metrics = dict(loss_scale=opt_state.scale, overflow=overflow)
    step_metrics = metrics_lib.train_step_metrics(
        loss,
        schedule(state.step),
        logits,
        batch["label"],
        new_state.step,
        what,
        grad_norms,
        **scale_metrics,
    )
    return new_state, step_metrics


def accumulated_gradients(gradient, state: TrainState, batch: dict, key, steps: int):
    """The mean loss and gradient of `batch` over `steps` micro-batches, taken in turn.

    Micro-batch j holds examples j, j + steps, j + 2 steps, ... of the global batch, so each
    device's share of the batch splits into its own share of every micro-batch (no data moves
    between devices). The micro-batches are equal in size, so the mean of their mean losses and
    gradients is the whole batch's. BatchNorm (the CLA head) normalises each micro-batch with
    its own statistics, as a PyTorch loop over micro-batches does, and its running statistics
    are updated once per micro-batch, in order. Micro-batch j draws its noise from
    `fold_in(key, j)`.

    Returns:
      (loss, logits in the batch's order, batch_stats, grads), the gradients still scaled.
    """

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

    def body(carry, micro):
        batch_stats, total = carry
        index, part = micro
        (_, (loss, logits, batch_stats)), grads = gradient(
            state.params, batch_stats, part, jax.random.fold_in(key, index)
        )
        total = jax.tree.map(jnp.add, total, grads)
        return (batch_stats, total), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    micro_batches = (jnp.arange(steps), jax.tree.map(split, batch))
    (batch_stats, total), (losses_, logits) = jax.lax.scan(
        body, (state.batch_stats, zeros), micro_batches
    )
    grads = jax.tree.map(lambda g: g / steps, total)
    logits = jnp.swapaxes(logits, 0, 1).reshape(-1, logits.shape[-1])
    return jnp.mean(losses_), logits, batch_stats, grads


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The train step's static settings besides model and optimizer.

    Attributes:
      label_smoothing: `train.label_smoothing`.
      ema_decay: `train.ema_decay` (0: no weight average).
      ema_warmup: `train.ema_warmup`.
      log_gradient_norms: `train.log_gradient_norms`.
      accumulation_steps: `train.accumulation_steps` (1: none).
    """

    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    ema_warmup: bool = False
    log_gradient_norms: bool = False
    accumulation_steps: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Recipe:
        train = config.train
        return cls(
            float(train.label_smoothing),
            float(train.ema_decay),
            bool(train.ema_warmup),
            bool(train.log_gradient_norms),
            int(train.accumulation_steps),
        )


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


def compile_train_step(
    model, tx, schedule, state_shardings, mesh, recipe: Recipe = Recipe(), mixup=None
):
    """The jitted train step: explicit shardings, the state donated."""
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, recipe=recipe, mixup=mixup
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------------------------
# Loop.


class LoopEvents:
    """Points of the loop where a caller may act; they do nothing here.

    The reliability tests subclass it to interrupt a run at reproducible points (after a step,
    right after a save has started), through `train_and_evaluate(..., events=...)`.
    """

    def after_step(self, step: int) -> None:
        """Called after train step `step` (steps done), before its report and save."""

    def after_save(self, step: int) -> None:
        """Called right after the save of step `step` has started (orbax writes it in the
        background)."""

    def before_loop(self, step: int) -> None:
        """Called once start-up is done, before the first step (`step`: the resumed step)."""

    def before_final_evaluation(self, step: int) -> None:
        """Called after the last step's save, before the final evaluation."""


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
      events: the caller's hooks in the loop.
      kept_picture: `variables -> RGB pixels` of the tokens each reduction block keeps, drawn
        into TensorBoard at every evaluation; None for a model that does not reduce.
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
    events: LoopEvents = dataclasses.field(default_factory=LoopEvents)
    kept_picture: Any = None


def train_loop(run: Run, state: TrainState, mesh) -> TrainState:
    """Steps from `state.step` to the end: reports, evaluations and checkpoints on the way."""
    config, loader = run.config, run.inputs.train
    batch_sharding = sharding.batch_sharding(mesh)
    progress = metrics_lib.Progress(run.total_steps)
    eval_every = config.eval.every_epochs * loader.steps_per_epoch
    running = None
    first = int(state.step)
    for step in range(first, run.total_steps):
        batch = sharding.global_batch(next(loader), batch_sharding)
        if step == first:
            state, step_metrics = first_step(run, state, batch)
        else:
            state, step_metrics = run.train_step(state, batch)
        running = metrics_lib.merge(running, step_metrics)
        done = step + 1
        run.events.after_step(done)
        run.checkpoints.check_saves()  # stop at the first failed save, not at the next one
        if done % config.train.log_every_steps == 0 or done == run.total_steps:
            check_finite(run, running)
            report_train(run, progress, done, loader.steps_per_epoch, running)
            running = None
        if eval_every and done % eval_every == 0 and done < run.total_steps:
            try:
                evaluate_and_keep_best(run, state, done)
            except evaluation.EvaluationStopped:
                pass  # a preemption notice: `reached` below saves this step and stops
        every = config.checkpoint.every_steps
        preempted = run.preemption.reached(done)
        if (every and done % every == 0) or done == run.total_steps or preempted:
            if running is not None and config.train.on_nonfinite == "stop":
                check_finite(run, running)  # never save past a bad step
            run.checkpoints.save(done, state, loader.get_state())
            run.events.after_save(done)
        if preempted:
            raise Preempted(done, run.checkpoints.workdir)
    return state


def first_step(run: Run, state: TrainState, batch: dict):
    """The process's first train step, which compiles it, timed and logged (a big model's
    compile takes minutes on a CPU, with no other sign of life)."""
    logging.info("Compiling the train step (the first step includes the compile) ...")
    start = time.perf_counter()
    state, step_metrics = run.train_step(state, batch)
    jax.block_until_ready(step_metrics)
    logging.info("Train step compiled and run once in %.1f s.", time.perf_counter() - start)
    return state, step_metrics


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
    """Writes the running averages (and gradient norms, when logged) to TensorBoard and one
    progress line to the log."""
    scalars = metrics_lib.to_floats(running)
    scalars.update(progress.update(step))
    tagged = {f"train/{k}": v for k, v in metrics_lib.in_percent(scalars).items()}
    norms = metrics_lib.gradient_norm_floats(running)
    tagged.update({f"{metrics_lib.GRAD_NORM_PREFIX}{k}": v for k, v in norms.items()})
    run.writer.write_scalars(step, tagged)
    epoch = -(-step // steps_per_epoch)
    logging.info(progress.line(step, epoch, run.config.train.epochs, scalars))


def evaluate_and_keep_best(run: Run, state: TrainState, step: int) -> dict[str, float]:
    """Evaluates the raw weights (and their moving average, when kept), logs, and offers the
    weights `eval.select` names to the best-checkpoint keeper.

    Returns:
      The selected weights' result; with an average, also `by_weights`: each one's result.
    """
    weights = {"raw": state.variables()}
    if uses_ema(run.config):
        weights["ema"] = state.ema
    results = {}
    for name, variables in weights.items():
        result = run.run_eval(variables)
        prefix = "eval" if name == "raw" else f"eval_{name}"
        scalars = metrics_lib.in_percent({k: result[k] for k in ("loss", "top1", "top5")})
        run.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
        logging.info(
            "eval%s on %s at step %d: top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images",
            "" if name == "raw" else f" ({name} weights)",
            run.config.data.eval_split,
            step,
            100 * result["top1"],
            100 * result["top5"],
            result["loss"],
            result["num_examples"],
        )
        results[name] = result
    select = run.config.eval.select
    chosen = results[select]
    scalars = metrics_lib.in_percent({k: chosen[k] for k in ("loss", "top1", "top5")})
    run.checkpoints.save_best(step, weights[select], scalars)
    write_kept_picture(run, weights[select], step)
    if len(results) == 1:
        return chosen
    return dict(chosen, by_weights=results)


def write_kept_picture(run: Run, variables: dict, step: int) -> None:
    """The kept-token picture of the first evaluation image, into TensorBoard. A picture that
    cannot be drawn is a warning: the run's numbers do not depend on it."""
    if run.kept_picture is None or jax.process_index() != 0:
        return
    try:
        pixels = run.kept_picture(jax.device_get(variables))
    except Exception as error:  # matplotlib, an unreadable image: any of them
        logging.warning("no kept-token picture at step %d: %s", step, error)
        return
    run.writer.write_image(step, "eval/kept_tokens", pixels)


def kept_picture_fn(model: VisionTransformer, config):
    """`Run.kept_picture` for this model: None when it does not reduce tokens."""
    if not model.method.reduces:
        return None

    def draw(variables: dict):
        from clca_jax import visualize  # matplotlib, only for models that reduce

        return visualize.kept_tokens_pixels(model, variables, config.data)

    return draw


PATH_FIELDS = (
    ("data", "dir"),
    ("data", "image_folder"),
    ("data", "tfds_dir"),
    ("init", "checkpoint"),
)


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose relative data and checkpoint paths are absolute (against the
    working directory), so that the saved `config.json` resumes the run from any folder."""
    resolved = copy.deepcopy(config)
    for section, field in PATH_FIELDS:
        value = resolved[section][field]
        if value and not os.path.isabs(value) and not value.startswith("~"):
            resolved[section][field] = os.path.abspath(value)
    return resolved


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, events: LoopEvents | None = None
) -> dict:
    """Trains as `config` says, resuming from `workdir` if it holds a checkpoint, then
    evaluates on `config.data.eval_split` and writes `workdir/summary.json`.

    Args:
      config: a training config (see `clca_jax.training.config.default_config`).
      workdir: where checkpoints, logs and the summary go.
      events: hooks called at points of the loop (see `LoopEvents`).

    Returns:
      The summary dict.

    Raises:
      Preempted: SIGTERM arrived; the run saved a checkpoint and stopped.
      NonFiniteError: a step was not finite and `train.on_nonfinite='stop'`.
      ValueError, OSError: the config, the workdir, a checkpoint or the data is unusable;
        these are raised before anything in the workdir is changed, except data errors
        found while training, which leave the earlier checkpoints as they were.
    """
    model = validate_config(config)
    config = with_absolute_paths(config)
    workdir = workdirs.check_workdir_name(workdir)
    sharding.initialize_distributed(config.mesh.heartbeat_timeout_seconds)
    metrics_lib.quiet_library_logs()
    # From here on SIGTERM means: stop at the next safe point, rerun to continue (exit 0).
    with PreemptionNotice() as preemption:
        checkpoint.check_writable(workdir)
        with contextlib.ExitStack() as lock:
            if jax.process_index() == 0:
                lock.enter_context(workdirs.WorkdirLock(workdir))
            return _train_and_evaluate(config, model, workdir, preemption, events or LoopEvents())


def _train_and_evaluate(config, model, workdir, preemption, events) -> dict:
    # Mesh.
    mesh = sharding.make_mesh(config.mesh)
    logging.info("Mesh %s over %d device(s).", dict(mesh.shape), mesh.size)
    # Input.
    inputs = make_input(config, mesh)
    config = resolve_config(config, inputs.info.num_classes)
    workdirs.check_same_model(workdir, config)
    workdirs.check_same_classes(workdir, inputs.info.num_classes, inputs.info.class_names)
    # Model.
    model = model.clone(num_classes=config.model.num_classes)
    # Optimizer.
    tx, schedule = optimizer_and_schedule(config, model, inputs.train.steps_per_epoch)
    total_steps = config.train.epochs * inputs.train.steps_per_epoch
    # State.
    checkpoints = checkpoint.Checkpoints(
        workdir, config.checkpoint.max_to_keep, config.checkpoint.keep_best
    )
    writer = None
    try:
        check_not_past_the_end(checkpoints, total_steps, config)
        state = restore_or_create_state(config, model, tx, mesh, checkpoints, inputs.train, workdir)
        # Written only now, so a refused restart leaves the workdir as it was.
        workdirs.warn_if_config_changed(workdir, config)
        metrics_lib.write_json(workdirs.run_config_path(workdir), json.loads(config.to_json()))
        metrics_lib.write_json(
            workdirs.classes_path(workdir),
            workdirs.classes_record(inputs.info.num_classes, inputs.info.class_names),
        )
        writer = metrics_lib.MetricWriter(os.path.join(workdir, TENSORBOARD_DIR))
        writer.write_text(int(state.step), "config", f"```json\n{config.to_json(indent=2)}\n```")
        logging.info(
            "%s: %d parameters, %d classes, %d steps (%d epochs of %d).",
            config.model.backbone,
            evaluation.count_parameters(state.params),
            config.model.num_classes,
            total_steps,
            config.train.epochs,
            inputs.train.steps_per_epoch,
        )
        # Steps.
        state_shardings = sharding.tree_shardings(state, mesh)
        eval_fn = evaluation.compile_eval_step(model, state_shardings.variables(), mesh)
        rng = evaluation.eval_key(config.seed)
        run = Run(
            config=config,
            inputs=inputs,
            train_step=compile_train_step(
                model,
                tx,
                schedule,
                state_shardings,
                mesh,
                Recipe.from_config(config),
                mixup_lib.from_config(config.train.mixup),
            ),
            run_eval=lambda variables: evaluation.evaluate(
                eval_fn, variables, inputs.eval, mesh, rng, should_stop=preemption.received_here
            ),
            checkpoints=checkpoints,
            writer=writer,
            total_steps=total_steps,
            param_names=leaf_names(state.params),
            preemption=preemption,
            events=events,
            kept_picture=kept_picture_fn(model, config),
        )
        # Loop.
        events.before_loop(int(state.step))
        if preemption.received_here():  # during start-up: nothing new to save
            step = int(state.step)
            raise Preempted(step, workdir, saved=checkpoints.latest_step() is not None)
        start = time.perf_counter()
        state = train_loop(run, state, mesh)
        train_seconds = time.perf_counter() - start
        events.before_final_evaluation(total_steps)
        try:
            result = evaluate_and_keep_best(run, state, total_steps)
        except evaluation.EvaluationStopped:
            raise Preempted(total_steps, workdir) from None
        final = {k: result[k] for k in ("loss", "top1", "top5")}
        writer.write_hparams(
            total_steps,
            metrics_lib.flat_hparams(config),
            {f"hparam/{k}": v for k, v in metrics_lib.in_percent(final).items()},
        )
    finally:
        # After a failed save, closing would wait on orbax's broken background writes (and
        # report them again); the process is about to end with the one error line.
        if not isinstance(sys.exc_info()[1], checkpoint.CheckpointWriteError):
            checkpoints.close()
        if writer is not None:
            writer.close()
    summary = evaluation.make_summary(
        result, config, model, state.params, steps=total_steps, train_seconds=train_seconds
    )
    path = os.path.join(workdir, SUMMARY_FILE)
    metrics_lib.write_json(path, summary)
    logging.info("%s; summary in %s", evaluation.summary_line(summary), path)
    return summary


def check_not_past_the_end(checkpoints, total_steps: int, config) -> None:
    """Refuses to resume a run whose latest checkpoint lies beyond this config's last step
    (fewer epochs than already trained): its result would be reported as the shorter run."""
    latest = checkpoints.latest_step()
    if latest is not None and latest > total_steps:
        raise ValueError(
            f"{checkpoints.workdir} holds a checkpoint at step {latest}, past step "
            f"{total_steps}, the last of train.epochs={config.train.epochs}; nothing was "
            "changed. Train for at least as many epochs as before, or evaluate that run with "
            "clca_jax.evaluate."
        )
