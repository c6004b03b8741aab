"""Gated pooling compressor (SPEC §2 Compressor): every ``m`` tokens -> one entry of width ``d``. fp32.

Per token: ``k = wkv(x)``, ``s = wgate(x) + ape[t mod m]`` (width ``c·d``; c = 2 iff overlapping, m = 4).
  * plain:       entry j = Σ_{t in block j} softmax_t(s) ⊙ k
  * overlapping: entry j pools block j-1 with feature half A (``[:d]``) and block j with half B
    (``[d:]``), softmax over those 2m tokens jointly; block 0 has no previous half.
Then RMSNorm, RoPE on the last rd dims at position ``j·m`` and, for the indexer, a Hadamard rotation.
Entry j exists once token ``(j+1)·m - 1`` has been seen.

Decoding keeps the last ``c·m`` tokens' ``k`` and ``s`` in a ring (slot = position mod c·m).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.model.cache import ring_from_rows, ring_from_sequence
from v4jax.model.layers import HIGHEST, Linear, Numerics, RMSNorm, dot_f32, param
from v4jax.model.rope import apply_rope, rope_tables
from v4jax.sharding import for_compute


@functools.lru_cache(maxsize=None)
def _hadamard_matrix(d: int) -> np.ndarray:
    H = np.ones((1, 1), np.float32)
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    return H


def hadamard(x):
    """Normalised Walsh–Hadamard transform (Sylvester order, scale d^-0.5) of the last axis, fp32."""
    d = x.shape[-1]
    H = jnp.asarray(_hadamard_matrix(d))
    return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), H, precision=HIGHEST) * (d ** -0.5)


def pool(k_cur, s_cur, k_prev, s_prev, prev_valid, overlap: bool):
    """Pool one block per leading index.

    k_cur, s_cur: ``[..., m, c·d]`` the block's tokens; k_prev, s_prev: the previous block's tokens
    (used only when overlapping); prev_valid: bool ``[...]``. Returns ``[..., d]`` fp32.
    """
    if not overlap:
        w = jax.nn.softmax(s_cur, axis=-2)
        return jnp.sum(w * k_cur, axis=-2)
    d = k_cur.shape[-1] // 2
    s_a = jnp.where(prev_valid[..., None, None], s_prev[..., :d], -jnp.inf)
    k = jnp.concatenate([k_prev[..., :d], k_cur[..., d:]], axis=-2)
    s = jnp.concatenate([s_a, s_cur[..., d:]], axis=-2)
    w = jax.nn.softmax(s, axis=-2)
    return jnp.sum(w * k, axis=-2)


class Compressor(nnx.Module):
    """Parameters ``wkv, wgate: [c·d, D]``, ``ape: [m, c·d]``, ``norm: [d]`` (checkpoint names)."""

    def __init__(self, dim: int, d: int, ratio: int, *, rope_freqs, rotate: bool, eps: float,
                 numerics: Numerics, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.ratio, self.d, self.rotate = ratio, d, rotate
        self.overlap = ratio == 4
        self.c = 2 if self.overlap else 1
        self.rope_freqs = tuple(float(f) for f in rope_freqs)  # static
        cd = self.c * d
        self.wkv = Linear(dim, cd, numerics=numerics, rngs=rngs, param_dtype=param_dtype)
        self.wgate = Linear(dim, cd, numerics=numerics, rngs=rngs, param_dtype=param_dtype)
        self.ape = param(jnp.zeros((ratio, cd), jnp.float32), ("window", "mlp"))
        self.norm = RMSNorm(d, eps, param_dtype=param_dtype)

    def project(self, x, pos):
        """x ``[B, S, D]``, pos int ``[S]`` -> (k, s) fp32 ``[B, S, c·d]``."""
        # stored BF16 in the release (dot_f32 keeps it so on a GPU)
        k = dot_f32(x, for_compute(self.wkv.weight[...], self.wkv.weight))
        s = dot_f32(x, for_compute(self.wgate.weight[...], self.wgate.weight)) + self.ape[...][pos % self.ratio]
        return k, s

    def finish(self, entries, j):
        """Pooled ``[B, N, d]`` at entry indices j ``[N]`` -> normalised, rotated entries (fp32)."""
        e = self.norm(entries)
        cos, sin = rope_tables(j * self.ratio, np.asarray(self.rope_freqs, np.float32))
        e = apply_rope(e, cos, sin)
        return hadamard(e) if self.rotate else e

    def __call__(self, x):
        """Prefill from position 0. x ``[B, S, D]`` -> (entries fp32 ``[B, S // m, d]``, k, s)."""
        B, S, _ = x.shape
        m, N = self.ratio, S // self.ratio
        k, s = self.project(x, jnp.arange(S))
        kb = k[:, : N * m].reshape(B, N, m, k.shape[-1])
        sb = s[:, : N * m].reshape(B, N, m, s.shape[-1])
        k_prev = jnp.pad(kb, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :N]
        s_prev = jnp.pad(sb, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :N]
        j = jnp.arange(N)
        pooled = pool(kb, sb, k_prev, s_prev, jnp.broadcast_to(j >= 1, (B, N)), self.overlap)
        return self.finish(pooled, j), k, s

    def extend(self, x, t0, state):
        """A chunk x ``[B, C, D]`` at positions t0 … t0+C-1 after the tokens in ``state``; t0 (may be
        traced) a positive multiple of m. Returns (the C // m entries completed in the chunk, fp32
        ``[B, C // m, d]``, entry indices from t0 / m; new state)."""
        B, C, _ = x.shape
        m, L = self.ratio, self.c * self.ratio
        k, s = self.project(x, t0 + jnp.arange(C))
        before = (t0 - L + jnp.arange(L)) % L                  # ring slots of positions t0-L … t0-1
        ring_k, ring_s = state
        k_all = jnp.concatenate([ring_k[:, before], k], axis=1)  # positions t0-L … t0+C-1
        s_all = jnp.concatenate([ring_s[:, before], s], axis=1)
        N = C // m
        blocks = lambda a, first: a[:, first:first + N * m].reshape(B, N, m, a.shape[-1])
        j = t0 // m + jnp.arange(N)
        pooled = pool(blocks(k_all, L), blocks(s_all, L), blocks(k_all, L - m), blocks(s_all, L - m),
                      jnp.broadcast_to(j >= 1, (B, N)), self.overlap)
        return self.finish(pooled, j), (ring_from_rows(k_all, t0 + C, L), ring_from_rows(s_all, t0 + C, L))

    # ------------------------------------------------------------------ decoding state
    def state_from_prefill(self, k, s):
        """Ring of the last c·m tokens' (k, s) after a prefill: two ``[B, c·m, c·d]``."""
        L = self.c * self.ratio
        return ring_from_sequence(k, L), ring_from_sequence(s, L)

    def empty_state(self, batch: int):
        shape = (batch, self.c * self.ratio, self.c * self.d)
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)

    def decode(self, x, t, state):
        """One token x ``[B, 1, D]`` at position t (traced scalar).

        Returns (entry fp32 ``[B, d]`` — meaningful only when ``done``, done: bool scalar, new state).
        """
        m, L = self.ratio, self.c * self.ratio
        k, s = self.project(x, t[None])
        ring_k, ring_s = state
        ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, k, t % L, axis=1)
        ring_s = jax.lax.dynamic_update_slice_in_dim(ring_s, s, t % L, axis=1)
        j = (t + 1) // m - 1                       # the entry completed at t (if any)
        cur = (j * m + jnp.arange(m)) % L
        prev = ((j - 1) * m + jnp.arange(m)) % L
        pooled = pool(ring_k[:, cur], ring_s[:, cur], ring_k[:, prev], ring_s[:, prev],
                      jnp.broadcast_to(j >= 1, (x.shape[0],)), self.overlap)
        entry = self.finish(pooled[:, None], jnp.maximum(j, 0)[None])[:, 0]
        return entry, (t + 1) % m == 0, (ring_k, ring_s)
