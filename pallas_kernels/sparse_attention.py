"""CSA (compressed sparse attention, compress ratio 4): window keys plus top-k compressed entries.

Kernels: ``_triton.py`` (GPU; gathers the top-k rows per query position, all heads of that
position in one tile; dckv through float32 atomics) and ``_mosaic.py`` (TPU; dense tiles of
compressed entries weighted by how often each entry appears in the query's top-k row; the
picked rows are gathered first when they are fewer than the entries, as in decoding).
Semantics: ``reference.sparse_attention``.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _core
from pallas_kernels.reference import Fp8Entries


def sparse_attention(q, kv, ckv, topk_idx, sink, *, window: int, scale: float, q_start=0,
                     interpret: bool = False, kv_start=0, backend: str | None = None):
    """CSA attention, differentiable in q, kv, ckv and sink.

    Args:
      q: [B, S, H, D] float32 | bfloat16, queries at positions q_start ... q_start+S-1
        (q, kv, ckv of mixed dtypes compute in the promoted dtype, like the reference).
      kv: [B, T, D] raw key/values (one KV head, key = value); ``kv[:, i]`` is position
        ``kv_start + i`` and must cover ``max(0, q_start-window+1) ... q_start+S-1``.
      ckv: [B, N, D] compressed entries.
      topk_idx: [B, S, K] int, indices into ckv, -1 = unused slot. An entry named twice in a row
        counts twice (as in the reference). Concrete indices outside -1 ... N-1 are an error; traced
        ones there make an unused slot.
      sink: [H] float32 sink logits (denominator only).
      window: a query at t sees kv positions t-window < p <= t.
      scale: score scale.
      q_start, kv_start: int or int32 scalars >= 0 (may be traced; a traced value is not checked).
      interpret: run the Pallas kernel in interpret mode (any platform, slow).
      backend: None (by the platform: ``jax.default_backend()``, or ``target_platform``'s), "triton",
        "mosaic" or "xla" (reference).
    Returns:
      [B, S, H, D] in q's dtype.
    """
    kw = dict(window=window, ratio=0, q_start=q_start, kv_start=kv_start)
    _core.validate("csa", q, kv, ckv, topk_idx, sink, **kw)
    if q.size == 0:  # no query (e.g. S = 0): an empty output, no kernel
        return jnp.zeros(q.shape, q.dtype)
    # Out-of-range (traced) indices are unused slots on every backend (the TPU kernels and the
    # gather of picked rows would otherwise read padding or another entry).
    N = (ckv.codes if isinstance(ckv, Fp8Entries) else ckv).shape[1]
    topk_idx = jnp.where((topk_idx >= 0) & (topk_idx < N), topk_idx, -1)
    return _core.run("csa", q, kv, ckv, topk_idx, sink, window=window, ratio=0, scale=scale,
                     q_start=q_start, kv_start=kv_start, interpret=interpret, backend=backend)
