"""A run with RandAugment, random erasing, Mixup and CutMix on, killed with SIGKILL at a step and
during a save, resumes to exactly the uninterrupted run (the helpers of test_reliability_kill)."""

import signal

import jax
import numpy as np

from clca_jax import train
from tests.killable_main import KILL_AT_ENV
from tests.test_reliability_kill import (
    assert_only_complete_steps,
    assert_same_run,
    cli_config,
    cli_env,
    run_cli,
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
