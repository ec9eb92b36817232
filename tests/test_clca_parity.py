"""Whole-model parity with the NumPy reference of the official CLCA forward (spec 2-5, 10).

Random weights with the official key names are converted by `convert_state_dict` (the same
code that reads published CLCA checkpoints) and the JAX logits are compared with the plain
NumPy reference in evaluation mode.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clca_jax.convert import convert_state_dict
from clca_jax.models import create_model, default_model_config
from tests.reference import clca_numpy as ref

TOLERANCE = 1e-4
DEPTH, LOCATIONS = 6, (1, 2, 3)
IMG, WIDTH, HEADS, CLASSES = 128, 32, 2, 7
BATCH = 3

# A covering set per method: both keep rates, GAP on/off, 0 and 2 CLR tokens, recovery at
# depth-2 on/off, and each head.
SETTINGS = [
    dict(keep_rate=0.1, include_gap=True, num_clr=2, recover_at_last=True, head="cla"),
    dict(keep_rate=0.7, include_gap=True, num_clr=2, recover_at_last=True, head="cla"),
    dict(keep_rate=0.1, include_gap=False, num_clr=2, recover_at_last=False, head="cla"),
    dict(keep_rate=0.7, include_gap=True, num_clr=0, recover_at_last=False, head="ifa"),
    dict(keep_rate=0.7, include_gap=False, num_clr=2, recover_at_last=True, head="none"),
    dict(keep_rate=0.1, include_gap=True, num_clr=0, recover_at_last=True, head="cla"),
]
METHODS = ["none", "evit", "topk", "tome", "dpcknn", "dynamicvit", "ats", "sit", "patchmerger"]


def configs(method, setting, backbone="vit_base_patch16_224"):
    """(our model config, the reference's cfg) for one case."""
    config = default_model_config()
    config.backbone = backbone
    config.img_size = IMG
    config.embed_dim, config.depth, config.num_heads = WIDTH, DEPTH, HEADS
    config.num_classes = CLASSES
    config.reduction.method = method
    config.reduction.keep_rate = setting["keep_rate"]
    config.reduction.locations = LOCATIONS
    config.clca.head = setting["head"]
    config.clca.clc = True
    config.clca.num_clr = setting["num_clr"]
    config.clca.include_gap = setting["include_gap"]
    config.clca.recover_at_last = setting["recover_at_last"]
    # The NumPy reference measures ATS distances exactly (torch.cdist: tests/test_ats_cdist.py).
    config.reduction.ats_distance = "exact"
    arch = {
        "vit_base_patch16_224": {},
        "deit3_base_patch16_224": dict(no_embed_class=True, layer_scale=True),
        "vit_base_patch16_clip_224": dict(pre_norm=True, ln_eps=1e-5, patch_bias=False),
        "vit_base_patch16_224_miil": dict(qkv_bias=False),
    }[backbone]
    cfg = dict(
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        method=method,
        reduction_loc=list(LOCATIONS),
        clc=True,
        num_classes=CLASSES,
        **arch,
        **setting,
    )
    return config, cfg


def compare(method, setting, backbone="vit_base_patch16_224", seed=0):
    config, cfg = configs(method, setting, backbone)
    state = ref.random_official_state_dict(cfg, IMG, seed)
    images = np.random.default_rng(seed + 1).standard_normal((BATCH, IMG, IMG, 3))
    expected, info = ref.forward(state, cfg, images.transpose(0, 3, 1, 2))
    variables, report = convert_state_dict(
        {k: np.asarray(v, np.float32) for k, v in state.items()}, config
    )
    model = create_model(config)
    logits, aux = jax.jit(model.apply)(variables, images.astype(np.float32))
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOLERANCE, rtol=0)
    ours = [tuple(int(n) for n in c) for c in np.asarray(aux["token_counts"])]
    theirs = [tuple(c) for c in info["lengths"]]
    if method == "ats":  # fixed slots: never fewer than the reference's batch-padded length
        assert all(
            o >= t for pair in zip(ours, theirs, strict=True) for o, t in zip(*pair, strict=True)
        )
    else:
        assert ours == theirs
    return aux, info, report


# Cases where the reference produces NaN (the sequence collapses to the class token and a mean
# over nothing follows); the model refuses them with a message instead.
NAN_IN_REFERENCE = {
    ("sit", 0), ("sit", 5), ("patchmerger", 0), ("patchmerger", 5), ("ats", 0), ("ats", 5),
    ("dynamicvit", 0), ("dynamicvit", 5),
}  # fmt: skip


@pytest.mark.parametrize("case", range(len(SETTINGS)))
@pytest.mark.parametrize("method", METHODS)
def test_logits_match_reference(method, case):
    setting = SETTINGS[case]
    if (method, case) in NAN_IN_REFERENCE:
        config, cfg = configs(method, setting)
        state = ref.random_official_state_dict(cfg, IMG, 0)
        images = np.random.default_rng(1).standard_normal((1, 3, IMG, IMG))
        with np.errstate(all="ignore"):
            assert np.isnan(ref.forward(state, cfg, images)[0]).all()
        with pytest.raises(ValueError, match="GAP token would average nothing"):
            create_model(config)
        return
    compare(method, setting)


@pytest.mark.parametrize(
    "backbone", ["deit3_base_patch16_224", "vit_base_patch16_clip_224", "vit_base_patch16_224_miil"]
)
def test_other_backbones_match_reference(backbone):
    compare("evit", SETTINGS[1], backbone)
