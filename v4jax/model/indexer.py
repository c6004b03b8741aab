"""Lightning indexer of CSA layers (SPEC §2): picks the top-k compressed entries for every query.

``qI = wq_b(qr)`` ``[IH, ID]``, RoPE, Hadamard; ``kI`` from its own compressor (ratio 4, Hadamard);
``w = weights_proj(x) · ID^-½ · IH^-½``; ``score[t, j] = Σ_h w[t, h] · relu(qI[t, h] · kI[j])`` over
``j < (t + 1) // 4``; keep the top ``index_topk`` (indices, -1 where fewer entries exist).
In ``qat`` mode qI and kI are FP4 fake-quantised in blocks of 32 after the Hadamard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import quant
from v4jax.config import ModelConfig
from v4jax.model.compressor import Compressor, hadamard
from v4jax.model.layers import Linear, Numerics, WeightLayout, dot
from v4jax.model.rope import apply_rope, rope_tables

QUERY_CHUNK = 512  # queries scored at once in prefill: bounds the [chunk, IH, N] intermediate


def topk_indices(scores, k: int):
    """scores ``[..., N]`` (-inf = not allowed) -> int32 ``[..., k]`` indices, -1 where not allowed."""
    n = scores.shape[-1]
    if n < k:
        scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, k - n)], constant_values=-jnp.inf)
    vals, idx = jax.lax.top_k(scores, k)
    return jnp.where(jnp.isneginf(vals), -1, idx).astype(jnp.int32)


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rope_freqs, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.numerics = numerics
        self.rope_freqs = tuple(float(f) for f in rope_freqs)
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, numerics=numerics, rngs=rngs,
                           fmt=layout.fp8, axes=("index_heads", "q_lora"), qat_input=True,
                           param_dtype=layout.dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, numerics=numerics, rngs=rngs,
                                   axes=("index_heads", "embed"), param_dtype=layout.bf16)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, 4, rope_freqs=rope_freqs, rotate=True,
                                     eps=cfg.rms_norm_eps, numerics=numerics, rngs=rngs, param_dtype=layout.bf16)

    def _rotate_quant(self, x):
        x = hadamard(x)
        return quant.fake_quant_fp4(x, 32) if self.numerics.qat else x

    def queries(self, x, qr, pos):
        """x ``[B, S, D]``, qr ``[B, S, q_lora]``, pos ``[S]`` -> (qI fp32 ``[B, S, IH, ID]``, w fp32 ``[B, S, IH]``)."""
        B, S, _ = x.shape
        q = self.wq_b(qr).reshape(B, S, self.n_heads, self.head_dim)
        cos, sin = rope_tables(pos, np.asarray(self.rope_freqs, np.float32))
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        w = dot(x, self.weights_proj.dequantized(x.dtype), self.numerics, out_dtype=jnp.float32)
        return self._rotate_quant(q), w * (self.head_dim ** -0.5 * self.n_heads ** -0.5)

    def keys(self, entries):
        """Compressor entries (already normalised, rotated, Hadamard) -> fp32 keys, FP4-quantised in qat."""
        return quant.fake_quant_fp4(entries, 32) if self.numerics.qat else entries

    def scores(self, q, w, k, t):
        """q ``[B, s, IH, ID]``, w ``[B, s, IH]``, k ``[B, N, ID]``, t ``[s]`` positions -> ``[B, s, N]`` (-inf = masked)."""
        qk = jnp.einsum("bshd,bnd->bshn", q, k, precision=jax.lax.Precision.HIGHEST)
        sc = jnp.einsum("bsh,bshn->bsn", w, jax.nn.relu(qk), precision=jax.lax.Precision.HIGHEST)
        valid = jnp.arange(k.shape[1])[None, :] < ((t + 1) // 4)[:, None]
        return jnp.where(valid[None], sc, -jnp.inf)

    def select(self, q, w, k, t):
        """Top-k entries per query, chunked over queries: int32 ``[B, S, topk]``."""
        S = q.shape[1]
        if S <= QUERY_CHUNK:
            return topk_indices(self.scores(q, w, k, t), self.topk)
        n = -(-S // QUERY_CHUNK)
        pad = n * QUERY_CHUNK - S
        qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(q.shape[0], n, QUERY_CHUNK, *q.shape[2:])
        wc = jnp.pad(w, ((0, 0), (0, pad), (0, 0))).reshape(w.shape[0], n, QUERY_CHUNK, -1)
        tc = jnp.pad(t, (0, pad)).reshape(n, QUERY_CHUNK)
        out = jax.lax.map(lambda a: topk_indices(self.scores(a[0], a[1], k, a[2]), self.topk),
                          (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(wc, 1, 0), tc))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * QUERY_CHUNK, self.topk)[:, :S]
