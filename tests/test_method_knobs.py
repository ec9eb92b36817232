"""The method knobs of the official code: per-stage keep rates, DPC-KNN's k, DynamicViT's ratio
weight and the CLA head's kernels per channel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax import flops
from clca_jax.convert.timm import ConversionError, convert_state_dict
from clca_jax.models import create_model, default_model_config
from clca_jax.models.reduction.dpcknn import density_peaks
from tests.data.pre_refactor_logits import images, model_config
from tests.reference import clca_numpy as ref

P448 = 784  # ViT-B/16 at 448 px
D = 768

# Per-stage lists at blocks 3, 6, 9 (no CLC): ratios for EViT / Top-K / DynamicViT, absolute
# counts for the others (the official `--keep_rate` list).
LISTS = {
    "evit": (0.5, 0.3, 0.2),
    "topk": (0.6, 0.5, 0.1),
    "dynamicvit": (0.5, 0.3, 0.05),
    "tome": (500, 300, 290),
    "dpcknn": (300, 4, 2),  # 4 < 5: the single-rate floor of 5 does not apply to a list
    "ats": (100, 30, 10),
    "sit": (100, 30, 0),
    "patchmerger": (120, 7, 1),
}


def vit_b_448(method, keep_rate, **reduction):
    config = default_model_config()
    config.update(backbone="vit_base_patch16_224.orig_in21k", img_size=448, num_classes=80)
    config.reduction.update(method=method, keep_rate=keep_rate, **reduction)
    return config


def ats_slots(samples):
    """Quantile points of torch.arange(1/(2K), (2K-1)/(2K), 1/K): ceil((end - start) / step)."""
    start, end, step = 1 / (2 * samples), (2 * samples - 1) / (2 * samples), 1 / samples
    return max(0, math.ceil((end - start) / step))


def expected_lengths(method, values, locations=3):
    """Sequence length after each reduction, from the spec's formulas (section 5) with the
    list's entries in place of kr**(s+1) (ratios) or of the computed counts."""
    length, target, out = 1 + P448, P448, []
    for s in range(locations):
        value = values[s]
        if method in ("evit", "topk"):
            length = math.ceil(value * (length - 1)) + 1 + (method == "evit")
        elif method == "dynamicvit":  # evaluation without the cache: int(N0 * r_s)
            length = 1 + int(P448 * value)
        elif method == "tome":
            length -= min(target - value, (length - 1) // 2)
            target = value
        elif method == "ats":
            length = 1 + ats_slots(value)
        else:  # DPC-KNN, SiT, PatchMerger: the count itself
            length = 1 + value
        out.append(length)
    return out


@pytest.mark.parametrize("method", sorted(LISTS))
def test_per_stage_schedule_follows_the_spec(method):
    extra = {"dpcknn_k": 3} if method == "dpcknn" else {}
    model = create_model(vit_b_448(method, LISTS[method], **extra))
    blocks = model.token_schedule(train=False).blocks
    after = [blocks[loc].mlp_tokens for loc in (3, 6, 9)]
    assert after == expected_lengths(method, LISTS[method])


# The tiny model of tests/data/pre_refactor_logits.py: P = 64, keep rate 0.5 at blocks 1, 2.
# Lists equal to what the single rate 0.5 means for each method (spec section 5 formulas).
EQUIVALENT = {
    "evit": (0.5, 0.5),
    "topk": (0.5, 0.5),
    "dynamicvit": (0.5, 0.5**2),
    "tome": (int(64 * 0.5), int(64 * 0.5**2)),
    "dpcknn": (int(64 * 0.5), int(64 * 0.5**2)),
    "ats": (int(0.5 * 64) + 1, int(0.5**2 * 64) + 1),
    "sit": (int(64 * 0.5), int(64 * 0.5**2)),
    "patchmerger": (int(64 * 0.5), int(64 * 0.5**2)),
}


def forward(config, train):
    model = create_model(config)
    variables = model.init(jax.random.key(0), images()[:1])
    if not train:
        return model.apply(variables, images(), train=False)
    rngs = {"reduction": jax.random.key(1)}
    return model.apply(variables, images(), train=True, rngs=rngs, mutable=["batch_stats"])[0]


@pytest.mark.parametrize("method", sorted(EQUIVALENT))
def test_list_meaning_the_single_rate_gives_identical_logits(method):
    single = model_config(method, clca=True)
    listed = model_config(method, clca=True)
    listed.reduction.keep_rate = EQUIVALENT[method]
    for train in (False, True):
        (a, aux_a), (b, aux_b) = forward(single, train), forward(listed, train)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(aux_a["extra_loss"]), aux_b["extra_loss"])


def block_macs(n_attn, n_mlp, left=None):
    """Spec 8.2: one ViT-B block; EViT's reduction adds the head mean and the weighting."""
    macs = n_attn * D + 3 * n_attn * D**2 + n_attn * D + 2 * n_attn**2 * D + n_attn * D**2
    macs += n_mlp * D + 8 * n_mlp * D**2
    if left is not None:
        macs += (n_attn - 1) + (n_attn - 1 - left) * D
    return macs


def test_flops_follow_a_per_stage_list():
    cost = flops.count_macs(create_model(vit_b_448("evit", LISTS["evit"])))
    expected, length = [], 1 + P448
    for index in range(12):
        if index in (3, 6, 9):
            left = math.ceil(LISTS["evit"][(3, 6, 9).index(index)] * (length - 1))
            expected.append(block_macs(length, left + 2, left))
            length = left + 2
        else:
            expected.append(block_macs(length, length))
    assert cost.block_macs == tuple(expected)


def test_flops_follow_the_cla_kernels():
    costs = {}
    for kernels in (2, 3):
        config = vit_b_448("evit", 0.1)
        config.clca.update(head="cla", clc=True, num_clr=1, kernels_per_channel=kernels)
        costs[kernels] = flops.count_macs(create_model(config)).total_macs
    depths, classes = 4, 80
    # Spec 8.2 head: depthwise conv k*D*L, BatchNorm k*D, 1x1 conv C*k*D per kernel.
    assert costs[3] - costs[2] == D * depths + D + classes * D


@pytest.mark.parametrize("neighbours", [2, 3, 8])
def test_dpcknn_k_matches_the_numpy_reference(neighbours):
    generator = np.random.default_rng(neighbours)
    x = generator.standard_normal((2, 22, 16))
    noise = generator.uniform(size=(2, 22)) * 1e-6
    score_w, score_b = np.zeros((1, 16)), np.zeros(1)
    _, assign, centres = ref.dpcknn_cluster(x, 6, score_w, score_b, noise=noise, k=neighbours)
    ours = density_peaks(
        jnp.asarray(x, jnp.float32), 6, jnp.asarray(noise, jnp.float32), neighbours
    )
    np.testing.assert_array_equal(np.asarray(ours[1]), centres)
    np.testing.assert_array_equal(np.asarray(ours[0]), assign)


def test_dpcknn_k_reaches_the_model():
    default = model_config("dpcknn", clca=True)
    changed = model_config("dpcknn", clca=True)
    changed.reduction.dpcknn_k = 2
    model = create_model(changed)
    stage = model.token_schedule().blocks[1].stage
    assert model.method.build(stage, model.reduction, "r").neighbours == 2
    a, b = forward(default, False)[0], forward(changed, False)[0]
    assert not np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_dynamicvit_ratio_weight_scales_the_ratio_loss():
    losses = {}
    for weight in (2.0, 0.5):
        config = model_config("dynamicvit", clca=True)
        config.reduction.dynamicvit_ratio_weight = weight
        losses[weight] = float(forward(config, True)[1]["extra_loss"])
    assert losses[2.0] > 0
    assert losses[0.5] * 4 == losses[2.0]


@pytest.mark.parametrize("kernels", [1, 3])
def test_kernels_per_channel_shape_the_cla_head(kernels):
    config = model_config("evit", clca=True)
    config.clca.kernels_per_channel = kernels
    model = create_model(config)
    head = model.abstract_variables()["params"]["cla_head"]
    width, depths = 64, 3  # CLS after blocks 1, 2 and the last
    assert head["depthwise"]["kernel"].shape == (depths, 1, kernels * width)
    assert head["classifier"]["kernel"].shape == (kernels * width, 5)
    assert model.abstract_variables()["batch_stats"]["cla_head"]["norm_mid"]["mean"].shape == (
        kernels * width,
    )
    logits = np.asarray(forward(config, False)[0])
    assert logits.shape == (2, 5) and np.isfinite(logits).all()


OFFICIAL_CFG = dict(
    embed_dim=32, depth=6, num_heads=2, method="evit", keep_rate=0.3, reduction_loc=[1, 2, 3],
    head="cla", clc=True, num_clr=1, num_classes=5, pre_norm=True, ln_eps=1e-5, patch_bias=False,
)  # fmt: skip


def official_model_config(kernels):
    config = default_model_config()
    config.backbone = "vit_base_patch16_clip_224.laion2b"
    config.update(img_size=64, embed_dim=32, depth=6, num_heads=2, num_classes=5)
    config.reduction.update(method="evit", keep_rate=0.3, locations=(1, 2, 3))
    config.clca.update(head="cla", clc=True, num_clr=1, kernels_per_channel=kernels)
    return config


def test_converter_refuses_another_kernel_count():
    state = ref.random_official_state_dict(OFFICIAL_CFG, 64, seed=3)
    variables, _ = convert_state_dict(state, official_model_config(2))
    assert variables["params"]["cla_head"]["depthwise"]["kernel"].shape == (4, 1, 64)
    with pytest.raises(
        ConversionError, match=r"2 kernels per channel .*\.kernels_per_channel is 3"
    ):
        convert_state_dict(state, official_model_config(3))


@pytest.mark.parametrize(
    "method,field,value,message",
    [
        ("evit", "keep_rate", (0.5, 0.3), r"keep_rate has 2 entries \[0.5, 0.3\] but .* has 3"),
        ("evit", "keep_rate", (0.5, 0.0, 0.2), r"keep ratios for EViT .* \[0.0\] .* \(0, 1\]"),
        ("dynamicvit", "keep_rate", (0.5, 1.5, 0.2), r"\[1.5\] .* not numbers in \(0, 1\]"),
        ("tome", "keep_rate", (0.5, 0.3, 0.2), r"token counts for ToMe .* not integers >= 0"),
        ("ats", "keep_rate", (10, 0, 1), r"token counts for ATS .* \[0\] .* integers >= 1"),
        ("topk", "keep_rate", ("a", 0.3, 0.2), r"keep ratios for TopK .* \['a'\]"),
        ("dpcknn", "dpcknn_k", 0, "model.reduction.dpcknn_k must be a positive integer, got 0"),
        ("dpcknn", "dpcknn_k", 9, r"dpcknn_k=9 is more than the 7 tokens DPC-KNN stage 2"),
        ("dynamicvit", "dynamicvit_ratio_weight", -1.0, "ratio_weight must be a number >= 0"),
    ],
)
def test_bad_knobs_fail_up_front(method, field, value, message):
    config = vit_b_448(method, (300, 7, 2) if field == "dpcknn_k" else 0.5)
    config.reduction[field] = value
    with pytest.raises(ValueError, match=message):
        create_model(config)


def test_bad_kernel_count_fails_up_front():
    config = model_config("evit", clca=True)
    config.clca.kernels_per_channel = 0
    with pytest.raises(ValueError, match="model.clca.kernels_per_channel must be a positive"):
        create_model(config)
