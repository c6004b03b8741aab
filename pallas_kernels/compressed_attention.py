"""HCA (heavily compressed attention, ratio 128) and window-only attention (compress ratio 0).

Both run on the shared kernels of ``_triton.py`` (GPU) and ``_mosaic.py`` (TPU): the window
keys of every query plus, for HCA, the causal prefix ``ckv[0 : (t+1)//ratio]``.
Semantics: ``reference.compressed_attention`` and ``reference.window_attention``.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _core


def compressed_attention(q, kv, ckv, sink, *, window: int, ratio: int, scale: float, q_start=0,
                         interpret: bool = False, kv_start=0, backend: str | None = None):
    """HCA attention, differentiable in q, kv, ckv and sink.

    Args:
      q: [B, S, H, D] float32 | bfloat16, queries at positions q_start ... q_start+S-1
        (q, kv, ckv of mixed dtypes compute in the promoted dtype, like the reference).
      kv: [B, T, D] raw key/values; ``kv[:, i]`` is position ``kv_start + i``.
      ckv: [B, N, D] compressed entries; query t sees entries j < (t+1)//ratio.
      sink: [H] float32 sink logits (denominator only).
      window, ratio, scale: see above; q_start, kv_start: int or int32 scalars >= 0 (may be traced;
        a traced value is not checked).
      interpret, backend: as in ``sparse_attention``.
    Returns:
      [B, S, H, D] in q's dtype.
    """
    if q.size == 0:  # no query (e.g. S = 0): an empty output, no kernel
        _core.validate("hca", q, kv, ckv, None, sink, window=window, ratio=ratio, q_start=q_start,
                       kv_start=kv_start)
        return jnp.zeros(q.shape, q.dtype)
    return _core.run("hca", q, kv, ckv, None, sink, window=window, ratio=ratio, scale=scale,
                     q_start=q_start, kv_start=kv_start, interpret=interpret, backend=backend)


def window_attention(q, kv, sink, *, window: int, scale: float, q_start=0,
                     interpret: bool = False, kv_start=0, backend: str | None = None):
    """Window-only attention (HCA with no compressed entries); shapes as above."""
    if q.size == 0:
        _core.validate("window", q, kv, None, None, sink, window=window, ratio=0, q_start=q_start,
                       kv_start=kv_start)
        return jnp.zeros(q.shape, q.dtype)
    return _core.run("window", q, kv, None, None, sink, window=window, ratio=0, scale=scale,
                     q_start=q_start, kv_start=kv_start, interpret=interpret, backend=backend)
