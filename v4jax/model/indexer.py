"""Lightning indexer of CSA layers (SPEC §2): picks the top-k compressed entries for every query.

``qI = wq_b(qr)`` ``[IH, ID]``, RoPE, Hadamard; ``kI`` from its own compressor (ratio 4, Hadamard);
``w = weights_proj(x) · ID^-½ · IH^-½``; ``score[t, j] = Σ_h w[t, h] · relu(qI[t, h] · kI[j])`` over
``j < (t + 1) // 4``; keep the top ``index_topk`` (indices, -1 where fewer entries exist).
In ``qat`` mode (and with an FP8 cache) qI and kI are FP4 fake-quantised in blocks of 32 after the Hadamard; in
``production`` they are bfloat16 (scores accumulate in float32 in every mode).

Scoring and top-k are ``pallas_kernels.indexer_topk`` (``attention_impl: pallas``: a kernel that
never materialises the per-head products, queries taken in chunks) or its plain-JAX reference.
Training needs the scores themselves (the indexer KL loss) and always uses the reference.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from v4jax import quant
from v4jax.config import ModelConfig
from v4jax.model.compressor import Compressor, hadamard
from v4jax.model import layers
from v4jax.model.layers import Linear, Numerics, WeightLayout, dot
from v4jax.model.rope import apply_rope, rope_tables
from v4jax.sharding import local_call

class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rope_freqs, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.numerics, self.impl = numerics, cfg.attention_impl
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
        return (quant.fake_quant_fp4(x, 32) if self.numerics.quant_kv else x).astype(self.numerics.dtype)

    def queries(self, x, qr, pos):
        """x ``[B, S, D]``, qr ``[B, S, q_lora]``, pos ``[S]`` -> (qI ``[B, S, IH, ID]``, w fp32 ``[B, S, IH]``)."""
        B, S, _ = x.shape
        q = self.wq_b(qr).reshape(B, S, self.n_heads, self.head_dim)
        cos, sin = rope_tables(pos, np.asarray(self.rope_freqs, np.float32))
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        w = dot(x, self.weights_proj.dequantized(x.dtype), self.numerics, out_dtype=jnp.float32)
        return self._rotate_quant(q), w * (self.head_dim ** -0.5 * self.n_heads ** -0.5)

    def keys(self, entries):
        """Compressor entries (already normalised, rotated, Hadamard) -> keys, FP4-quantised in qat
        and with an FP8 cache."""
        return (quant.fake_quant_fp4(entries, 32) if self.numerics.quant_kv else entries).astype(self.numerics.dtype)

    def store(self, keys):
        """Keys ``[B, N, ID]`` as the cache holds them: with ``kv_cache='fp8'`` the FP4 codes and
        exponents of SPEC §5c (``pallas_kernels.Fp4Keys``, 68 bytes a row at ID = 128)."""
        if self.numerics.kv_cache == "fp8":
            return pallas_kernels.Fp4Keys(*quant.quant_fp4_act(keys, 32))
        return keys

    def select(self, q, w, k, pos):
        """Top-k entries per query: int32 ``[B, S, topk]`` (-1 where fewer entries exist). k: keys
        ``[B, N, ID]`` or ``Fp4Keys`` (the kernel decodes them tile by tile)."""
        # on each device's rows (under a mesh, the partitioner may gather a top-k's input over the batch)
        kw = dict(backend="xla") if self.impl != "pallas" else layers.kernel_kw()
        return local_call(pallas_kernels.indexer_topk, (q, w, k), ("rows", "rows", "rows"), "rows", topk=self.topk,
                          ratio=4, q_start=pos[0], **kw)
