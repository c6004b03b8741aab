"""Plain-JAX definitions of the V4 attention primitives and the experts' grouped matmul (the
executable spec for the kernels).

All functions share one key/value stream per batch row (MQA: one KV head of width D used as both
key and value) and a per-head attention sink that adds ``exp(sink[h])`` to the softmax denominator
only. Scores and softmax statistics are float32 whatever the input dtype; outputs have q's dtype.

Shapes (B batch, S queries, H heads, D head width, T raw positions, N compressed entries):
  q    [B, S, H, D]  queries at positions q_start ... q_start + S - 1
  kv   [B, T, D]     raw per-position key/values, kv[:, i] at position kv_start + i, covering
                     max(0, q_start - window + 1) ... q_start + S - 1
  ckv  [B, N, D]     compressed entries
  sink [H]           float32 sink logits
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -jnp.inf
FP4_BLOCK = 32  # dims per scale of FP4 indexer keys (SPEC §5c)
FP8_BLOCK = 64  # dims per scale of FP8 compressed entries (SPEC §5b)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 e2m1 magnitudes by code & 7


class Fp4Keys(NamedTuple):
    """Indexer keys ``[B, N, ID]`` in FP4 (SPEC §5c): e2m1 codes, two per byte (low nibble = even
    dim; bit 3 of a code is the sign), and one power-of-two scale ``2^e`` per 32 dims. A partial
    last block is zero-padded. ``dequant_fp4_keys`` gives the values."""
    packed: jax.Array  # uint8 [B, N, ceil(ID/32)·16]
    exps: jax.Array    # int8 [B, N, ceil(ID/32)], e in [-126, 126]


class Fp8Entries(NamedTuple):
    """Compressed entries ``[B, N, D]`` in FP8 (SPEC §5b): the first ``D - rd`` dims as e4m3 codes
    with one power-of-two scale ``2^e`` per 64 dims, the last ``rd`` (RoPE) dims as they are.
    ``dequant_fp8_entries`` gives the values; the attention functions take either form."""
    codes: jax.Array  # float8_e4m3fn [B, N, D - rd]
    exps: jax.Array   # int8 [B, N, ceil((D - rd) / 64)]
    rope: jax.Array   # [B, N, rd], float32 or bfloat16


def dequant_fp8_entries(entries: Fp8Entries, dtype):
    """``Fp8Entries`` -> ``[B, N, D]`` in ``dtype`` (exact for float32 and bfloat16)."""
    n = entries.codes.shape[-1]
    scale = jnp.repeat(jnp.ldexp(jnp.float32(1.0), entries.exps.astype(jnp.int32)), FP8_BLOCK, axis=-1)[..., :n]
    return jnp.concatenate([(entries.codes.astype(jnp.float32) * scale).astype(dtype),
                            entries.rope.astype(dtype)], axis=-1)


def dequant_fp4_keys(keys: Fp4Keys, dim: int, dtype):
    """``Fp4Keys`` -> ``[B, N, dim]`` keys in ``dtype`` (exact for float32 and bfloat16)."""
    b = keys.packed.astype(jnp.int32)
    codes = jnp.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    mag = jnp.asarray(_E2M1, jnp.float32)[codes & 7]
    scale = jnp.repeat(jnp.ldexp(jnp.float32(1.0), keys.exps.astype(jnp.int32)), FP4_BLOCK, axis=-1)
    return (jnp.where(codes >= 8, -mag, mag) * scale)[..., :dim].astype(dtype)


def _precision(dtype):
    # float32 inputs (or mixed, which compute in float32): true fp32 products (no TF32 / bf16
    # passes on GPU or TPU).
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _window(kv, q_start, S, window, kv_start=0):
    """Gather the window keys of every query: ([B, S, W, D], valid [S, W])."""
    t = q_start + jnp.arange(S)[:, None]
    p = t - window + 1 + jnp.arange(window)[None, :]  # [S, W]
    valid = (p >= 0) & (p >= kv_start)
    return jnp.take(kv, jnp.maximum(p - kv_start, 0), axis=1), valid


def _softmax_with_sink(scores, values, sink):
    """scores [B,S,H,K] f32 (-inf = masked), values [B,S,K,D] -> [B,S,H,D] f32."""
    m = jnp.maximum(jnp.max(scores, axis=-1), sink[None, None, :])  # sink is always finite
    p = jnp.exp(scores - m[..., None])
    denom = jnp.sum(p, axis=-1) + jnp.exp(sink[None, None, :] - m)
    o = jnp.einsum("bshk,bskd->bshd", p, values.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return o / denom[..., None]


def _scores(q, k, scale, precision):
    return jnp.einsum("bshd,bskd->bshk", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale


def sparse_attention(q, kv, ckv, topk_idx, sink, *, window: int, scale: float, q_start=0, kv_start=0):
    """CSA: window keys plus the compressed entries named by ``topk_idx [B, S, K]`` (-1 = unused; so
    is any index outside 0 ... N-1). An entry named k times in a row counts k times."""
    N = ckv.shape[1]
    if N == 0:  # no compressed entries yet: every top-k slot is unused
        return window_attention(q, kv, sink, window=window, scale=scale, q_start=q_start, kv_start=kv_start)
    B, S, H, D = q.shape
    prec = _precision(jnp.result_type(q, kv, ckv))
    kw, wvalid = _window(kv, q_start, S, window, kv_start)  # [B,S,W,D]
    used = (topk_idx >= 0) & (topk_idx < N)
    kc = jax.vmap(lambda c, i: jnp.take(c, i, axis=0))(ckv, jnp.where(used, topk_idx, 0))  # [B,S,K,D]
    s_w = jnp.where(wvalid[None, :, None, :], _scores(q, kw, scale, prec), _NEG)
    s_c = jnp.where(used[:, :, None, :], _scores(q, kc, scale, prec), _NEG)
    o = _softmax_with_sink(jnp.concatenate([s_w, s_c], -1), jnp.concatenate([kw, kc], 2),
                           sink.astype(jnp.float32))
    return o.astype(q.dtype)


def compressed_attention(q, kv, ckv, sink, *, window: int, ratio: int, scale: float, q_start=0, kv_start=0):
    """HCA: window keys plus every compressed entry ``j < (t + 1) // ratio`` of query position t."""
    B, S, H, D = q.shape
    N = ckv.shape[1]
    prec = _precision(jnp.result_type(q, kv, ckv))
    kw, wvalid = _window(kv, q_start, S, window, kv_start)
    t = q_start + jnp.arange(S)
    cvalid = jnp.arange(N)[None, :] < ((t + 1) // ratio)[:, None]  # [S, N]
    s_w = jnp.where(wvalid[None, :, None, :], _scores(q, kw, scale, prec), _NEG)
    s_c = jnp.einsum("bshd,bnd->bshn", q, ckv, precision=prec, preferred_element_type=jnp.float32) * scale
    s_c = jnp.where(cvalid[None, :, None, :], s_c, _NEG)
    m = jnp.maximum(jnp.maximum(s_w.max(-1), s_c.max(-1, initial=_NEG)), sink[None, None, :])
    p_w, p_c = jnp.exp(s_w - m[..., None]), jnp.exp(s_c - m[..., None])
    denom = p_w.sum(-1) + p_c.sum(-1) + jnp.exp(sink[None, None, :] - m)
    hi = jax.lax.Precision.HIGHEST
    o = (jnp.einsum("bshk,bskd->bshd", p_w, kw.astype(jnp.float32), precision=hi)
         + jnp.einsum("bshn,bnd->bshd", p_c, ckv.astype(jnp.float32), precision=hi))
    return (o / denom[..., None]).astype(q.dtype)


def window_attention(q, kv, sink, *, window: int, scale: float, q_start=0, kv_start=0):
    """Window-only layers (compress ratio 0)."""
    B, S, H, D = q.shape
    prec = _precision(jnp.result_type(q, kv))
    kw, wvalid = _window(kv, q_start, S, window, kv_start)
    s_w = jnp.where(wvalid[None, :, None, :], _scores(q, kw, scale, prec), _NEG)
    return _softmax_with_sink(s_w, kw, sink.astype(jnp.float32)).astype(q.dtype)


def decode_attention(q, keys, valid, sink, *, scale: float):
    """One query position per row against an explicit key set (decode step).

    q [B, H, D]; keys [B, K, D] (ring-buffer window rows followed by compressed entries);
    valid [B, K] bool; returns [B, H, D] in q's dtype.
    """
    prec = _precision(jnp.result_type(q, keys))
    s = jnp.einsum("bhd,bkd->bhk", q, keys, precision=prec, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[:, None, :], s, _NEG)
    sink = sink.astype(jnp.float32)
    m = jnp.maximum(s.max(-1), sink[None, :])
    p = jnp.exp(s - m[..., None])
    denom = p.sum(-1) + jnp.exp(sink[None, :] - m)
    o = jnp.einsum("bhk,bkd->bhd", p, keys.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (o / denom[..., None]).astype(q.dtype)


def indexer_scores(q, w, k, *, ratio: int = 4, q_start=0):
    """Lightning-indexer scores ``[B, S, N]`` float32, -inf where ``j >= (t + 1) // ratio``.

    q [B, S, IH, ID] indexer queries, w [B, S, IH] head weights, k [B, N, ID] compressed indexer
    keys (or ``Fp4Keys``, used as their values in q's dtype):
    ``score[t, j] = Σ_h w[t, h] · relu(q[t, h] · k[j])``.
    """
    if isinstance(k, Fp4Keys):
        k = dequant_fp4_keys(k, q.shape[-1], q.dtype)
    S, N = q.shape[1], k.shape[1]
    qk = jnp.einsum("bshd,bnd->bshn", q, k, precision=_precision(jnp.result_type(q, k)),
                    preferred_element_type=jnp.float32)
    sc = jnp.einsum("bsh,bshn->bsn", w.astype(jnp.float32), jax.nn.relu(qk),
                    precision=jax.lax.Precision.HIGHEST)
    t = q_start + jnp.arange(S)
    valid = jnp.arange(N)[None, :] < ((t + 1) // ratio)[:, None]
    return jnp.where(valid[None], sc, _NEG)


def topk_indices(scores, k: int):
    """scores ``[..., N]`` (-inf = not allowed) -> int32 ``[..., k]`` indices, -1 where not allowed."""
    n = scores.shape[-1]
    if n < k:
        scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, k - n)], constant_values=_NEG)
    vals, idx = jax.lax.top_k(scores, k)
    return jnp.where(jnp.isneginf(vals), -1, idx).astype(jnp.int32)


def indexer_topk(q, w, k, topk: int, *, ratio: int = 4, q_start=0):
    """The ``topk`` highest-scoring allowed entries per query, int32 ``[B, S, topk]`` (-1 = none)."""
    return topk_indices(indexer_scores(q, w, k, ratio=ratio, q_start=q_start), topk)


def grouped_matmul(x, w, group_sizes):
    """``out[m] = x[m] @ w[g(m)]ᵀ`` float32 ``[M, N]``: rows sorted by group, ``w [E, N, K]``,
    ``group_sizes [E]`` rows per group (rows past their sum give zeros)."""
    dt = jnp.result_type(x, w)
    return jax.lax.ragged_dot(x.astype(dt), jnp.swapaxes(w, 1, 2).astype(dt), group_sizes.astype(jnp.int32),
                              precision=_precision(dt), preferred_element_type=jnp.float32)
