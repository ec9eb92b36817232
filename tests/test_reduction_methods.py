"""Each reduction step against the plain NumPy reference: same kept indices / assignments and
outputs within 1e-5, on random inputs, with ties and at the smallest counts (spec 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clca_jax.models.reduction import ATS, DynamicViT, PatchMerger, SiT, Stage, StagePlan, Tokens
from clca_jax.models.reduction.dpcknn import density_peaks, merge_clusters
from clca_jax.models.reduction.evit import keep_attended
from clca_jax.models.reduction.tome import bipartite_merge
from clca_jax.models.vit import AttentionOutput
from tests.reference import clca_numpy as ref

ATOL = 1e-5
B, N, D, H = 3, 23, 16, 2


def rng(seed=0):
    return np.random.default_rng(seed)


def random_probs(generator, batch=B, length=N, heads=H, ties=False):
    logits = generator.standard_normal((batch, heads, length, length))
    if ties:  # equal CLS attention for several tokens
        logits[:, :, 0, 1:] = np.round(logits[:, :, 0, 1:])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return probs


def stage_of(count, tokens_in, protected=0):
    return Stage(
        index=0, block=0, plan=StagePlan(count, 0), tokens_in=tokens_in, protected=protected
    )


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("left", [1, 7, N - 2])
@pytest.mark.parametrize("fuse", [True, False])
def test_evit_and_topk(left, fuse, ties):
    generator = rng(left)
    x = generator.standard_normal((B, N, D))
    probs = random_probs(generator, ties=ties)
    expected, kept = ref.evit_reduce(x, probs, left, fuse=fuse)
    ours, our_kept = keep_attended(
        jnp.asarray(x, jnp.float32), jnp.asarray(probs.mean(1)[:, 0], jnp.float32), left, 0, fuse
    )
    np.testing.assert_array_equal(np.asarray(our_kept), kept)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL)


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("merges", [1, 5, (N - 1) // 2])
def test_tome(merges, duplicates):
    generator = rng(merges)
    x = generator.standard_normal((B, N, D))
    keys = generator.standard_normal((B, N, 8))
    if duplicates:  # identical keys give tied similarities
        keys[:, 5] = keys[:, 3]
        keys[:, 9] = keys[:, 3]
        keys[:, 6] = keys[:, 4]
    sizes = generator.integers(1, 4, (B, N)).astype(np.float64)
    expected, expected_sizes, destination = ref.tome_merge(x, keys, sizes, merges)
    ours, our_sizes, our_destination = bipartite_merge(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(sizes, jnp.float32),
        jnp.asarray(keys, jnp.float32),
        merges,
    )
    np.testing.assert_array_equal(np.asarray(our_destination), destination)
    np.testing.assert_allclose(np.asarray(our_sizes), expected_sizes, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL)


@pytest.mark.parametrize("ties", ["none", "broken_by_noise", "unbroken"])
@pytest.mark.parametrize("clusters", [1, 5, 12, N - 1])
def test_dpcknn(clusters, ties):
    generator = rng(clusters)
    x = generator.standard_normal((B, N - 1, D))
    noise = generator.uniform(size=(B, N - 1)) * 1e-6
    if ties != "none":
        # Mirrored pairs (x, -x) have identical distances to the rest, hence equal densities.
        # (Exact duplicate tokens are left out: their zero distance comes out as rounding noise
        # from the matmul distance formula, as in torch.cdist, so their order is arbitrary.)
        half = (N - 1) // 2
        x[:, half : 2 * half] = -x[:, :half]
    if ties == "broken_by_noise":
        # Large enough that float32 rounding cannot reorder the tied pairs.
        noise = noise * 1e3
    if ties == "unbroken":
        noise = np.zeros_like(noise)
    score_w = generator.standard_normal((1, D)) * 0.3
    score_b = generator.standard_normal(1) * 0.1
    merged, assign, centres = ref.dpcknn_cluster(x, clusters, score_w, score_b, noise=noise)
    x32 = jnp.asarray(x, jnp.float32)
    our_assign, our_centres = density_peaks(x32, clusters, jnp.asarray(noise, jnp.float32))
    weight = jnp.exp(x32 @ jnp.asarray(score_w[0], jnp.float32) + score_b[0])
    ours = merge_clusters(x32, weight, our_assign, clusters)
    np.testing.assert_array_equal(np.asarray(our_centres), centres)
    np.testing.assert_array_equal(np.asarray(our_assign), assign)
    np.testing.assert_allclose(np.asarray(ours), merged, atol=ATOL)


def dynamicvit_variables(params):
    dense = lambda w, b: {"kernel": w.T, "bias": b}  # noqa: E731
    return {
        "params": {
            "predictor": {
                "norm": {"scale": params["ln_w"], "bias": params["ln_b"]},
                "proj_in": dense(params["in_w"], params["in_b"]),
                "fc1": dense(params["out0_w"], params["out0_b"]),
                "fc2": dense(params["out2_w"], params["out2_b"]),
                "fc3": dense(params["out4_w"], params["out4_b"]),
            }
        }
    }


@pytest.mark.parametrize("keep", [1, 6, N - 1])
def test_dynamicvit_evaluation(keep):
    generator = rng(keep)
    x = generator.standard_normal((B, N, D))
    decision = np.ones((B, N - 1))
    decision[:, -3:] = 0.0  # tokens recovered at evaluation do not count in the pooling
    params = {
        "ln_w": 1 + 0.1 * generator.standard_normal(D), "ln_b": 0.1 * generator.standard_normal(D),
        "in_w": generator.standard_normal((D, D)) / 4, "in_b": 0.1 * generator.standard_normal(D),
        "out0_w": generator.standard_normal((D // 2, D)) / 4, "out0_b": np.zeros(D // 2),
        "out2_w": generator.standard_normal((D // 4, D // 2)) / 3, "out2_b": np.zeros(D // 4),
        "out4_w": generator.standard_normal((2, D // 4)), "out4_b": np.zeros(2),
    }  # fmt: skip
    expected, expected_decision, kept, _ = ref.dynamicvit_keep(x, decision, params, keep)
    tokens = Tokens(
        x=jnp.asarray(x, jnp.float32),
        decision=jnp.asarray(np.concatenate([np.ones((B, 1)), decision], 1), jnp.float32),
    )
    module = DynamicViT(stage_of(keep, N))
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dynamicvit_variables(params))
    out = module.apply(variables, tokens, None, False)
    np.testing.assert_array_equal(np.asarray(out.kept), kept)
    np.testing.assert_allclose(np.asarray(out.tokens.x), expected, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out.tokens.decision)[:, 1:], expected_decision)


@pytest.mark.parametrize("samples", [1, 2, 6, 30])
def test_ats(samples):
    generator = rng(samples)
    x = generator.standard_normal((B, N, D))
    probs = random_probs(generator)
    probs[0, :, 0, 5:9] = 0.0  # zero significance: flat CDF, tied distances
    values = generator.standard_normal((B, H, N, 8))
    mask = np.ones((B, N), bool)
    mask[1, 3:6] = False  # padding from an earlier stage: CDF + 0.1
    ids, new_mask = ref.ats_select(probs, values, mask, samples)
    slots = len(ref.ats_quantile_points(samples))
    stage = stage_of(samples, N)
    attention = AttentionOutput(
        cls_probs=jnp.asarray(probs[:, :, 0], jnp.float32),
        keys=jnp.zeros((B, H, N, 8)),
        values=jnp.asarray(values, jnp.float32),
    )
    tokens = Tokens(x=jnp.asarray(x, jnp.float32), valid=jnp.asarray(mask))
    # The NumPy reference measures |cdf - point| exactly (torch.cdist: tests/test_ats_cdist.py).
    out = ATS(stage, distance="exact").apply({}, tokens, attention, False)
    assert out.tokens.x.shape[1] == 1 + slots
    width = ids.shape[1]
    our_ids = np.where(np.asarray(out.kept) < 0, 0, np.asarray(out.kept))
    np.testing.assert_array_equal(our_ids[:, :width], ids)
    np.testing.assert_array_equal(np.asarray(out.tokens.valid)[:, :width], new_mask)
    assert not np.asarray(out.tokens.valid)[:, width:].any()
    np.testing.assert_allclose(
        np.asarray(out.tokens.x)[:, :width], x[np.arange(B)[:, None], ids], atol=ATOL
    )
    # Slots past the batch's largest count do not exist in the reference.
    present = np.asarray(out.tokens.present)
    assert present[:, :width].all() and not present[:, width:].any()


@pytest.mark.parametrize("count", [0, 1, 9])
def test_sit(count):
    generator = rng(count)
    x = generator.standard_normal((B, N, D))
    ln_w, ln_b = 1 + 0.1 * generator.standard_normal(D), 0.1 * generator.standard_normal(D)
    fc1_w, fc1_b = (
        generator.standard_normal((D // 2, D)) / 4,
        0.1 * generator.standard_normal(D // 2),
    )
    fc2_w, fc2_b = (
        generator.standard_normal((count, D // 2)),
        0.1 * generator.standard_normal(count),
    )
    scale = np.array([[[1.3]]])
    expected, weights = ref.sit_slim(x[:, 1:], ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, scale)
    variables = {
        "params": {
            "scale": scale,
            "norm": {"scale": ln_w, "bias": ln_b},
            "fc1": {"kernel": fc1_w.T, "bias": fc1_b},
            "fc2": {"kernel": fc2_w.T, "bias": fc2_b},
        }
    }
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    out = SiT(stage_of(count, N)).apply(
        variables, Tokens(x=jnp.asarray(x, jnp.float32)), None, False
    )
    np.testing.assert_allclose(np.asarray(out.kept), weights, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.tokens.x)[:, 1:], expected, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.tokens.x)[:, 0], x[:, 0], atol=ATOL)


@pytest.mark.parametrize("count", [1, 9])
def test_patchmerger(count):
    generator = rng(count)
    x = generator.standard_normal((B, N, D))
    ln_w, ln_b = 1 + 0.1 * generator.standard_normal(D), 0.1 * generator.standard_normal(D)
    queries = generator.standard_normal((count, D)) * 0.3
    expected, weights = ref.patchmerger_merge(x[:, 1:], ln_w, ln_b, queries)
    variables = {"params": {"queries": queries, "norm": {"scale": ln_w, "bias": ln_b}}}
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    out = PatchMerger(stage_of(count, N)).apply(
        variables, Tokens(x=jnp.asarray(x, jnp.float32)), None, False
    )
    np.testing.assert_allclose(np.asarray(out.kept), weights, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.tokens.x)[:, 1:], expected, atol=ATOL)


def test_top_k_breaks_ties_towards_the_lower_index():
    scores = jnp.asarray([[0.5, 0.7, 0.5, 0.7, 0.1]])
    np.testing.assert_array_equal(jax.lax.top_k(scores, 4)[1], [[1, 3, 0, 2]])
