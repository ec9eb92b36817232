"""Plain NumPy (float64) reference of the official CLCA model's *evaluation* forward pass.

This module is a parity oracle for tests. It is written for readability, not speed: every rule of
the reference behaviour (token counts, orderings, cache handling) is spelled out with explicit
loops. All arithmetic is float64. Only the evaluation path is modelled (BatchNorm running stats,
DynamicViT physical pruning, no dropout / drop-path / Gumbel noise).

Configuration (``cfg``; missing keys take the defaults in ``DEFAULT_CFG``)
-----------------------------------------------------------------------------
architecture: ``embed_dim, depth, num_heads, patch_size, mlp_ratio, qkv_bias, ln_eps, patch_bias,
no_embed_class (DeiT-3), pre_norm (CLIP), layer_scale (DeiT-3)``.
reduction: ``method`` in METHODS, ``keep_rate`` (one float), ``reduction_loc`` (0-based blocks,
default [3, 6, 9]).
CLCA: ``head`` in {'cla', 'ifa', 'none'}, ``clc``, ``num_clr``, ``include_gap``,
``recover_at_last``, ``pool_cls``, ``pool_clr``, ``num_classes``, ``pretrain_classes`` (rows of the
unused construction-time ``head`` kept in the state dict when a CLA/IFA head is used).

Public functions (x = token sequence [B, N, D] with CLS at index 0)
--------------------------------------------------------------------
forward(state_dict, cfg, images, dpcknn_noise=None) -> (logits [B, C], info)
    images: [B, 3, H, W] already normalised. ``dpcknn_noise``: optional list (one entry per
    reduction stage) of arrays [B, n] added to the DPC-KNN density of the n clustered tokens; the
    official code adds fresh U(0, 1) * 1e-6 noise in train and eval, pass such values here to
    replay a draw; default: zeros (no noise).
    info['lengths']: list over blocks of (attention_length, mlp_length), i.e. the number of tokens
        the attention and the MLP of that block process (ATS: padded batch length).
    info['kept']: list over reduction stages (order of reduction_loc) of:
        evit / topk / dynamicvit: int [B, k] - positions (in the sequence that entered this
            reduction, CLS = 0) of the kept non-CLS tokens, in output order (output slot j+1 holds
            input token kept[:, j]; EViT's fused token follows in the last slot). ``None`` when the
            stage is a no-op (EViT/Top-K with ceil(kr*(N-1)) == N-1).
        tome: int [B, N] - for every input token (input position) the output slot it lands in.
        dpcknn: tuple (assign int [B, n], centers int [B, c]) over the n clustered tokens (input
            positions 1..n): assign[b, t] = output cluster slot of token t (cluster slot s is output
            position 1+s); centers[b, s] = token index (0..n-1) of the centre of slot s.
        ats: int [B, L] - ids gathered from the input sequence, slot 0 = CLS (id 0), then the
            sorted unique sampled ids (>= 1), then padding ids 0 (padding = copies of CLS, masked).
        sit / patchmerger: float [B, K, S] mixing weights over the S non-CLS input tokens.
    info['cls_stack']: [B, D, L] the CLS vectors given to the CLA/IFA head (None for head 'none').
    info['tokens']: [B, N, D] the sequence after the last block (before the final norm).

token_schedule(cfg, img_size) -> list of (attn_len, mlp_len) per block, from Python float64
    formulas only. For 'ats' the numbers are upper bounds (1 + number of quantile points).

random_official_state_dict(cfg, img_size, seed) -> dict[str, np.ndarray] (float32; the BN
    ``num_batches_tracked`` entries are int64 scalars), official key names and shapes.

Per-method building blocks (usable on their own):
evit_num_keep(n, keep_rate) -> left = ceil(keep_rate * (n - 1))
evit_reduce(x, attn_probs, left, fuse=True) -> (x_new, kept)
    x: sequence after the attention residual [B, N, D]; attn_probs: softmax probs [B, H, N, N].
    x_new = [CLS, kept tokens by descending head-mean CLS attention, (fused token if fuse)].
tome_merge_counts(num_patches, keep_rate, num_stages) -> requested merges r_s per stage
tome_merge(x, keys, sizes, r) -> (x_new, sizes_new, dest)
    keys: head-mean attention keys [B, N, hd] (not normalised); sizes [B, N] or None (= ones);
    r: requested merges (clipped to (N-1)//2). dest [B, N] as info['kept'] for ToMe.
dpcknn_cluster_counts(num_patches, keep_rate, num_stages) -> clusters per stage
dpcknn_cluster(x, num_clusters, score_w, score_b, noise=None, k=5) -> (merged, assign, centers)
    x: [B, n, D] tokens to cluster (strictly between CLS and the protected suffix);
    score_w [1, D], score_b [1]; merged [B, c, D] in centre order.
dynamicvit_num_keep(num_tokens, num_initial, keep_rate, stage, clc) -> kept non-CLS count
dynamicvit_predict(tokens, decision, params) -> log-probabilities [B, S, 2] (channel 0 = keep)
    params: dict with 'ln_w','ln_b','in_w','in_b','out0_w','out0_b','out2_w','out2_b','out4_w',
    'out4_b' (see dynamicvit_params); decision [B, S] in {0, 1}.
dynamicvit_keep(x, decision, params, num_keep) -> (x_new, decision_new, kept, log_probs)
ats_sample_counts(num_patches, keep_rate, num_stages) -> K per stage
ats_quantile_points(k) -> list of float quantile points (float32-rounded like torch.arange)
ats_select(attn_probs, v, mask, k) -> (ids [B, L], new_mask [B, L])
    attn_probs: masked softmax probs [B, H, N, N]; v: values [B, H, N, hd]; mask: bool [B, N].
slim_counts(num_patches, keep_rate, num_stages) -> SiT / PatchMerger output counts K per stage
sit_slim(tokens, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, scale) -> (new [B, K, D], w [B, K, S])
patchmerger_merge(tokens, ln_w, ln_b, queries) -> (new [B, K, D], attn [B, K, S])
cla_head(cls_stack, sd) / ifa_head(cls_stack, sd) -> logits [B, C]; cls_stack [B, D, L].
official_param_shapes(cfg, img_size) -> {official key: shape} (the key list of the state dict).

Behaviour notes
---------------
* Recovery layers = reduction_loc + [depth - 2] (recover_at_last) else reduction_loc. The CLA/IFA
  head reads CLS after every block in reduction_loc and after the last block. The official plain
  ViT file hard-codes [3, 6, 9] for CLA/CLC; pass reduction_loc=[3, 6, 9] with method 'none'.
* GAP of an empty slice is NaN (as in torch): with the default recovery after block depth-2, SiT,
  PatchMerger and ATS at keep rate 0.1 (448 px) collapse to CLS only at the last stage, so the
  cached GAP, and from the next block on every token and the logits, are NaN.
* Ties in rankings (EViT/Top-K/DynamicViT top-k, ToMe ordering, DPC-KNN centres) are broken
  towards the lower index; argmin/argmax take the first index. Distances (DPC-KNN, ATS) are exact
  float64 differences, whereas the official torch.cdist uses a matmul formula in float32.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

METHODS = (
    "none",
    "evit",
    "topk",
    "tome",
    "dpcknn",
    "dynamicvit",
    "ats",
    "sit",
    "patchmerger",
)
STATIC_METHODS = tuple(m for m in METHODS if m != "ats")
BEFORE_BLOCK_METHODS = ("dpcknn", "dynamicvit", "sit", "patchmerger")
INSIDE_BLOCK_METHODS = ("evit", "topk", "tome", "ats")

DEFAULT_CFG = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "patch_size": 16,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "ln_eps": 1e-6,
    "patch_bias": True,
    "no_embed_class": False,
    "pre_norm": False,
    "layer_scale": False,
    "method": "none",
    "keep_rate": 1.0,
    "reduction_loc": None,
    "head": "none",
    "clc": False,
    "num_clr": 0,
    "include_gap": True,
    "recover_at_last": True,
    "pool_cls": False,
    "pool_clr": False,
    "num_classes": 1000,
    "pretrain_classes": 1000,
}

NEW_MODULE_LN_EPS = 1e-5  # nn.LayerNorm default: predictors, SiT, PatchMerger, IFA head
BN_EPS = 1e-5
DPC_KNN_K = 5


def resolve_cfg(cfg: dict) -> dict:
    """Fill in defaults; reduction_loc defaults to [3, 6, 9]."""
    out = dict(DEFAULT_CFG)
    out.update(cfg)
    if out["reduction_loc"] is None:
        out["reduction_loc"] = [3, 6, 9]
    out["reduction_loc"] = [int(v) for v in out["reduction_loc"]]
    if out["method"] not in METHODS:
        raise ValueError(f"unknown method {out['method']}")
    if out["head"] not in ("cla", "ifa", "none"):
        raise ValueError(f"unknown head {out['head']}")
    return out


def recovery_layers(cfg: dict) -> list[int]:
    cfg = resolve_cfg(cfg)
    loc = list(cfg["reduction_loc"])
    if cfg["recover_at_last"]:
        return loc + [cfg["depth"] - 2]
    return loc


# ----------------------------------------------------------------------------------------------
# Primitive layers
# ----------------------------------------------------------------------------------------------


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, like PyTorch
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def linear(x, weight, bias=None):
    """PyTorch convention: weight [out, in]."""
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = (flat @ np.ascontiguousarray(weight.T)).reshape(x.shape[:-1] + (weight.shape[0],))
    if bias is not None:
        y = y + bias
    return y


def softmax(z, axis=-1):
    shifted = z - z.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z, axis=-1):
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def patch_embed(images, weight, bias, patch):
    """Conv patch x patch / stride patch, tokens in row-major (h, w) order. -> [B, P, D]."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    d = weight.shape[0]
    flat_w = weight.reshape(d, c * patch * patch)
    tokens = np.zeros((b, gh * gw, d))
    for i in range(gh):
        for j in range(gw):
            pixels = images[:, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            tokens[:, i * gw + j] = pixels.reshape(b, c * patch * patch) @ flat_w.T
    if bias is not None:
        tokens = tokens + bias
    return tokens


def attention(h, qkv_w, qkv_b, proj_w, proj_b, num_heads, key_bias=None, mask=None):
    """Multi-head self attention on the (already normalised) input h [B, N, D].

    key_bias: [B, N] added to the logits of every key (ToMe proportional attention: log size).
    mask: bool [B, N]; logits of pairs (i, j) with mask_i AND mask_j False are set to
        -finfo.max (ATS), so a fully masked query row becomes uniform.
    Returns (out [B, N, D] after the output projection, probs [B, H, N, N], k, v [B, H, N, hd]).
    """
    b, n, d = h.shape
    hd = d // num_heads
    qkv = linear(h, qkv_w, qkv_b).reshape(b, n, 3, num_heads, hd)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    probs = np.zeros((b, num_heads, n, n))
    ctx = np.zeros((b, n, d))
    for bi in range(b):
        for hi in range(num_heads):
            qs = np.ascontiguousarray(q[bi, hi]) * hd**-0.5
            logits = qs @ np.ascontiguousarray(k[bi, hi].T)  # [N queries, N keys]
            if key_bias is not None:
                logits = logits + key_bias[bi][None, :]
            if mask is not None:
                pair = mask[bi][:, None] & mask[bi][None, :]
                logits = np.where(pair, logits, -np.finfo(np.float64).max)
            probs[bi, hi] = softmax(logits, axis=-1)
            ctx[bi, :, hi * hd : (hi + 1) * hd] = probs[bi, hi] @ np.ascontiguousarray(v[bi, hi])
    return linear(ctx, proj_w, proj_b), probs, k, v


def _block_attention_branch(x, sd, i, cfg, key_bias=None, mask=None):
    pre = f"blocks.{i}."
    h = layer_norm(x, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], cfg["ln_eps"])
    out, probs, k, v = attention(
        h,
        sd[pre + "attn.qkv.weight"],
        sd.get(pre + "attn.qkv.bias"),
        sd[pre + "attn.proj.weight"],
        sd[pre + "attn.proj.bias"],
        cfg["num_heads"],
        key_bias=key_bias,
        mask=mask,
    )
    if cfg["layer_scale"]:
        out = out * sd[pre + "ls1.gamma"]
    return out, probs, k, v


def _block_mlp(x, sd, i, cfg):
    pre = f"blocks.{i}."
    h = layer_norm(x, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], cfg["ln_eps"])
    h = gelu(linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    h = linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    if cfg["layer_scale"]:
        h = h * sd[pre + "ls2.gamma"]
    return x + h


# ----------------------------------------------------------------------------------------------
# EViT / Top-K (inside the block, between the attention residual and the MLP)
# ----------------------------------------------------------------------------------------------


def evit_num_keep(n, keep_rate):
    """left = ceil(keep_rate * (n - 1)) with n the current length including CLS."""
    return math.ceil(keep_rate * (n - 1))


def evit_reduce(x, attn_probs, left, fuse=True):
    """Keep the `left` non-CLS tokens with highest head-mean CLS attention (descending order).

    fuse=True (EViT): append sum_j score_j * x_j over the dropped tokens (raw scores, no
    renormalisation). fuse=False: Top-K. Ties in the score are broken towards the lower index.
    Returns (x_new [B, 1 + left (+1), D], kept int [B, left] input positions in output order).
    """
    b_size, n, d = x.shape
    score = attn_probs[:, :, 0, 1:].mean(axis=1)  # [B, N-1], token j+1 of the sequence
    rows_out = []
    kept = np.zeros((b_size, left), dtype=np.int64)
    for b in range(b_size):
        order = np.argsort(-score[b], kind="stable")
        top = order[:left]
        dropped = sorted(int(j) for j in order[left:])
        rows = [x[b, 0]]
        for slot, j in enumerate(top):
            rows.append(x[b, j + 1])
            kept[b, slot] = j + 1
        if fuse:
            extra = np.zeros(d)
            for j in dropped:
                extra = extra + score[b, j] * x[b, j + 1]
            rows.append(extra)
        rows_out.append(np.stack(rows))
    return np.stack(rows_out), kept


# ----------------------------------------------------------------------------------------------
# ToMe (inside the block)
# ----------------------------------------------------------------------------------------------


def tome_merge_counts(num_patches, keep_rate, num_stages):
    """r_s = t_{s-1} - t_s with t_s = int(P * kr ** (s + 1)), t_{-1} = P."""
    targets = [int(num_patches * keep_rate ** (s + 1)) for s in range(num_stages)]
    counts = []
    prev = num_patches
    for t in targets:
        counts.append(prev - t)
        prev = t
    return counts


def tome_merge(x, keys, sizes, r):
    """Bipartite soft matching on position parity, size-weighted average merge.

    A = even positions (CLS at 0, never merged), B = odd positions. Each A token picks its most
    similar B token (cosine of head-mean keys); the r A tokens with the highest best-similarity
    are merged into their match. Output = [unmerged A (ascending position), all B (in order)].
    Returns (x_new [B, N - r', D], sizes_new [B, N - r'], dest int [B, N]).
    """
    b_size, n, d = x.shape
    if sizes is None:
        sizes = np.ones((b_size, n))
    r = min(r, (n - 1) // 2)
    if r <= 0:
        dest = np.tile(np.arange(n, dtype=np.int64), (b_size, 1))
        return x.copy(), sizes.copy(), dest
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    n_out = n - r
    x_new = np.zeros((b_size, n_out, d))
    sizes_new = np.zeros((b_size, n_out))
    dest = np.zeros((b_size, n), dtype=np.int64)
    for b in range(b_size):
        metric = keys[b] / np.linalg.norm(keys[b], axis=-1, keepdims=True)
        scores = metric[a_pos] @ metric[b_pos].T  # [|A|, |B|]
        scores[0, :] = -np.inf  # CLS is never a source
        best = np.argmax(scores, axis=1)
        best_score = scores[np.arange(len(a_pos)), best]
        order = np.argsort(-best_score, kind="stable")  # descending similarity
        src = [int(a) for a in order[:r]]
        unmerged = sorted(int(a) for a in order[r:])
        n_unm = len(unmerged)
        assert n_unm + len(b_pos) == n_out
        weighted_sum = np.zeros((n_out, d))
        size_sum = np.zeros(n_out)
        for slot, a in enumerate(unmerged):
            pos = a_pos[a]
            dest[b, pos] = slot
        for j, pos in enumerate(b_pos):
            dest[b, pos] = n_unm + j
        for a in src:
            dest[b, a_pos[a]] = n_unm + int(best[a])
        for pos in range(n):
            slot = dest[b, pos]
            weighted_sum[slot] += x[b, pos] * sizes[b, pos]
            size_sum[slot] += sizes[b, pos]
        x_new[b] = weighted_sum / size_sum[:, None]
        sizes_new[b] = size_sum
    return x_new, sizes_new, dest


# ----------------------------------------------------------------------------------------------
# DPC-KNN (before the block)
# ----------------------------------------------------------------------------------------------


def dpcknn_cluster_counts(num_patches, keep_rate, num_stages):
    counts = [int(num_patches * (keep_rate ** (s + 1))) for s in range(num_stages)]
    for s, c in enumerate(counts):
        if s + 1 != num_stages and c <= 5:
            counts[s] = 5
        elif s + 1 == num_stages and c == 0:
            counts[s] = 1
    return counts


def dpcknn_cluster(x, num_clusters, score_w, score_b, noise=None, k=DPC_KNN_K):
    """Density-peak clustering with k-NN density, then weighted merge per cluster.

    dist = euclidean / sqrt(D); density = exp(-mean of the k smallest squared distances (self
    included)) + noise; delta_i = min distance to a token of strictly higher density (global max
    distance if none); centres = top-c of delta * density (descending = output order); every token
    joins its nearest centre (first centre on ties), centres join themselves. Merge weight
    w = exp(score(x)); cluster = sum w x / (sum w + 1e-6).
    Returns (merged [B, c, D], assign int [B, n], centers int [B, c]).
    """
    b_size, n, d = x.shape
    c = num_clusters
    merged = np.zeros((b_size, c, d))
    assign = np.zeros((b_size, n), dtype=np.int64)
    centers = np.zeros((b_size, c), dtype=np.int64)
    for b in range(b_size):
        xb = x[b]
        dist = np.zeros((n, n))
        for i in range(n):
            dist[i] = np.sqrt(((xb - xb[i]) ** 2).sum(axis=-1)) / math.sqrt(d)
        nearest = np.sort(dist, axis=1)[:, :k]
        density = np.exp(-(nearest**2).mean(axis=1))
        if noise is not None:
            density = density + noise[b]
        dist_max = dist.max()
        delta = np.zeros(n)
        for i in range(n):
            higher = density > density[i]
            delta[i] = dist[i][higher].min() if higher.any() else dist_max
        score = delta * density
        centre_idx = np.argsort(-score, kind="stable")[:c]
        centers[b] = centre_idx
        for t in range(n):
            assign[b, t] = int(np.argmin(dist[centre_idx, t]))
        for slot, t in enumerate(centre_idx):
            assign[b, t] = slot
        weight = np.exp(xb @ score_w[0] + score_b[0])
        for slot in range(c):
            members = np.nonzero(assign[b] == slot)[0]
            total = weight[members].sum() + 1e-6
            acc = np.zeros(d)
            for t in members:
                acc = acc + xb[t] * (weight[t] / total)
            merged[b, slot] = acc
    return merged, assign, centers


# ----------------------------------------------------------------------------------------------
# DynamicViT (before the block, evaluation = physical pruning)
# ----------------------------------------------------------------------------------------------


def dynamicvit_num_keep(num_tokens, num_initial, keep_rate, stage, clc):
    """Kept non-CLS tokens at evaluation.

    clc: int((S - 1) * kr) with S = current non-CLS count (same kr every stage);
    no clc: int(N0 * kr ** (stage + 1)) with N0 = initial non-CLS count (P + num_clr).
    """
    if clc:
        return int((num_tokens - 1) * keep_rate)
    return int(num_initial * keep_rate ** (stage + 1))


def dynamicvit_params(sd, stage):
    pre = f"score_predictor.{stage}."
    return {
        "ln_w": sd[pre + "in_conv.0.weight"],
        "ln_b": sd[pre + "in_conv.0.bias"],
        "in_w": sd[pre + "in_conv.1.weight"],
        "in_b": sd[pre + "in_conv.1.bias"],
        "out0_w": sd[pre + "out_conv.0.weight"],
        "out0_b": sd[pre + "out_conv.0.bias"],
        "out2_w": sd[pre + "out_conv.2.weight"],
        "out2_b": sd[pre + "out_conv.2.bias"],
        "out4_w": sd[pre + "out_conv.4.weight"],
        "out4_b": sd[pre + "out_conv.4.bias"],
    }


def dynamicvit_predict(tokens, decision, params):
    """LN(1e-5) -> Linear -> GELU; local half + decision-weighted global mean of the other half
    (sum(h * m) / sum(m) + 1e-6); Linear -> GELU -> Linear -> GELU -> Linear -> log-softmax."""
    h = layer_norm(tokens, params["ln_w"], params["ln_b"], NEW_MODULE_LN_EPS)
    h = gelu(linear(h, params["in_w"], params["in_b"]))
    b_size, s, c = h.shape
    half = c // 2
    local = h[:, :, :half]
    glob = np.zeros((b_size, 1, c - half))
    for b in range(b_size):
        weighted = (h[b, :, half:] * decision[b][:, None]).sum(axis=0)
        glob[b, 0] = weighted / decision[b].sum() + 1e-6
    z = np.concatenate([local, np.repeat(glob, s, axis=1)], axis=-1)
    z = gelu(linear(z, params["out0_w"], params["out0_b"]))
    z = gelu(linear(z, params["out2_w"], params["out2_b"]))
    z = linear(z, params["out4_w"], params["out4_b"])
    return log_softmax(z, axis=-1)


def dynamicvit_keep(x, decision, params, num_keep):
    """Predict on x[:, 1:], keep the num_keep tokens with the highest keep log-prob (descending).

    decision [B, N-1]: 1 for tokens counted in the predictor's global pooling (0 for cache tokens
    appended at evaluation-time recovery). Returns (x_new [B, 1 + num_keep, D],
    decision_new [B, num_keep], kept int [B, num_keep] input positions, log_probs [B, N-1, 2]).
    """
    log_probs = dynamicvit_predict(x[:, 1:], decision, params)
    score = log_probs[:, :, 0]
    b_size = x.shape[0]
    x_new = np.zeros((b_size, 1 + num_keep, x.shape[2]))
    decision_new = np.zeros((b_size, num_keep))
    kept = np.zeros((b_size, num_keep), dtype=np.int64)
    for b in range(b_size):
        order = np.argsort(-score[b], kind="stable")[:num_keep]
        x_new[b, 0] = x[b, 0]
        for slot, j in enumerate(order):
            x_new[b, slot + 1] = x[b, j + 1]
            decision_new[b, slot] = decision[b, j]
            kept[b, slot] = j + 1
    return x_new, decision_new, kept, log_probs


# ----------------------------------------------------------------------------------------------
# ATS (inside the attention, after the softmax)
# ----------------------------------------------------------------------------------------------


def ats_sample_counts(num_patches, keep_rate, num_stages):
    return [int(keep_rate ** (s + 1) * num_patches) + 1 for s in range(num_stages)]


def ats_quantile_points(k):
    """torch.arange(1/(2K), (2K-1)/(2K), 2/(2K)) in float32: count ceil((end-start)/step) in
    float64, values start + i*step computed in float64 and rounded to float32."""
    start = 1 / (2 * k)
    end = (2 * k - 1) / (2 * k)
    step = 2 / (2 * k)
    count = max(0, math.ceil((end - start) / step))
    return [float(np.float32(start + i * step)) for i in range(count)]


def ats_select(attn_probs, v, mask, k):
    """Adaptive token sampling of the non-CLS tokens.

    significance_j = sum_h attn[h, 0, j] * ||v[h, j]||, normalised by (sum + 1e-6); CDF by
    cumulative sum in token order, +0.1 where mask is False; every quantile point picks the token
    with nearest CDF (first on ties). Returns ids [B, L] = [0, sorted unique picks, 0-padding] and
    new_mask [B, L] (False on padding), L = 1 + max unique count over the batch.
    """
    b_size, _, n, _ = attn_probs.shape
    points = ats_quantile_points(k)
    picks_per_b = []
    for b in range(b_size):
        sig = np.zeros(n - 1)
        for h in range(attn_probs.shape[1]):
            value_norm = np.sqrt((v[b, h, 1:] ** 2).sum(axis=-1))
            sig = sig + attn_probs[b, h, 0, 1:] * value_norm
        normed = sig / (sig.sum() + 1e-6)
        cdf = np.cumsum(normed)
        for j in range(n - 1):
            if not mask[b, j + 1]:
                cdf[j] = cdf[j] + 0.1
        picks = set()
        for t in points:
            picks.add(int(np.argmin(np.abs(cdf - t))) + 1)
        picks_per_b.append(sorted(picks))
    length = 1 + max(len(p) for p in picks_per_b)
    ids = np.zeros((b_size, length), dtype=np.int64)
    new_mask = np.zeros((b_size, length), dtype=bool)
    for b in range(b_size):
        new_mask[b, 0] = True
        for slot, j in enumerate(picks_per_b[b]):
            ids[b, slot + 1] = j
            new_mask[b, slot + 1] = True
    return ids, new_mask


# ----------------------------------------------------------------------------------------------
# SiT token slimming and PatchMerger (before the block)
# ----------------------------------------------------------------------------------------------


def slim_counts(num_patches, keep_rate, num_stages):
    """SiT / PatchMerger output counts K_s = int(P * kr ** (s + 1)) (can be 0)."""
    return [int(num_patches * (keep_rate ** (s + 1))) for s in range(num_stages)]


def sit_slim(tokens, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, scale):
    """logits = fc2(GELU(fc1(LN(tokens)))) [B, S, K]; w = softmax over the S tokens of
    logits * scale, transposed to [B, K, S]; new = w @ tokens."""
    h = layer_norm(tokens, ln_w, ln_b, NEW_MODULE_LN_EPS)
    logits = linear(gelu(linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)
    w = softmax(logits * float(np.reshape(scale, -1)[0]), axis=1).transpose(0, 2, 1)
    return w @ tokens, w


def patchmerger_merge(tokens, ln_w, ln_b, queries):
    """y = LN(tokens) (eps 1e-5); attn = softmax over tokens of queries @ y^T; new = attn @ y."""
    y = layer_norm(tokens, ln_w, ln_b, NEW_MODULE_LN_EPS)
    sim = np.einsum("kd,bsd->bks", queries, y)
    attn = softmax(sim, axis=-1)
    return attn @ y, attn


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


def batch_norm_eval(x, sd, prefix):
    """BatchNorm1d in eval mode on [B, C, L] (per channel C)."""
    mean = sd[prefix + "running_mean"][None, :, None]
    var = sd[prefix + "running_var"][None, :, None]
    w = sd[prefix + "weight"][None, :, None]
    b = sd[prefix + "bias"][None, :, None]
    return (x - mean) / np.sqrt(var + BN_EPS) * w + b


def cla_head(cls_stack, sd):
    """BN(D) -> depthwise Conv1d(D -> k*D, kernel L, stride L, groups D) -> BN(k*D) -> GELU ->
    Conv1d(k*D -> C, 1). Output channel o of the depthwise conv reads input channel o // k."""
    b_size, d, length = cls_stack.shape
    h = batch_norm_eval(cls_stack, sd, "ifa_head.0.0.")
    dw_w = sd["ifa_head.0.1.weight"]  # [k*D, 1, L]
    dw_b = sd["ifa_head.0.1.bias"]
    out_channels = dw_w.shape[0]
    mult = out_channels // d
    conv = np.zeros((b_size, out_channels, 1))
    for o in range(out_channels):
        c_in = o // mult
        conv[:, o, 0] = h[:, c_in, :] @ dw_w[o, 0, :] + dw_b[o]
    h = batch_norm_eval(conv, sd, "ifa_head.0.2.")
    h = gelu(h)[:, :, 0]
    pw_w = sd["ifa_head.0.4.weight"][:, :, 0]  # [C, k*D]
    return linear(h, pw_w, sd["ifa_head.0.4.bias"])


def ifa_head(cls_stack, sd):
    """Linear(L -> 1) over the layer axis -> ReLU -> LayerNorm(D, 1e-5) -> Linear(D -> C)."""
    h = linear(cls_stack, sd["ifa_head.0.0.weight"], sd["ifa_head.0.0.bias"])[:, :, 0]
    h = np.maximum(h, 0.0)
    h = layer_norm(h, sd["ifa_head.0.3.weight"], sd["ifa_head.0.3.bias"], NEW_MODULE_LN_EPS)
    return linear(h, sd["ifa_head.0.4.weight"], sd["ifa_head.0.4.bias"])


# ----------------------------------------------------------------------------------------------
# Full forward
# ----------------------------------------------------------------------------------------------


def _gap(x, curr_num_pool, pool_cls):
    start = 0 if pool_cls else 1
    part = x[:, start:curr_num_pool]
    if part.shape[1] == 0:
        # torch's mean over an empty slice is NaN; the official code produces it when the
        # sequence has collapsed to CLS only (SiT / PatchMerger / ATS at very low keep rates).
        return np.full((x.shape[0], 1, x.shape[2]), np.nan)
    return part.mean(axis=1, keepdims=True)


def _embed(sd, cfg, images):
    b = images.shape[0]
    x = patch_embed(
        images,
        sd["patch_embed.proj.weight"],
        sd.get("patch_embed.proj.bias") if cfg["patch_bias"] else None,
        cfg["patch_size"],
    )
    d = x.shape[2]
    cls = np.broadcast_to(sd["cls_token"].reshape(1, 1, d), (b, 1, d))
    parts_after = []
    if cfg["num_clr"] > 0:
        clr = sd["clr"].reshape(1, cfg["num_clr"], d)
        parts_after.append(np.broadcast_to(clr, (b, cfg["num_clr"], d)))
    pos = sd["pos_embed"].reshape(1, -1, d)
    if cfg["no_embed_class"]:
        x = x + pos  # patches only; CLS and CLR get no position embedding
        x = np.concatenate([cls, x] + parts_after, axis=1)
    else:
        x = np.concatenate([cls, x] + parts_after, axis=1)
        x = x + pos  # [CLS, patches, CLR] all embedded
    if cfg["pre_norm"]:
        x = layer_norm(x, sd["norm_pre.weight"], sd["norm_pre.bias"], cfg["ln_eps"])
    return x


def forward(state_dict, cfg, images, dpcknn_noise=None):
    """Evaluation forward pass; see the module docstring for the meaning of ``info``."""
    cfg = resolve_cfg(cfg)
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in state_dict.items()}
    images = np.asarray(images, dtype=np.float64)
    depth = cfg["depth"]
    method = cfg["method"]
    kr = float(cfg["keep_rate"])
    loc = list(cfg["reduction_loc"])
    rec = recovery_layers(cfg)
    num_clr = int(cfg["num_clr"])
    patch = cfg["patch_size"]
    num_patches = (images.shape[2] // patch) * (images.shape[3] // patch)
    n_stages = len(loc)

    x = _embed(sd, cfg, images)
    b_size = x.shape[0]

    lengths = []
    kept_log = []
    cls_list = []
    cache = []
    if num_clr > 0 and not cfg["pool_clr"]:
        curr_num_pool = x.shape[1] - num_clr
    else:
        curr_num_pool = x.shape[1]

    # method state
    tome_r = tome_merge_counts(num_patches, kr, n_stages)
    tome_sizes = None
    dpc_counts = dpcknn_cluster_counts(num_patches, kr, n_stages)
    dpc_suffix = num_clr
    dyn_decision = np.ones((b_size, x.shape[1] - 1))
    dyn_initial = x.shape[1] - 1
    ats_counts = ats_sample_counts(num_patches, kr, n_stages)
    ats_mask = np.ones((b_size, x.shape[1]), dtype=bool)
    slim = slim_counts(num_patches, kr, n_stages)

    for i in range(depth):
        stage = loc.index(i) if i in loc else None

        # ---- reductions applied to the input of the block ----
        if stage is not None and method == "dpcknn":
            n_total = x.shape[1]
            end = n_total - dpc_suffix
            inner = x[:, 1:end]
            noise = None if dpcknn_noise is None else np.asarray(dpcknn_noise[stage], np.float64)
            merged, assign, centers = dpcknn_cluster(
                inner,
                dpc_counts[stage],
                sd[f"cluster_layers.{stage}.score.weight"],
                sd[f"cluster_layers.{stage}.score.bias"],
                noise=noise,
            )
            x = np.concatenate([x[:, :1], merged, x[:, end:]], axis=1)
            kept_log.append((assign, centers))
        elif stage is not None and method == "dynamicvit":
            num_keep = dynamicvit_num_keep(x.shape[1] - 1, dyn_initial, kr, stage, cfg["clc"])
            x, dyn_decision, kept, _ = dynamicvit_keep(
                x, dyn_decision, dynamicvit_params(sd, stage), num_keep
            )
            kept_log.append(kept)
        elif stage is not None and method == "sit":
            pre = f"cluster_layers.{stage}."
            new, w = sit_slim(
                x[:, 1:],
                sd[pre + "weight.0.weight"],
                sd[pre + "weight.0.bias"],
                sd[pre + "weight.1.weight"],
                sd[pre + "weight.1.bias"],
                sd[pre + "weight.3.weight"],
                sd[pre + "weight.3.bias"],
                sd[pre + "scale"],
            )
            assert new.shape[1] == slim[stage]
            x = np.concatenate([x[:, :1], new], axis=1)
            kept_log.append(w)
        elif stage is not None and method == "patchmerger":
            pre = f"cluster_layers.{stage}."
            new, w = patchmerger_merge(
                x[:, 1:], sd[pre + "norm.weight"], sd[pre + "norm.bias"], sd[pre + "queries"]
            )
            assert new.shape[1] == slim[stage]
            x = np.concatenate([x[:, :1], new], axis=1)
            kept_log.append(w)

        # ---- block: attention ----
        attn_len = x.shape[1]
        key_bias = None
        if method == "tome" and tome_sizes is not None:
            key_bias = np.log(tome_sizes)
        mask = ats_mask if method == "ats" else None
        out, probs, k, v = _block_attention_branch(x, sd, i, cfg, key_bias=key_bias, mask=mask)
        x = x + out

        # ---- reductions between attention and MLP ----
        if stage is not None and method in ("evit", "topk"):
            n = x.shape[1]
            left = evit_num_keep(n, kr)
            if left != n - 1:
                assert left >= 1
                x, kept = evit_reduce(x, probs, left, fuse=(method == "evit"))
                kept_log.append(kept)
            else:
                kept_log.append(None)
        elif stage is not None and method == "tome":
            x, tome_sizes, dest = tome_merge(x, k.mean(axis=1), tome_sizes, tome_r[stage])
            kept_log.append(dest)
        elif stage is not None and method == "ats":
            ids, ats_mask = ats_select(probs, v, ats_mask, ats_counts[stage])
            gathered = np.zeros((b_size, ids.shape[1], x.shape[2]))
            for b in range(b_size):
                for slot in range(ids.shape[1]):
                    gathered[b, slot] = x[b, ids[b, slot]]
            x = gathered
            kept_log.append(ids)

        # ---- block: MLP ----
        mlp_len = x.shape[1]
        x = _block_mlp(x, sd, i, cfg)
        lengths.append((attn_len, mlp_len))

        # ---- cross-layer cache: recovery, then caching ----
        if cfg["clc"] and i in rec:
            curr_num_pool = x.shape[1]
            recovered = np.concatenate(cache, axis=1)
            n_rec = recovered.shape[1]
            x = np.concatenate([x, recovered], axis=1)
            cache = []
            if method == "tome" and tome_sizes is not None:
                tome_sizes = np.concatenate([tome_sizes, np.ones((b_size, n_rec))], axis=1)
            if method == "ats":
                ats_mask = np.concatenate([ats_mask, np.ones((b_size, n_rec), bool)], axis=1)
            if method == "dpcknn":
                dpc_suffix += n_rec
            if method == "dynamicvit":
                dyn_decision = np.concatenate([dyn_decision, np.zeros((b_size, n_rec))], axis=1)
        if cfg["clc"] and i < rec[-1]:
            entry = []
            if cfg["include_gap"]:
                entry.append(_gap(x, curr_num_pool, cfg["pool_cls"]))
            if num_clr > 0:
                entry.append(x[:, -num_clr:].copy())
            cache.append(np.concatenate(entry, axis=1))

        if cfg["head"] != "none" and (i in loc or i == depth - 1):
            cls_list.append(x[:, 0].copy())

    info = {"lengths": lengths, "kept": kept_log, "tokens": x, "cls_stack": None}
    if cfg["head"] == "none":
        h = layer_norm(x[:, 0], sd["norm.weight"], sd["norm.bias"], cfg["ln_eps"])
        logits = linear(h, sd["head.weight"], sd["head.bias"])
    else:
        stack = np.stack(cls_list, axis=-1)  # [B, D, L]
        info["cls_stack"] = stack
        logits = cla_head(stack, sd) if cfg["head"] == "cla" else ifa_head(stack, sd)
    return logits, info


# ----------------------------------------------------------------------------------------------
# Static token schedule
# ----------------------------------------------------------------------------------------------


def token_schedule(cfg, img_size):
    """(attention length, MLP length) per block from the count formulas alone (ATS: bounds)."""
    cfg = resolve_cfg(cfg)
    patch = cfg["patch_size"]
    num_patches = (img_size // patch) ** 2
    method = cfg["method"]
    kr = float(cfg["keep_rate"])
    loc = list(cfg["reduction_loc"])
    rec = recovery_layers(cfg)
    num_clr = int(cfg["num_clr"])
    n_stages = len(loc)
    entry = (1 if cfg["include_gap"] else 0) + num_clr

    n = 1 + num_patches + num_clr
    initial_non_cls = n - 1
    suffix = num_clr
    pending = 0
    tome_r = tome_merge_counts(num_patches, kr, n_stages)
    dpc_counts = dpcknn_cluster_counts(num_patches, kr, n_stages)
    ats_counts = ats_sample_counts(num_patches, kr, n_stages)
    slim = slim_counts(num_patches, kr, n_stages)

    schedule = []
    for i in range(cfg["depth"]):
        stage = loc.index(i) if i in loc else None
        if stage is not None:
            if method == "dpcknn":
                n = 1 + dpc_counts[stage] + suffix
            elif method == "dynamicvit":
                n = 1 + dynamicvit_num_keep(n - 1, initial_non_cls, kr, stage, cfg["clc"])
            elif method in ("sit", "patchmerger"):
                n = 1 + slim[stage]
        attn_len = n
        if stage is not None:
            if method in ("evit", "topk"):
                left = evit_num_keep(n, kr)
                if left != n - 1:
                    n = left + (2 if method == "evit" else 1)
            elif method == "tome":
                n = n - max(0, min(tome_r[stage], (n - 1) // 2))
            elif method == "ats":
                n = 1 + min(len(ats_quantile_points(ats_counts[stage])), n - 1)
        schedule.append((attn_len, n))
        if cfg["clc"] and i in rec:
            n += pending
            suffix += pending
            pending = 0
        if cfg["clc"] and i < rec[-1]:
            pending += entry
    return schedule


# ----------------------------------------------------------------------------------------------
# Random state dict with the official key names
# ----------------------------------------------------------------------------------------------


def official_param_shapes(cfg, img_size):
    """Ordered dict {key: shape} of the official model's state dict for this configuration."""
    cfg = resolve_cfg(cfg)
    d = cfg["embed_dim"]
    p = cfg["patch_size"]
    num_patches = (img_size // p) ** 2
    hidden = int(d * cfg["mlp_ratio"])
    num_clr = int(cfg["num_clr"])
    loc = cfg["reduction_loc"]
    n_stages = len(loc)
    c = cfg["num_classes"]
    shapes = {}
    shapes["cls_token"] = (1, 1, d)
    if cfg["no_embed_class"]:
        shapes["pos_embed"] = (1, num_patches, d)
    else:
        shapes["pos_embed"] = (1, 1 + num_patches + num_clr, d)
    if num_clr > 0:
        shapes["clr"] = (1, num_clr, d)
    shapes["patch_embed.proj.weight"] = (d, 3, p, p)
    if cfg["patch_bias"]:
        shapes["patch_embed.proj.bias"] = (d,)
    if cfg["pre_norm"]:
        shapes["norm_pre.weight"] = (d,)
        shapes["norm_pre.bias"] = (d,)
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        shapes[pre + "norm1.weight"] = (d,)
        shapes[pre + "norm1.bias"] = (d,)
        shapes[pre + "attn.qkv.weight"] = (3 * d, d)
        if cfg["qkv_bias"]:
            shapes[pre + "attn.qkv.bias"] = (3 * d,)
        shapes[pre + "attn.proj.weight"] = (d, d)
        shapes[pre + "attn.proj.bias"] = (d,)
        if cfg["layer_scale"]:
            shapes[pre + "ls1.gamma"] = (d,)
        shapes[pre + "norm2.weight"] = (d,)
        shapes[pre + "norm2.bias"] = (d,)
        shapes[pre + "mlp.fc1.weight"] = (hidden, d)
        shapes[pre + "mlp.fc1.bias"] = (hidden,)
        shapes[pre + "mlp.fc2.weight"] = (d, hidden)
        shapes[pre + "mlp.fc2.bias"] = (d,)
        if cfg["layer_scale"]:
            shapes[pre + "ls2.gamma"] = (d,)
    method = cfg["method"]
    kr = float(cfg["keep_rate"])
    if method == "dpcknn":
        for s in range(n_stages):
            shapes[f"cluster_layers.{s}.score.weight"] = (1, d)
            shapes[f"cluster_layers.{s}.score.bias"] = (1,)
    elif method == "dynamicvit":
        for s in range(n_stages):
            pre = f"score_predictor.{s}."
            shapes[pre + "in_conv.0.weight"] = (d,)
            shapes[pre + "in_conv.0.bias"] = (d,)
            shapes[pre + "in_conv.1.weight"] = (d, d)
            shapes[pre + "in_conv.1.bias"] = (d,)
            shapes[pre + "out_conv.0.weight"] = (d // 2, d)
            shapes[pre + "out_conv.0.bias"] = (d // 2,)
            shapes[pre + "out_conv.2.weight"] = (d // 4, d // 2)
            shapes[pre + "out_conv.2.bias"] = (d // 4,)
            shapes[pre + "out_conv.4.weight"] = (2, d // 4)
            shapes[pre + "out_conv.4.bias"] = (2,)
    elif method == "sit":
        half = int(d * 0.5)
        for s, k in enumerate(slim_counts(num_patches, kr, n_stages)):
            pre = f"cluster_layers.{s}."
            shapes[pre + "scale"] = (1, 1, 1)
            shapes[pre + "weight.0.weight"] = (d,)
            shapes[pre + "weight.0.bias"] = (d,)
            shapes[pre + "weight.1.weight"] = (half, d)
            shapes[pre + "weight.1.bias"] = (half,)
            shapes[pre + "weight.3.weight"] = (k, half)
            shapes[pre + "weight.3.bias"] = (k,)
    elif method == "patchmerger":
        for s, k in enumerate(slim_counts(num_patches, kr, n_stages)):
            pre = f"cluster_layers.{s}."
            shapes[pre + "queries"] = (k, d)
            shapes[pre + "norm.weight"] = (d,)
            shapes[pre + "norm.bias"] = (d,)
    if cfg["head"] == "none":
        shapes["norm.weight"] = (d,)
        shapes["norm.bias"] = (d,)
        shapes["head.weight"] = (c, d)
        shapes["head.bias"] = (c,)
    else:
        # final norm replaced by Identity (no keys); construction-time head kept, unused
        pc = cfg["pretrain_classes"]
        shapes["head.weight"] = (pc, d)
        shapes["head.bias"] = (pc,)
        n_feats = n_stages + 1
        if cfg["head"] == "cla":
            kd = 2 * d
            for name, width in (("ifa_head.0.0.", d), ("ifa_head.0.2.", kd)):
                shapes[name + "weight"] = (width,)
                shapes[name + "bias"] = (width,)
                shapes[name + "running_mean"] = (width,)
                shapes[name + "running_var"] = (width,)
                shapes[name + "num_batches_tracked"] = ()
            shapes["ifa_head.0.1.weight"] = (kd, 1, n_feats)
            shapes["ifa_head.0.1.bias"] = (kd,)
            shapes["ifa_head.0.4.weight"] = (c, kd, 1)
            shapes["ifa_head.0.4.bias"] = (c,)
        else:
            shapes["ifa_head.0.0.weight"] = (1, n_feats)
            shapes["ifa_head.0.0.bias"] = (1,)
            shapes["ifa_head.0.3.weight"] = (d,)
            shapes["ifa_head.0.3.bias"] = (d,)
            shapes["ifa_head.0.4.weight"] = (c, d)
            shapes["ifa_head.0.4.bias"] = (c,)
    return shapes


def _is_norm_affine(key, head):
    """True for LayerNorm / BatchNorm weight and bias entries."""
    norm_prefixes = ["norm.", "norm_pre.", "ifa_head.0.2."]
    if head == "cla":
        norm_prefixes.append("ifa_head.0.0.")
    if head == "ifa":
        norm_prefixes.append("ifa_head.0.3.")
    if any(key.startswith(pfx) for pfx in norm_prefixes):
        return key.endswith((".weight", ".bias"))
    norm_parts = (".norm1.", ".norm2.", ".in_conv.0.", ".weight.0.", ".norm.")
    return any(part in key for part in norm_parts)


def random_official_state_dict(cfg, img_size, seed):
    """Random float32 weights with the official names/shapes, scaled to keep activations O(1)
    and attention non-degenerate (qkv ~ N(0, 1/D) so logits are O(1)). The CLR token is drawn
    independently of the CLS token (the official init copies CLS; trained weights differ)."""
    cfg = resolve_cfg(cfg)
    rng = np.random.default_rng(seed)
    shapes = official_param_shapes(cfg, img_size)
    sd = {}
    for key, shape in shapes.items():
        last = key.rsplit(".", 1)[-1]
        if last == "num_batches_tracked":
            sd[key] = np.array(int(rng.integers(1, 1000)), dtype=np.int64)
            continue
        if key in ("cls_token", "clr"):
            val = rng.normal(0.0, 0.5, shape)
        elif key == "pos_embed":
            val = rng.normal(0.0, 0.1, shape)
        elif last == "running_var":
            val = rng.uniform(0.5, 2.0, shape)
        elif last == "running_mean":
            val = rng.normal(0.0, 0.2, shape)
        elif last == "gamma":
            val = rng.uniform(0.3, 1.0, shape)
        elif last == "queries":
            val = rng.normal(0.0, 0.3, shape)
        elif last == "scale":
            val = rng.uniform(0.5, 1.5, shape)
        elif _is_norm_affine(key, cfg["head"]):
            if last == "weight":
                val = rng.normal(1.0, 0.1, shape)
            else:
                val = rng.normal(0.0, 0.05, shape)
        elif last == "bias":
            val = rng.normal(0.0, 0.02, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            std = 1.0 / math.sqrt(max(fan_in, 1))
            if key.endswith("score.weight"):
                std *= 0.3
            val = rng.normal(0.0, std, shape)
        sd[key] = np.asarray(val, dtype=np.float32)
    return sd
