"""An independent float64 numpy reference of the DeepSeek-V4 forward pass, written from
``../shared/SPEC.md`` alone (§1 config, §2 forward, §4 checkpoint format, §5 ``exact`` mode).

It shares no code with ``v4jax``: it reads the released safetensors layout itself, dequantises
FP8 / FP4 weights to float64 and computes the whole prefill with explicit masks (no caches, no
kernels). Slow and memory-hungry by design; meant for small checkpoints in tests.

    cfg, w = load(checkpoint_dir)
    logits, X = forward(cfg, w, tokens)            # [B, S, V], final residual state [B, S, hc, D]
    mtp = mtp_logits(cfg, w, X, next_tokens)       # [B, S, V]

Readings of points SPEC leaves open (checked against ``golden/tiny`` where it exercises them):
  * a compressed ratio other than 4 behaves as HCA (128): non-overlapping compressor, every
    finished entry ``j < (t+1)//m`` is attended, no indexer;
  * the MoE router weights are normalised to sum 1 for hash layers too;
  * the shared expert uses the same clamped SwiGLU as the routed ones;
  * YaRN is applied on compressed layers unconditionally (not only when a max length exceeds
    ``original_max_position_embeddings``); if ``hi == lo`` the ramp denominator is 1e-3;
  * the per-head query RMS normalisation and every unweighted RMS use ``rms_norm_eps``;
  * the indexer selects ``min(index_topk, #finished entries)`` entries;
  * only MTP block 0 is implemented (SPEC does not say how blocks j > 0 chain).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# ----------------------------------------------------------------------------------------------
# §4 checkpoint format
# ----------------------------------------------------------------------------------------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": np.uint8, "I8": np.uint8, "U8": np.uint8,
           "I32": np.int32, "I64": np.int64}
_FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float64)  # e2m1 magnitudes, code bits 0-2


def _read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``{name: (dtype string, raw array)}``: 8-byte LE header length, JSON header, data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, np.uint8, "r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = np.asarray(data[a:b]).view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = (info["dtype"], raw)
    return out


def _e8m0(b: np.ndarray) -> np.ndarray:
    """E8M0 byte b means 2^(b-127)."""
    return np.exp2(b.astype(np.float64) - 127.0)


def _dequant(dtype: str, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if dtype == "F8_E4M3":  # 128x128 blocks: w = q * s[o//128, i//128]
        s = np.repeat(np.repeat(_e8m0(scale), 128, 0), 128, 1)[:q.shape[0], :q.shape[1]]
        return q.astype(np.float64) * s
    if dtype == "I8":  # packed FP4 e2m1, low nibble = even column; scale per 32 inputs
        codes = np.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1)
        v = _FP4_VALUES[codes & 7] * np.where(codes & 8, -1.0, 1.0)
        return v * np.repeat(_e8m0(scale), 32, 1)[:, :v.shape[1]]
    raise ValueError(f"no dequantisation for {dtype}")


def load(checkpoint_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: float64 array (int64 for tid2eid)}), scales folded in."""
    d = Path(checkpoint_dir)
    cfg = json.loads((d / "config.json").read_text())
    files = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
    raw = {}
    for fname in files:
        raw.update(_read_safetensors(d / fname))
    w = {}
    for name, (dtype, arr) in raw.items():
        if name.endswith(".scale") and name[:-6] + ".weight" in raw:
            continue  # folded into its weight
        scale = raw.get(name[:-7] + ".scale") if name.endswith(".weight") else None
        if scale is not None:
            w[name] = _dequant(dtype, arr, scale[1])
        elif dtype in ("I64", "I32"):
            w[name] = arr.astype(np.int64)
        else:
            w[name] = arr.astype(np.float64)
    return cfg, w


# ----------------------------------------------------------------------------------------------
# §2 building blocks
# ----------------------------------------------------------------------------------------------

def _rms(x, weight, eps):
    """RMS(x) = x * rsqrt(mean(x^2) + eps), times the weight (None: no weight)."""
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return y if weight is None else y * weight


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def _rope_freqs(cfg, compressed: bool) -> np.ndarray:
    """§2 RoPE: f_i = theta^(-2i/rd), i < rd/2; compressed layers: compress_rope_theta + YaRN."""
    rd = cfg["qk_rope_head_dim"]
    theta = float(cfg["compress_rope_theta"] if compressed else cfg["rope_theta"])
    f = theta ** (-2.0 * np.arange(rd // 2) / rd)
    ys = cfg.get("rope_scaling")
    if compressed and ys:
        L0 = ys["original_max_position_embeddings"]

        def corr(n):  # d(n) = rd * ln(L0 / (2 pi n)) / (2 ln theta)
            return rd * np.log(L0 / (2 * np.pi * n)) / (2 * np.log(theta))

        lo = max(np.floor(corr(ys["beta_fast"])), 0)
        hi = min(np.ceil(corr(ys["beta_slow"])), rd - 1)
        r = np.clip((np.arange(rd // 2) - lo) / (hi - lo if hi != lo else 1e-3), 0, 1)
        f = f / ys["factor"] * r + f * (1 - r)
    return f


def _rope(x, ang, inverse=False):
    """Rotate the last rd dims of x as interleaved pairs (2i, 2i+1); ang: [..., rd/2] broadcastable."""
    rd = 2 * ang.shape[-1]
    pairs = x[..., -rd:].reshape(*x.shape[:-1], rd // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = np.cos(ang), np.sin(ang) * (-1 if inverse else 1)
    rot = np.stack([a * c - b * s, a * s + b * c], -1).reshape(*x.shape[:-1], rd)
    return np.concatenate([x[..., :-rd], rot], -1)


def _hadamard(d):
    """Normalised Walsh-Hadamard matrix (Sylvester order), scale d^-0.5."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    assert h.shape[0] == d, f"Hadamard size {d} is not a power of two"
    return h / np.sqrt(d)


# ---- mHC (§2 "Embedding and hyper-connections") ----------------------------------------------

def _hc_mix(cfg, X, fn, base, scale):
    """X [B,S,hc,D] -> pre [B,S,hc], post [B,S,hc], C [B,S,hc(source i),hc(target j)]."""
    B, S, hc, D = X.shape
    eps = cfg["hc_eps"]
    x = X.reshape(B, S, hc * D)
    m = (x @ fn.T) / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg["rms_norm_eps"])
    pre = _sigmoid(m[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * _sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    C = (m[..., 2 * hc:] * scale[2] + base[2 * hc:]).reshape(B, S, hc, hc)
    C = _softmax(C, -1) + eps
    C = C / (C.sum(-2, keepdims=True) + eps)  # column sums (over sources i)
    for _ in range(cfg["hc_sinkhorn_iters"] - 1):
        C = C / (C.sum(-1, keepdims=True) + eps)
        C = C / (C.sum(-2, keepdims=True) + eps)
    return pre, post, C


def _hc_sublayer(cfg, w, p, which, norm_name, X, fn):
    """One mHC-wrapped sub-layer: u = sum_i pre_i X_i; y = fn(norm(u)); X'_j = post_j y + sum_i C_ij X_i."""
    pre, post, C = _hc_mix(cfg, X, w[f"{p}hc_{which}_fn"], w[f"{p}hc_{which}_base"], w[f"{p}hc_{which}_scale"])
    u = np.einsum("bsi,bsid->bsd", pre, X)
    y = fn(_rms(u, w[f"{p}{norm_name}.weight"], cfg["rms_norm_eps"]))
    return post[..., None] * y[:, :, None, :] + np.einsum("bsij,bsid->bsjd", C, X)


def _head(cfg, w, p, X):
    """hc_head reduction, final norm, logits = norm(u) @ head^T."""
    B, S, hc, D = X.shape
    x = X.reshape(B, S, hc * D)
    m = (x @ w[f"{p}hc_head_fn"].T) / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg["rms_norm_eps"])
    pre = _sigmoid(m * w[f"{p}hc_head_scale"][0] + w[f"{p}hc_head_base"]) + cfg["hc_eps"]
    u = np.einsum("bsi,bsid->bsd", pre, X)
    return _rms(u, w[f"{p}norm.weight"], cfg["rms_norm_eps"]) @ w["head.weight"].T


# ---- Compressor and lightning indexer (§2) -----------------------------------------------------

def _compress(cfg, w, p, x, m, d, freqs):
    """Gated pooling of x [B,S,D] into entries [B, S//m, d] (only finished blocks), normed, RoPE'd."""
    B, S, _ = x.shape
    n = S // m
    k = x @ w[f"{p}wkv.weight"].T
    s = x @ w[f"{p}wgate.weight"].T + w[f"{p}ape"][np.arange(S) % m]
    k = k[:, :n * m].reshape(B, n, m, k.shape[-1])
    s = s[:, :n * m].reshape(B, n, m, s.shape[-1])
    if m == 4:  # overlapping: block j-1 with half A, block j with half B (block 0: no previous)
        kA, sA, kB, sB = k[..., :d], s[..., :d], k[..., d:], s[..., d:]
        prev_k = np.concatenate([np.zeros_like(kA[:, :1]), kA[:, :-1]], 1)
        prev_s = np.concatenate([np.full_like(sA[:, :1], -np.inf), sA[:, :-1]], 1)
        k, s = np.concatenate([prev_k, kB], 2), np.concatenate([prev_s, sB], 2)
    e = np.sum(_softmax(s, 2) * k, axis=2)  # softmax over the token axis, per feature
    e = _rms(e, w[f"{p}norm.weight"], cfg["rms_norm_eps"])
    return _rope(e, (np.arange(n) * m)[:, None] * freqs)


def _indexer_select(cfg, w, p, x, qr, freqs):
    """Lightning indexer: bool [B, S, S//4], True for the top index_topk finished entries."""
    B, S, _ = x.shape
    IH, ID = cfg["index_n_heads"], cfg["index_head_dim"]
    Hd = _hadamard(ID)
    pos = np.arange(S)
    qI = (qr @ w[f"{p}indexer.wq_b.weight"].T).reshape(B, S, IH, ID)
    qI = _rope(qI, (pos[:, None] * freqs)[:, None, :]) @ Hd
    kI = _compress(cfg, w, f"{p}indexer.compressor.", x, 4, ID, freqs) @ Hd
    wts = (x @ w[f"{p}indexer.weights_proj.weight"].T) * ID ** -0.5 * IH ** -0.5
    score = np.einsum("bsh,bshj->bsj", wts, np.maximum(np.einsum("bshd,bjd->bshj", qI, kI), 0))
    n = S // 4
    valid = np.arange(n)[None, :] < ((pos + 1) // 4)[:, None]  # [S, n]
    score = np.where(valid, score, -np.inf)
    sel = np.zeros((B, S, n), bool)
    order = np.argsort(-score, axis=-1, kind="stable")
    for t in range(S):
        kk = min(cfg["index_topk"], int(valid[t].sum()))
        for b in range(B):
            sel[b, t, order[b, t, :kk]] = True
    return sel


# ---- Attention (§2 "Attention (every layer)") --------------------------------------------------

def _attention(cfg, w, p, x, ratio):
    B, S, D = x.shape
    H, hd, G = cfg["num_attention_heads"], cfg["head_dim"], cfg["o_groups"]
    eps, win = cfg["rms_norm_eps"], cfg["sliding_window"]
    freqs = _rope_freqs(cfg, ratio > 0)
    pos = np.arange(S)
    ang = pos[:, None] * freqs  # [S, rd/2]
    qr = _rms(x @ w[f"{p}wq_a.weight"].T, w[f"{p}q_norm.weight"], eps)
    q = _rms((qr @ w[f"{p}wq_b.weight"].T).reshape(B, S, H, hd), None, eps)
    q = _rope(q, ang[:, None, :])
    kv = _rope(_rms(x @ w[f"{p}wkv.weight"].T, w[f"{p}kv_norm.weight"], eps), ang)  # [B,S,hd]

    # keys: the window of raw KV, then the compressed entries
    keys = kv
    win_mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - win)  # [t, s]
    mask = np.broadcast_to(win_mask, (B, S, S))
    if ratio > 0:
        ckv = _compress(cfg, w, f"{p}compressor.", x, ratio, hd, freqs)  # [B, S//ratio, hd]
        if ratio == 4:
            cmask = _indexer_select(cfg, w, p, x, qr, freqs)
        else:
            n = S // ratio
            cmask = np.broadcast_to(np.arange(n)[None, :] < ((pos + 1) // ratio)[:, None], (B, S, n))
        keys = np.concatenate([kv, ckv], 1)
        mask = np.concatenate([mask, cmask], 2)

    scores = np.einsum("bshd,bkd->bhsk", q, keys) * hd ** -0.5
    scores = np.where(mask[:, None], scores, -np.inf)
    sink = w[f"{p}attn_sink"][None, :, None, None]
    mx = np.maximum(scores.max(-1, keepdims=True), sink)
    e = np.exp(scores - mx)
    prob = e / (e.sum(-1, keepdims=True) + np.exp(sink - mx))  # the sink adds to the denominator only
    o = np.einsum("bhsk,bkd->bshd", prob, keys)
    o = _rope(o, ang[:, None, :], inverse=True)  # de-rotate at the query position

    o = o.reshape(B, S, G, H * hd // G)
    wo_a = w[f"{p}wo_a.weight"]
    wo_a = wo_a.reshape(G, wo_a.shape[0] // G, H * hd // G)  # group-major
    z = np.einsum("bsgi,gri->bsgr", o, wo_a).reshape(B, S, -1)
    return z @ w[f"{p}wo_b.weight"].T


# ---- MoE (§2 "MoE") -------------------------------------------------------------------------

def _swiglu(cfg, w, p, x, weight):
    lim = cfg["swiglu_limit"]
    a = np.minimum(x @ w[f"{p}w1.weight"].T, lim)
    b = np.clip(x @ w[f"{p}w3.weight"].T, -lim, lim)
    return (a * _sigmoid(a) * b * weight) @ w[f"{p}w2.weight"].T


def _moe(cfg, w, p, x, tokens, hashed):
    g = np.sqrt(np.logaddexp(0, x @ w[f"{p}gate.weight"].T))  # sqrt(softplus), [B,S,E]
    k = cfg["num_experts_per_tok"]
    if hashed:
        idx = w[f"{p}gate.tid2eid"][tokens]
    else:
        idx = np.argsort(-(g + w[f"{p}gate.bias"]), axis=-1, kind="stable")[..., :k]
    gw = np.take_along_axis(g, idx, -1)
    gw = gw / gw.sum(-1, keepdims=True) * cfg["routed_scaling_factor"]
    out = np.zeros_like(x)
    for e in range(cfg["n_routed_experts"]):
        we = np.sum(np.where(idx == e, gw, 0.0), -1)  # [B,S]
        if np.any(we != 0):
            out += _swiglu(cfg, w, f"{p}experts.{e}.", x, we[..., None])
    if f"{p}shared_experts.w1.weight" in w:
        out += _swiglu(cfg, w, f"{p}shared_experts.", x, 1.0)
    return out


def _block(cfg, w, p, X, ratio, tokens=None, hashed=False):
    X = _hc_sublayer(cfg, w, p, "attn", "attn_norm", X, lambda x: _attention(cfg, w, f"{p}attn.", x, ratio))
    return _hc_sublayer(cfg, w, p, "ffn", "ffn_norm", X, lambda x: _moe(cfg, w, f"{p}ffn.", x, tokens, hashed))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def forward(cfg, w, tokens, return_layers=False):
    """Prefill of tokens [B, S] at positions 0..S-1 -> (logits [B,S,V], final state X [B,S,hc,D])
    (and the state after every block, [L,B,S,hc,D], with return_layers)."""
    tokens = np.asarray(tokens)
    X = np.repeat(w["embed.weight"][tokens][:, :, None, :], cfg["hc_mult"], axis=2)
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        X = _block(cfg, w, f"layers.{i}.", X, cfg["compress_ratios"][i], tokens, i < cfg["num_hash_layers"])
        layers.append(X)
    logits = _head(cfg, w, "", X)
    return (logits, X, np.stack(layers)) if return_layers else (logits, X)


def mtp_logits(cfg, w, final_state, next_tokens):
    """MTP block 0 on the main model's final state and the next tokens [B, S] -> logits [B,S,V]."""
    p, eps = "mtp.0.", cfg["rms_norm_eps"]
    e = _rms(w["embed.weight"][np.asarray(next_tokens)], w[f"{p}enorm.weight"], eps)
    x = _rms(final_state, w[f"{p}hnorm.weight"], eps)
    X = (e @ w[f"{p}e_proj.weight"].T)[:, :, None, :] + x @ w[f"{p}h_proj.weight"].T
    X = _block(cfg, w, p, X, cfg["compress_ratios"][cfg["num_hidden_layers"]])
    return _head(cfg, w, p, X)
