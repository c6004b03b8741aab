"""Decoding state (SPEC §3): explicit pytrees, allocated once for a maximum length.

Per attention layer:
  * ``win_kv [B, win, hd]``   ring of the last ``win`` key/values (slot = position mod win);
  * ``ckv [B, T/m, hd]``      compressed entries (ratio m > 0); ``pallas_kernels.Fp8Entries`` with
                              ``kv_cache='fp8'`` (``encode_fp8_entries``);
  * ``comp_k, comp_s``        compressor ring of the last c·m tokens' k and s (fp32);
  * ``ikv [B, T/4, ID]``, ``icomp_k``, ``icomp_s``: the lightning indexer's keys
    (``pallas_kernels.Fp4Keys`` with ``kv_cache='fp8'``, read by the indexer kernel as they are)
    and compressor ring (CSA layers only).
Absent parts are ``None``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pallas_kernels import Fp4Keys, reference
from pallas_kernels.reference import FP8_BLOCK, Fp8Entries
from v4jax import quant


def encode_fp8_entries(x, rope_dim: int) -> Fp8Entries:
    """Compressed entries ``[B, N, hd]`` in the FP8 cache form (``kv_cache='fp8'``): the first
    ``hd - rope_dim`` dims as e4m3 codes with one power-of-two scale (an int8 exponent) per 64 dims,
    the RoPE dims as they are; 583 bytes a row instead of 1024 at V4 widths (hd 512, bf16).
    Decoding gives x exactly when x went through SPEC §5b (``Attention._quant_kv``)."""
    n = x.shape[-1] - rope_dim
    codes, exps = quant.quant_fp8_act(x[..., :n], FP8_BLOCK)
    return Fp8Entries(codes, exps, x[..., n:])


def rows_array(rows, dtype):
    """Cache rows (an array or ``Fp8Entries``) as an array of ``dtype``."""
    return reference.dequant_fp8_entries(rows, dtype) if isinstance(rows, Fp8Entries) else rows.astype(dtype)


@jax.tree_util.register_dataclass
@dataclass
class AttnCache:
    win_kv: jax.Array
    ckv: jax.Array | Fp8Entries | None = None
    comp_k: jax.Array | None = None
    comp_s: jax.Array | None = None
    ikv: jax.Array | Fp4Keys | None = None
    icomp_k: jax.Array | None = None
    icomp_s: jax.Array | None = None

    def replace(self, **kw) -> "AttnCache":
        return dataclasses.replace(self, **kw)


@jax.tree_util.register_dataclass
@dataclass
class Cache:
    """``pos``: int32 scalar, the position the next decoded token takes. ``layers``: one per block."""
    pos: jax.Array
    layers: list


def ring_from_sequence(x, L: int):
    """Place the last ``L`` rows of ``x [B, S, ...]`` in a ring ``[B, L, ...]`` at slot position mod L.

    Slots of positions < 0 (S < L) are zero.
    """
    S = x.shape[1]
    p = S - L + jnp.arange(L)
    rows = jnp.take(x, jnp.maximum(p, 0), axis=1)
    rows = jnp.where((p >= 0).reshape((1, L) + (1,) * (x.ndim - 2)), rows, jnp.zeros_like(rows))
    return jnp.zeros_like(rows).at[:, p % L].set(rows)


def ring_from_rows(x, end, L: int):
    """Ring ``[B, L, ...]`` of the last ``L`` rows of ``x [B, S, ...]`` (S >= L), whose last row is
    position ``end - 1`` (may be traced): slot = position mod L."""
    p = end - L + jnp.arange(L)
    rows = x[:, -L:]
    return jnp.zeros_like(rows).at[:, p % L].set(rows)


def ring_positions(t, L: int):
    """Position held by each ring slot when the newest position is ``t``: ``[L]`` (negative = empty)."""
    i = jnp.arange(L)
    return t - (t - i) % L


def nbytes(tree) -> int:
    """Bytes of every array in a (possibly abstract) pytree."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
