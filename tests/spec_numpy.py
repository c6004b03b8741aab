"""An independent float64 numpy reference of the DeepSeek-V4 forward pass, written from
``../shared/SPEC.md`` alone (§1 config, §2 forward, §4 checkpoint format, §5 ``exact`` and ``qat``
modes).

It shares no code with ``v4jax``: it reads the released safetensors layout itself, dequantises
FP8 / FP4 weights to float64 and computes the whole prefill with explicit masks (no caches, no
kernels). Slow and memory-hungry by design; meant for small checkpoints in tests.

    cfg, w = load(checkpoint_dir)
    logits, X = forward(cfg, w, tokens)            # [B, S, V], final residual state [B, S, hc, D]
    mtp = mtp_logits(cfg, w, X, next_tokens)       # [B, S, V]
    # mode="qat" in both for §5 qat (the state X passed to mtp_logits from a qat forward)

Readings of points SPEC leaves open (checked against ``golden/tiny`` where it exercises them):
  * a compressed ratio other than 4 behaves as HCA (128): non-overlapping compressor, every
    finished entry ``j < (t+1)//m`` is attended, no indexer;
  * the MoE router weights are normalised to sum 1 for hash layers too;
  * the shared expert uses the same clamped SwiGLU as the routed ones;
  * YaRN is applied on compressed layers unconditionally (not only when a max length exceeds
    ``original_max_position_embeddings``); if ``hi == lo`` the ramp denominator is 1e-3;
  * the per-head query RMS normalisation and every unweighted RMS use ``rms_norm_eps``;
  * the indexer selects ``min(index_topk, #finished entries)`` entries;
  * only MTP block 0 is implemented (SPEC does not say how blocks j > 0 chain);
  * a hash layer whose tid2eid row names one expert in several slots applies it once per slot,
    each with its slot's weight (the same as once with their sum in exact, not in qat: each
    h·weight is quantised on its own; golden/tiny has no such rows, v4jax agrees).

qat (§5), where each fake quantiser sits:
  * (a) "FP8/FP4 linear" = a weight the checkpoint stores as F8_E4M3 or packed FP4 (I8), read
    from the safetensors dtype: wq_a, wq_b, wkv, wo_b, indexer.wq_b, shared experts, MTP
    e_proj / h_proj, and routed experts when stored FP4/FP8. A checkpoint without
    quantization_config (all BF16) or with BF16 routed experts has none for those. wo_a and the
    BF16 linears (compressors' wkv / wgate, weights_proj, gate, head) see unquantised inputs;
    in particular the router and the compressors read the unquantised x.
  * the quantised inputs: x (attention and MoE sub-layer inputs after their norm), qr (for
    wq_b and indexer.wq_b), the concatenated wo_a output [G·o_lora_rank] (for wo_b, blocks of
    128 over the concatenation), each expert's h = silu(a)·b·weight including the routing
    weight (for w2), MTP's enorm(e) and each copy of hnorm(X). Per token, blocks of 128 along
    the feature axis; a last partial block has its own scale.
  * (b) the first hd − rd dims of the window KV and of the compressed entries, blocks of 64,
    after norm (RoPE does not touch them); the quantised KV is both key and value.
  * (c) indexer q per head (after RoPE and Hadamard) and the indexer's compressed keys (after
    the Hadamard), FP4 e2m1 in blocks of 32.
  * rounding is round-to-nearest-even on the float64 value, the same as ml_dtypes'
    float8_e4m3fn / float4_e2m1fn casts of float32 values (ml_dtypes 0.6 casts float64 through
    float32, which would double-round values within a float32 ulp of a midpoint).
  * with power-of-two scales, e4m3 fake quantisation rounds each value to 4 significant bits
    whatever its block's scale, except the values below 2^-6·s (subnormal, |x| ≲ amax/14336): FP8
    block boundaries barely show in the logits; e2m1 ones (subnormal below s, i.e. amax/6) do.
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


class Weights(dict):
    """{tensor name: float64 array}; ``stored[name]`` is the dtype string the checkpoint holds it in."""
    stored: dict[str, str]


def load(checkpoint_dir) -> tuple[dict, Weights]:
    """(config.json as a dict, {tensor name: float64 array (int64 for tid2eid)}), scales folded in."""
    d = Path(checkpoint_dir)
    cfg = json.loads((d / "config.json").read_text())
    files = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
    raw = {}
    for fname in files:
        raw.update(_read_safetensors(d / fname))
    w = Weights()
    w.stored = {name: dtype for name, (dtype, _) in raw.items()}
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
# §5 qat fake quantisation
# ----------------------------------------------------------------------------------------------

_GRIDS = {  # format: (largest value, explicit mantissa bits, smallest normal exponent, amax floor)
    "e4m3": (448.0, 3, -6, 1e-4),
    "e2m1": (6.0, 1, 0, 6 * 2.0 ** -126),
}


def _round_to_grid(x, mant_bits, min_exp):
    """Round-to-nearest-even onto a float grid (|x| within range): spacing 2^(e - mant_bits) for
    2^e <= |x| < 2^(e+1), e >= min_exp (subnormal spacing below). Exact in float64."""
    _, e = np.frexp(x)  # |x| = m·2^e, m in [0.5, 1)  =>  floor(log2|x|) = e - 1
    ulp = np.ldexp(1.0, np.maximum(e - 1, min_exp) - mant_bits)
    return np.round(x / ulp) * ulp  # np.round: half to even; x / ulp is exact


def _pow2_ceil(y):
    """2^ceil(log2(y)) for y > 0, exactly."""
    m, e = np.frexp(y)
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


# Two correct implementations may round a value that lies within float error of a rounding
# midpoint to different neighbours. A test can watch and override the rounding (to tell such
# near-ties from real differences): ROUNDING_HOOK(site, fmt, v, q) receives the scaled values
# v [..., blocks, block] of the quantiser named ``site`` and their rounding q, and returns q.
ROUNDING_HOOK = None


def fake_quant(x, block, fmt, site=None):
    """Per-token block fake quantisation along the last axis (§5): per block of ``block`` features
    s = 2^ceil(log2(max(amax, floor) / top)), x̂ = grid(clip(x/s, ±top))·s."""
    top, mant_bits, min_exp, floor = _GRIDS[fmt]
    n = x.shape[-1]
    nb = -(-n // block)
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)]).reshape(*x.shape[:-1], nb, block)
    s = _pow2_ceil(np.maximum(np.abs(xb).max(-1, keepdims=True), floor) / top)
    v = np.clip(xb / s, -top, top)
    q = _round_to_grid(v, mant_bits, min_exp)
    if ROUNDING_HOOK is not None:
        q = ROUNDING_HOOK(site, fmt, v, q)
    return (q * s).reshape(*x.shape[:-1], nb * block)[..., :n]


def _linear(w, name, x, qat, site=None):
    """x @ W^T; in qat the input of a linear stored in FP8 / FP4 is fake-quantised (§5a).
    ``site`` names the input (default: the weight) when several linears share it."""
    if qat and getattr(w, "stored", {}).get(name) in ("F8_E4M3", "I8"):
        x = fake_quant(x, 128, "e4m3", site or name)
    return x @ w[name].T


def _quant_kv(kv, rd, qat, site):
    """§5b: the non-RoPE dims of main-KV vectors, FP8 in blocks of 64."""
    if not qat:
        return kv
    return np.concatenate([fake_quant(kv[..., :-rd], 64, "e4m3", site), kv[..., -rd:]], -1)


def _quant_fp4(x, qat, site):
    """§5c: indexer queries / keys after the Hadamard, FP4 in blocks of 32."""
    return fake_quant(x, 32, "e2m1", site) if qat else x


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


def _indexer_select(cfg, w, p, x, qr, freqs, qat):
    """Lightning indexer: bool [B, S, S//4], True for the top index_topk finished entries."""
    B, S, _ = x.shape
    IH, ID = cfg["index_n_heads"], cfg["index_head_dim"]
    Hd = _hadamard(ID)
    pos = np.arange(S)
    qI = _linear(w, f"{p}indexer.wq_b.weight", qr, qat, site=f"{p}qr").reshape(B, S, IH, ID)
    qI = _quant_fp4(_rope(qI, (pos[:, None] * freqs)[:, None, :]) @ Hd, qat, f"{p}indexer.q")
    kI = _quant_fp4(_compress(cfg, w, f"{p}indexer.compressor.", x, 4, ID, freqs) @ Hd, qat, f"{p}indexer.compressor")
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

def _attention(cfg, w, p, x, ratio, qat):
    B, S, D = x.shape
    H, hd, G, rd = cfg["num_attention_heads"], cfg["head_dim"], cfg["o_groups"], cfg["qk_rope_head_dim"]
    eps, win = cfg["rms_norm_eps"], cfg["sliding_window"]
    freqs = _rope_freqs(cfg, ratio > 0)
    pos = np.arange(S)
    ang = pos[:, None] * freqs  # [S, rd/2]
    qr = _rms(_linear(w, f"{p}wq_a.weight", x, qat, site=f"{p}x"), w[f"{p}q_norm.weight"], eps)
    q = _rms(_linear(w, f"{p}wq_b.weight", qr, qat, site=f"{p}qr").reshape(B, S, H, hd), None, eps)
    q = _rope(q, ang[:, None, :])
    kv = _linear(w, f"{p}wkv.weight", x, qat, site=f"{p}x")
    kv = _quant_kv(_rope(_rms(kv, w[f"{p}kv_norm.weight"], eps), ang), rd, qat, f"{p}kv")  # [B,S,hd]

    # keys: the window of raw KV, then the compressed entries
    keys = kv
    win_mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - win)  # [t, s]
    mask = np.broadcast_to(win_mask, (B, S, S))
    if ratio > 0:
        ckv = _compress(cfg, w, f"{p}compressor.", x, ratio, hd, freqs)  # [B, S//ratio, hd]
        ckv = _quant_kv(ckv, rd, qat, f"{p}compressor")
        if ratio == 4:
            cmask = _indexer_select(cfg, w, p, x, qr, freqs, qat)
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
    z = np.einsum("bsgi,gri->bsgr", o, wo_a).reshape(B, S, -1)  # wo_a: never activation-quantised
    return _linear(w, f"{p}wo_b.weight", z, qat)


# ---- MoE (§2 "MoE") -------------------------------------------------------------------------

def _swiglu_hidden(cfg, w, p, x, qat, x_site):
    """silu(a)·b with a = min(w1 x, limit), b = clip(w3 x, ±limit); the expert's weight and w2 follow."""
    lim = cfg["swiglu_limit"]
    a = np.minimum(_linear(w, f"{p}w1.weight", x, qat, site=x_site), lim)
    b = np.clip(_linear(w, f"{p}w3.weight", x, qat, site=x_site), -lim, lim)
    return a * _sigmoid(a) * b


def _moe(cfg, w, p, x, tokens, hashed, qat):
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
        pe, slots = f"{p}experts.{e}.", [j for j in range(k) if np.any(idx[..., j] == e)]
        h = _swiglu_hidden(cfg, w, pe, x, qat, f"{p}x") if slots else None
        for j in slots:  # one application per routing slot (tid2eid may name an expert twice)
            we = np.where(idx[..., j] == e, gw[..., j], 0.0)[..., None]  # [B,S,1]
            out += _linear(w, f"{pe}w2.weight", h * we, qat, site=f"{pe}h{j}")
    if f"{p}shared_experts.w1.weight" in w:
        h = _swiglu_hidden(cfg, w, f"{p}shared_experts.", x, qat, f"{p}x")
        out += _linear(w, f"{p}shared_experts.w2.weight", h, qat)
    return out


def _block(cfg, w, p, X, ratio, qat, tokens=None, hashed=False):
    X = _hc_sublayer(cfg, w, p, "attn", "attn_norm", X, lambda x: _attention(cfg, w, f"{p}attn.", x, ratio, qat))
    return _hc_sublayer(cfg, w, p, "ffn", "ffn_norm", X, lambda x: _moe(cfg, w, f"{p}ffn.", x, tokens, hashed, qat))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def _is_qat(mode):
    assert mode in ("exact", "qat"), mode
    return mode == "qat"


def forward(cfg, w, tokens, return_layers=False, mode="exact"):
    """Prefill of tokens [B, S] at positions 0..S-1 -> (logits [B,S,V], final state X [B,S,hc,D])
    (and the state after every block, [L,B,S,hc,D], with return_layers); mode "exact" or "qat"."""
    tokens, qat = np.asarray(tokens), _is_qat(mode)
    X = np.repeat(w["embed.weight"][tokens][:, :, None, :], cfg["hc_mult"], axis=2)
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        X = _block(cfg, w, f"layers.{i}.", X, cfg["compress_ratios"][i], qat, tokens, i < cfg["num_hash_layers"])
        layers.append(X)
    logits = _head(cfg, w, "", X)
    return (logits, X, np.stack(layers)) if return_layers else (logits, X)


def mtp_logits(cfg, w, final_state, next_tokens, mode="exact"):
    """MTP block 0 on the main model's final state and the next tokens [B, S] -> logits [B,S,V]."""
    p, eps, qat = "mtp.0.", cfg["rms_norm_eps"], _is_qat(mode)
    e = _rms(w["embed.weight"][np.asarray(next_tokens)], w[f"{p}enorm.weight"], eps)
    x = _rms(final_state, w[f"{p}hnorm.weight"], eps)  # per copy
    X = _linear(w, f"{p}e_proj.weight", e, qat)[:, :, None, :] + _linear(w, f"{p}h_proj.weight", x, qat)
    X = _block(cfg, w, p, X, cfg["compress_ratios"][cfg["num_hidden_layers"]], qat)
    return _head(cfg, w, p, X)
