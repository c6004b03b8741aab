"""Lightning indexer of CSA layers: scores and top-k selection without the ``[S, H, N]`` products.

``indexer_scores`` is one Pallas kernel (``_indexer.py``) that reduces over the indexer heads
inside each tile (a decode-shaped kernel for up to ``DECODE_MAX_S`` queries). Keys may be FP4
(``Fp4Keys``, as an FP8 KV cache holds them): the GPU kernels decode them tile by tile; on TPU
they are dequantised before the kernel. ``indexer_topk`` scores the queries in chunks and keeps
only the top-k of each chunk, so neither the per-head products nor the full ``[S, N]`` score
matrix is ever materialised: the largest intermediate is ``[B, chunk, N]`` float32.
Semantics: ``reference.indexer_scores`` / ``reference.indexer_topk``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _core, _indexer, reference
from pallas_kernels.reference import FP4_BLOCK, Fp4Keys

DECODE_MAX_S = _indexer.DECODE_MAX_S
CHUNK_BYTES = 256 << 20  # score buffer per chunk of queries in indexer_topk


def _validate(q, w, k, ratio, q_start):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, IH, ID], got shape {q.shape}")
    B, S, H, D = q.shape
    if w.shape != (B, S, H):
        raise ValueError(f"w must be [B={B}, S={S}, IH={H}], got shape {w.shape}")
    floats = [("q", q), ("w", w)]
    if isinstance(k, Fp4Keys):
        n = -(-D // FP4_BLOCK)
        if k.packed.ndim != 3 or k.packed.shape[0] != B or k.packed.shape[2] != n * FP4_BLOCK // 2:
            raise ValueError(f"Fp4Keys.packed must be [B={B}, N, {n * FP4_BLOCK // 2}] for ID={D}, "
                             f"got shape {k.packed.shape}")
        if k.exps.shape != k.packed.shape[:2] + (n,):
            raise ValueError(f"Fp4Keys.exps must be {k.packed.shape[:2] + (n,)}, got shape {k.exps.shape}")
        if k.packed.dtype != jnp.uint8 or k.exps.dtype != jnp.int8:
            raise ValueError(f"Fp4Keys must be (uint8, int8) arrays, got ({k.packed.dtype}, {k.exps.dtype})")
    else:
        if k.ndim != 3 or k.shape[0] != B or k.shape[2] != D:
            raise ValueError(f"k must be [B={B}, N, ID={D}], got shape {k.shape}")
        floats.append(("k", k))
    for name, x in floats:
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {x.dtype}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    qs = _core._static_int(q_start)
    if qs is not None and qs < 0:
        raise ValueError(f"q_start must be >= 0, got {qs}")


def indexer_scores(q, w, k, *, ratio: int = 4, q_start=0, interpret: bool = False,
                   backend: str | None = None):
    """Indexer scores ``[B, S, N]`` float32 (-inf = not yet visible), computed by a Pallas kernel.

    Args:
      q: [B, S, IH, ID] float32 | bfloat16, indexer queries at positions q_start ... q_start+S-1.
      w: [B, S, IH] float32 | bfloat16 per-head weights (used in float32).
      k: [B, N, ID] compressed indexer keys (q and k of mixed dtypes compute in the promoted one),
        or ``Fp4Keys`` (their values are used in q's dtype).
      ratio: entry j is visible to position t when ``j < (t + 1) // ratio``.
      q_start: int or int32 scalar (may be traced).
      interpret / backend: as for ``sparse_attention``.
    """
    _validate(q, w, k, ratio, q_start)
    S, N = q.shape[1], _n_keys(k)
    backend = _core.resolve_backend(backend, interpret)
    if backend == "xla":
        return reference.indexer_scores(q, w, k, ratio=ratio, q_start=q_start)
    if N == 0 or q.size == 0:  # no entry / no query (S = 0, IH = 0): no kernel
        return reference.indexer_scores(q, w, k, ratio=ratio, q_start=q_start)
    q, k = _common_dtype(q, k, backend)
    out = _indexer.scores(q, w, k, q_start, ratio=ratio, backend=backend, interpret=interpret)
    return out[:, :S, :N]


def _n_keys(k):
    return k.packed.shape[1] if isinstance(k, Fp4Keys) else k.shape[1]


def _common_dtype(q, k, backend):
    """q and keys as the kernels take them. FP4 keys stay packed for Triton; the Mosaic kernels get
    them dequantised by XLA first (the in-register decoding interleaves codes along the lane
    axis, a relayout not verified on a TPU)."""
    if isinstance(k, Fp4Keys):
        if backend == "mosaic":
            return q, reference.dequant_fp4_keys(k, q.shape[-1], q.dtype)
        return q, k
    dt = jnp.result_type(q, k)
    return q.astype(dt), k.astype(dt)


def indexer_topk(q, w, k, topk: int, *, ratio: int = 4, q_start=0, chunk: int | None = None,
                 interpret: bool = False, backend: str | None = None):
    """Top-``topk`` entries per query, int32 ``[B, S, topk]``, -1 where fewer entries are visible.

    Queries are scored ``chunk`` positions at a time, each chunk reduced to its top-k before the
    next is scored. By default a chunk is as many positions as keep its float32 intermediate
    within ``CHUNK_BYTES``: the ``[B, chunk, N]`` scores for the kernel, the per-head products
    ``[B, chunk, IH, N]`` for ``backend="xla"`` (the reference, chunked the same way).
    Arguments otherwise as ``indexer_scores``.
    """
    _validate(q, w, k, ratio, q_start)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    backend = _core.resolve_backend(backend, interpret)
    B, S, H, D = q.shape
    N = _n_keys(k)
    if N == 0:
        return jnp.full((B, S, topk), -1, jnp.int32)
    if q.size == 0:  # no query (S = 0) or no head (IH = 0: visible entries score 0): no kernel
        return reference.indexer_topk(q, w, k, topk, ratio=ratio, q_start=q_start)
    q, k = _common_dtype(q, k, backend)
    if backend == "xla":
        step, row_bytes = 1, 4 * B * H * N
        if isinstance(k, Fp4Keys):  # decoded once, not per chunk
            k = reference.dequant_fp4_keys(k, D, q.dtype)
    else:
        step, row_bytes = _indexer.choose_tiles(backend, S, H, D, q.dtype).bq, 4 * B * (pl.cdiv(N, 128) * 128)
    if chunk is None:
        chunk = max(step, CHUNK_BYTES // row_bytes // step * step)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def select(qc, wc, start):
        if backend == "xla":
            return reference.indexer_topk(qc, wc, k, topk, ratio=ratio, q_start=start)
        sc = _indexer.scores(qc, wc, k, start, ratio=ratio, backend=backend, interpret=interpret)
        return reference.topk_indices(sc[:, :qc.shape[1]], topk)   # padded key columns are -inf

    if S <= chunk:
        return select(q, w, q_start)
    n = pl.cdiv(S, chunk)
    pad = n * chunk - S
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, chunk, H, D)
    wc = jnp.pad(w, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, H)
    starts = jnp.asarray(q_start, jnp.int32) + chunk * jnp.arange(n, dtype=jnp.int32)
    out = jax.lax.map(lambda a: select(*a), (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(wc, 1, 0), starts))
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, topk)[:, :S]
