"""Runs with the recipe's options on (the augmentation alone, then every option at once),
killed with SIGKILL at a step and during a save, resume to exactly the uninterrupted run (the
helpers of test_reliability_kill)."""

import json
import os
import signal

import jax
import numpy as np

from clca_jax import config_files, train
from tests.killable_main import KILL_AT_ENV
from tests.test_recipe_resume import restore_recipe_state
from tests.test_reliability_kill import (
    TOTAL_STEPS,
    assert_only_complete_steps,
    assert_same_run,
    cli_config,
    cli_env,
    run_cli,
    train_losses,
    write_cli_config,
)
from tests.test_train_loop import NUM_CLASSES, fabricated_folder, restore_state

AUGMENT = """
    config.data.augment.rand_augment_ops = 2
    config.data.augment.random_erasing_prob = 0.5
    config.data.augment.random_erasing_count = 2
    config.train.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
"""


def _augmented(config):
    config.data.augment.update(rand_augment_ops=2, random_erasing_prob=0.5, random_erasing_count=2)
    config.train.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    return config


def test_augmented_run_killed_twice_resumes_to_the_uninterrupted_result(tmp_path):
    data_dir = fabricated_folder(str(tmp_path / "data"))
    config_path = write_cli_config(str(tmp_path / "augmented.py"), data_dir, AUGMENT)
    env = cli_env(str(tmp_path / "jax_cache"))
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    code, output = run_cli(config_path, whole, env)
    assert code == 0, output[-4000:]
    plain = str(tmp_path / "plain")
    plain_path = write_cli_config(str(tmp_path / "plain.py"), data_dir)
    for hook in ("step:3", "save:6"):
        code, output = run_cli(config_path, killed, dict(env, **{KILL_AT_ENV: hook}))
        assert code == -signal.SIGKILL, (hook, output[-4000:])
        assert_only_complete_steps(killed)
    code, output = run_cli(config_path, killed, env)
    assert code == 0, output[-4000:]
    assert_same_run(_augmented(cli_config(data_dir)), whole, killed)
    # The augmentation acted: the same seed without it trains to other parameters.
    code, output = run_cli(plain_path, plain, env)
    assert code == 0, output[-4000:]
    resolved = train.resolve_config(cli_config(data_dir), NUM_CLASSES)
    augmented_state, _ = restore_state(resolved, whole)
    plain_state, _ = restore_state(resolved, plain)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(augmented_state.params),
            jax.tree.leaves(plain_state.params),
            strict=True,
        )
    )


WHOLE_RECIPE = (
    AUGMENT
    + """
    config.model.update(drop_path_rate=0.2, dropout_rate=0.1)
    config.model.clca.update(head="cla", clc=True, num_clr=1)
    config.model.reduction.update(method="evit", keep_rate=0.5, locations=(1,))
    config.optim.update(name="lion", lr=1e-4, layer_decay=0.75, backbone_lr_scale=0.5)
    config.optim.update(freeze_backbone_steps=2, schedule_unit="step", warmup_epochs=1)
    config.train.update(label_smoothing=0.1, ema_decay=0.9, ema_warmup=True)
    config.eval.select = "ema"
"""
)


def test_every_recipe_feature_at_once_killed_twice_resumes_bit_exactly(tmp_path):
    """Augmentation, Mixup/CutMix, drop path, dropout, label smoothing, Lion with layer-wise
    rates, a backbone scale and a timed freeze, a per-step schedule, the EMA and EViT + CLCA,
    all on: SIGKILL at a step and during a save, then the rerun ends where an uninterrupted
    run ends, bit for bit (train state with its EMA, loader position, summary, logged losses)."""
    data_dir = fabricated_folder(str(tmp_path / "data"))
    config_path = write_cli_config(str(tmp_path / "recipe.py"), data_dir, WHOLE_RECIPE)
    env = cli_env(str(tmp_path / "jax_cache"))
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    code, output = run_cli(config_path, whole, env)
    assert code == 0, output[-4000:]
    for hook in ("step:3", "save:6"):
        code, output = run_cli(config_path, killed, dict(env, **{KILL_AT_ENV: hook}))
        assert code == -signal.SIGKILL, (hook, output[-4000:])
        assert_only_complete_steps(killed)
    code, output = run_cli(config_path, killed, env)
    assert code == 0, output[-4000:]
    config = config_files.load(config_path)
    (expected, expected_loader), (actual, actual_loader) = (
        restore_recipe_state(config, workdir) for workdir in (whole, killed)
    )
    assert actual.ema is not None and actual_loader == expected_loader
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    summaries = []
    for workdir in (whole, killed):
        with open(os.path.join(workdir, "summary.json")) as f:
            summaries.append(json.load(f))
    for key in ("loss", "top1", "top5", "num_examples", "steps"):
        assert summaries[1][key] == summaries[0][key], key
    reference = train_losses(whole)
    assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    assert train_losses(killed) == {step: reference[step] for step in train_losses(killed)}
