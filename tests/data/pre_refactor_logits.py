"""Writes `pre_refactor_logits.npz`: logits of every reduction method, with and without CLCA,
in evaluation and training mode, from the model code as it was before the reduction methods
became plug-ins (commit 35dab1d). `tests/test_refactor_logits.py` compares today's code with it.

    python tests/data/pre_refactor_logits.py  # run on that commit to write the file again
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from clca_jax.models import create_model, default_model_config

METHODS = ("none", "evit", "topk", "tome", "dpcknn", "dynamicvit", "ats", "sit", "patchmerger")
IMG_SIZE = 64
FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre_refactor_logits.npz")


def model_config(method: str, clca: bool):
    config = default_model_config()
    config.backbone = "vit_small_patch8_224"
    config.update(img_size=IMG_SIZE, embed_dim=64, depth=4, num_heads=2, num_classes=5)
    config.reduction.update(method=method, keep_rate=0.5, locations=(1, 2))
    if clca:
        config.clca.update(head="cla", clc=True, num_clr=1)
    return config


def images() -> jnp.ndarray:
    return jnp.asarray(
        np.random.default_rng(0).normal(size=(2, IMG_SIZE, IMG_SIZE, 3)), jnp.float32
    )


def logits(method: str, clca: bool) -> dict[str, np.ndarray]:
    """Evaluation and training-mode logits (and the training loss term) of one tiny model."""
    model = create_model(model_config(method, clca))
    variables = model.init(jax.random.key(0), images()[:1])
    evaluation, _ = model.apply(variables, images(), train=False)
    rngs = {"reduction": jax.random.key(1)}
    (training, aux), _ = model.apply(
        variables, images(), train=True, rngs=rngs, mutable=["batch_stats"]
    )
    return {
        "eval": np.asarray(evaluation),
        "train": np.asarray(training),
        "extra_loss": np.asarray(aux["extra_loss"]),
    }


def all_logits() -> dict[str, np.ndarray]:
    out = {}
    for method in METHODS:
        for clca in (False, True):
            for kind, value in logits(method, clca).items():
                out[f"{method}/{'clca' if clca else 'plain'}/{kind}"] = value
    return out


if __name__ == "__main__":
    np.savez(FILE, **all_logits())
    print("wrote", FILE)
