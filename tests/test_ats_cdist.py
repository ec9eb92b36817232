"""ATS measures "nearest" as the reference does, against torch itself (spec 5.6).

The reference picks, for each quantile point of `torch.arange`, the token whose cumulative
significance is nearest by `torch.cdist` + `torch.argmin`. For more than 25 points or tokens
torch.cdist uses a matrix-product formula whose float32 rounding decides some picks, so these
tests compare with torch, not with the NumPy reference (which measures exactly; the
`distance="exact"` option is tested against it in test_reduction_methods and test_clca_parity).

The sums of squares are compared bit for bit with torch's own matrix product of the operands
torch.cdist builds. The square roots are not: on the CPU both torch and XLA take vectorised
ones that can be one ulp off, how often depends on the CPU and its instruction set. So
torch.cdist's distances must be ours or one ulp away, and where the ulp makes or breaks an exact
tie the first-index pick can differ; such picks are identified, every other pick must be
identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from clca_jax.models import create_model, default_model_config
from clca_jax.models.reduction import ATS, Stage, StagePlan, Tokens
from clca_jax.models.reduction.ats import (
    cdist_squared,
    cumsum_float64,
    quantile_points,
    torch_cdist,
)
from clca_jax.models.vit import AttentionOutput

# (tokens in the cumulative distribution, samples K): both below torch's 25-row threshold,
# at it, above it through the tokens, above it through the points, and ATS's shapes at 224 px
# and 448 px (keep rates 0.7 and 0.1).
SHAPES = [(10, 8), (25, 26), (26, 8), (20, 31), (196, 138), (784, 549), (784, 79)]
SHARPNESS = {"flat": 0.3, "sharp": 8.0}  # scale of the logits before the softmax
BATCH = 3


def torch_points(samples: int) -> torch.Tensor:
    """The reference's sample steps."""
    return torch.arange(1 / (2 * samples), (2 * samples - 1) / (2 * samples), 2 / (2 * samples))


def torch_nearest(cdf: torch.Tensor, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's distances [B, Q, N] and picks [B, Q] (0-based token positions)."""
    distance = torch.cdist(torch_points(samples).unsqueeze(0).unsqueeze(2), cdf.unsqueeze(2))
    return distance.numpy(), torch.argmin(distance, dim=-1).numpy()


def torch_cdf(tokens: int, sharpness: float, seed: int) -> torch.Tensor:
    """A reference-style cumulative significance [B, tokens]: normalised, cumulative in float32."""
    generator = np.random.default_rng(seed)
    logits = torch.from_numpy(sharpness * generator.standard_normal((BATCH, tokens)))
    significance = torch.softmax(logits, dim=-1).float()
    return (significance / (significance.sum(-1, keepdim=True) + 1e-6)).cumsum(dim=1)


def torch_squared(points: np.ndarray, cdf: torch.Tensor) -> np.ndarray:
    """torch.cdist's sums of squares [B, Q, N]: its operands and its matrix product."""
    x1 = torch.from_numpy(points)[None, :, None].expand(cdf.shape[0], -1, -1)
    x2 = cdf.unsqueeze(2)
    x1_ = torch.cat([x1.mul(-2), x1.pow(2), torch.ones_like(x1)], -1)
    x2_ = torch.cat([x2, torch.ones_like(x2), x2.pow(2)], -1)
    return x1_.matmul(x2_.mT).numpy()


def our_distances(points: np.ndarray, cdf: np.ndarray, rows, jit: bool) -> np.ndarray:
    def distances(values):
        return torch_cdist(points, values, rows)

    return np.asarray((jax.jit(distances) if jit else distances)(jnp.asarray(cdf)))


def assert_distances_match(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Bit-identical, or torch's square root of the same sum: one ulp apart at most."""
    one_ulp = (theirs == np.nextafter(ours, np.float32(0))) | (
        theirs == np.nextafter(ours, np.float32(np.inf))
    )
    assert np.all((ours == theirs) | one_ulp)


def sqrt_ties(ours: np.ndarray, theirs: np.ndarray, our_picks, their_picks) -> np.ndarray:
    """[B, Q] True where the two picks differ only because one side sees a tie the other does
    not (first index wins)."""
    ours_at = np.take_along_axis(ours, their_picks[..., None], -1)[..., 0]
    ours_min = np.take_along_axis(ours, our_picks[..., None], -1)[..., 0]
    theirs_at = np.take_along_axis(theirs, our_picks[..., None], -1)[..., 0]
    theirs_min = np.take_along_axis(theirs, their_picks[..., None], -1)[..., 0]
    return (our_picks != their_picks) & ((ours_at == ours_min) | (theirs_at == theirs_min))


def test_quantile_points_are_torch_arange():
    for samples in range(1, 1200):
        np.testing.assert_array_equal(quantile_points(samples), torch_points(samples).numpy())


@pytest.mark.parametrize("tokens", [10, 26, 197, 785])
def test_cumulative_sum_is_torch_cumsum(tokens):
    generator = np.random.default_rng(tokens)
    values = (generator.random((BATCH, tokens)) ** 4).astype(np.float32)
    expected = torch.from_numpy(values).cumsum(dim=1).numpy()
    np.testing.assert_array_equal(np.asarray(cumsum_float64(jnp.asarray(values))), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(cumsum_float64)(values)), expected)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("sharpness", list(SHARPNESS))
@pytest.mark.parametrize("shape", SHAPES)
def test_distances_and_picks_match_torch(shape, sharpness, jit):
    tokens, samples = shape
    cdf = torch_cdf(tokens, SHARPNESS[sharpness], seed=tokens + samples)
    theirs, their_picks = torch_nearest(cdf, samples)
    points = quantile_points(samples)
    ours = our_distances(points, cdf.numpy(), tokens, jit)
    assert_distances_match(ours, theirs)
    if max(tokens, samples) > 25:  # torch's matrix-product formula
        squared = np.asarray(cdist_squared(points, jnp.asarray(cdf.numpy())))
        np.testing.assert_array_equal(squared, torch_squared(points, cdf))
    else:
        np.testing.assert_array_equal(ours, theirs)
    our_picks = ours.argmin(-1)
    ties = sqrt_ties(ours, theirs, our_picks, their_picks)
    np.testing.assert_array_equal(our_picks[~ties], their_picks[~ties])


@pytest.mark.parametrize("rows", [20, 26])
def test_formula_follows_the_reference_row_count(rows):
    """Absent slots (the static padding) do not count towards torch's 25-row threshold."""
    samples = 8
    cdf = torch_cdf(rows, SHARPNESS["flat"], seed=rows)
    theirs, _ = torch_nearest(cdf, samples)
    padded = np.concatenate([cdf.numpy(), np.full((BATCH, 40 - rows), 1e9, np.float32)], 1)
    ours = our_distances(quantile_points(samples), padded, jnp.asarray(rows), jit=True)
    assert_distances_match(ours[:, :, :rows], theirs)


# --- one whole ATS step -------------------------------------------------------------------
#
# Class-token attention on a 2^-16 grid (each head's row sums to at most 1) and value vectors
# with one integer entry 1..7: every product and sum of the significance is then exact in any
# order, so torch and XLA agree on it bit for bit and the step isolates the sampling.

HEADS, HEAD_DIM = 4, 8


def dyadic_inputs(tokens: int, sharpness: float, seed: int):
    generator = np.random.default_rng(seed)
    logits = sharpness * generator.standard_normal((BATCH, HEADS, tokens))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.floor(probs / probs.sum(-1, keepdims=True) * 2**16) / 2**16
    values = np.zeros((BATCH, HEADS, tokens, HEAD_DIM))
    slot = generator.integers(0, HEAD_DIM, (BATCH, HEADS, tokens))
    np.put_along_axis(values, slot[..., None], generator.integers(1, 8, slot.shape)[..., None], -1)
    valid = np.ones((BATCH, tokens), bool)
    valid[1, 5 : 5 + tokens // 10] = False  # padding from an earlier stage: CDF + 0.1
    return probs.astype(np.float32), values.astype(np.float32), valid


def reference_step(probs, values, valid, samples):
    """The reference's AdaptiveTokenSampling ids and mask, in torch (spec 5.6)."""
    probs, values, valid = map(torch.from_numpy, (probs, values, valid))
    significance = torch.sum(probs[:, :, 1:] * values[:, :, 1:].norm(dim=-1), dim=1)
    cdf = (significance / (significance.sum(dim=-1, keepdim=True) + 1e-6)).cumsum(dim=1)
    cdf[~valid[:, 1:]] += 0.1
    _, picks = torch_nearest(cdf, samples)
    unique = [np.unique(row + 1) for row in picks]
    width = 1 + max(len(row) for row in unique)
    ids = np.zeros((BATCH, width), np.int64)
    for b, row in enumerate(unique):
        ids[b, 1 : 1 + len(row)] = row
    mask = np.arange(width)[None] <= np.array([len(row) for row in unique])[:, None]
    return ids, mask, cdf


@pytest.mark.parametrize("sharpness", list(SHARPNESS))
@pytest.mark.parametrize("shape", [(26, 8), (197, 138), (785, 549)])
@pytest.mark.parametrize("absent", [0, 9])
def test_ats_step_matches_torch(shape, sharpness, absent):
    tokens, samples = shape
    probs, values, valid = dyadic_inputs(tokens, SHARPNESS[sharpness], seed=tokens)
    ids, mask, cdf = reference_step(probs, values, valid, samples)
    theirs, their_picks = torch_nearest(cdf, samples)
    ours = our_distances(quantile_points(samples), cdf.numpy(), tokens - 1, jit=False)
    assert not sqrt_ties(ours, theirs, ours.argmin(-1), their_picks).any()  # a clean case

    # Static slots beyond the reference's sequence: absent, never sampled, not counted.
    def pad(array, value):
        widths = [(0, 0)] * array.ndim
        widths[2 if array.ndim > 2 else 1] = (0, absent)
        return np.pad(array, widths, constant_values=value)

    present = pad(np.ones((BATCH, tokens), bool), False)
    attention = AttentionOutput(
        cls_probs=jnp.asarray(pad(probs, 0.0)),
        keys=jnp.zeros((BATCH, HEADS, tokens + absent, HEAD_DIM)),
        values=jnp.asarray(pad(values, 0.0)),
    )
    x = np.random.default_rng(1).standard_normal((BATCH, tokens + absent, 4)).astype(np.float32)
    state = Tokens(
        x=jnp.asarray(x),
        valid=jnp.asarray(pad(valid, False)),
        present=jnp.asarray(present) if absent else None,
    )
    stage = Stage(0, block=0, plan=StagePlan(samples, 0), tokens_in=tokens + absent, protected=0)
    out = jax.jit(lambda s, a: ATS(stage).apply({}, s, a, False))(state, attention)
    width = ids.shape[1]
    kept = np.asarray(out.kept)
    np.testing.assert_array_equal(np.where(kept < 0, 0, kept)[:, :width], ids)
    np.testing.assert_array_equal(np.asarray(out.tokens.valid)[:, :width], mask)
    assert not np.asarray(out.tokens.valid)[:, width:].any()
    gathered = x[np.arange(BATCH)[:, None], ids]
    np.testing.assert_array_equal(np.asarray(out.tokens.x)[:, :width], gathered)


def test_exact_distance_is_an_option():
    config = default_model_config()
    config.embed_dim, config.depth, config.num_heads, config.img_size = 32, 4, 2, 64
    config.reduction.method, config.reduction.keep_rate = "ats", 0.7
    config.reduction.locations = (1, 2)
    assert create_model(config).reduction.ats_distance == "torch_cdist"
    config.reduction.ats_distance = "exact"
    assert create_model(config).reduction.ats_distance == "exact"
    config.reduction.ats_distance = "l1"
    with pytest.raises(ValueError, match="model.reduction.ats_distance must be one of"):
        create_model(config)
