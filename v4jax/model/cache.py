"""Decoding state (SPEC §3): explicit pytrees, allocated once for a maximum length.

Per attention layer:
  * ``win_kv [B, win, hd]``   ring of the last ``win`` key/values (slot = position mod win);
  * ``ckv [B, T/m, hd]``      compressed entries (ratio m > 0);
  * ``comp_k, comp_s``        compressor ring of the last c·m tokens' k and s (fp32);
  * ``ikv [B, T/4, ID]``, ``icomp_k``, ``icomp_s``: the lightning indexer's keys and compressor ring
    (CSA layers only).
Absent parts are ``None``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass
class AttnCache:
    win_kv: jax.Array
    ckv: jax.Array | None = None
    comp_k: jax.Array | None = None
    comp_s: jax.Array | None = None
    ikv: jax.Array | None = None
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


def ring_positions(t, L: int):
    """Position held by each ring slot when the newest position is ``t``: ``[L]`` (negative = empty)."""
    i = jnp.arange(L)
    return t - (t - i) % L


def nbytes(tree) -> int:
    """Bytes of every array in a (possibly abstract) pytree."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
