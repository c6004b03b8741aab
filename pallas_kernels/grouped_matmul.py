"""Grouped matmul of the routed experts as a Pallas kernel (GPU), differentiable.

``grouped_matmul(x, w, group_sizes)`` computes ``out[m] = x[m] @ w[g(m)]ᵀ`` for rows sorted by
group (the first ``group_sizes[0]`` rows use ``w[0]``, the next ``group_sizes[1]`` use ``w[1]``,
...; rows past ``sum(group_sizes)`` give zeros): ``jax.lax.ragged_dot`` with the expert weights
in their stored ``[E, out, in]`` layout. XLA's GPU lowering of ``ragged_dot`` is not a grouped
GEMM (it allocates per-group dense products: ~96 GiB at V4-Flash expert shapes), hence this kernel.

Rows are scattered into *tile layout* (each group starts on a multiple of ``bm`` rows, zero rows
fill the gap), so every ``bm``-row tile belongs to one group and the kernels in ``_gmm.py`` need
no row masks. The layout costs at most ``min(E, M)`` extra tiles and two row gathers (x in,
output back). Backward: ``dx`` is the same kernel against ``w`` untransposed, ``dw`` a kernel that
sums each group's tiles; the cotangent is cast to x's dtype for both (tensor-core inputs).

Backends: ``triton`` (GPU; ``interpret=True`` runs it anywhere); ``mosaic`` (TPU): the forward
and ``dx`` are ``ragged_dot``, which XLA's TPU compiler lowers to a grouped matmul of its own, and
``dw`` the Pallas kernel of ``_gmm_mosaic.py``, because XLA lowers that transpose to a dense
product per group (E times the work); ``xla`` (``reference.grouped_matmul``: ``ragged_dot``
throughout).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _core, _gmm, _gmm_mosaic, reference


class Layout(NamedTuple):
    """Tile layout of M sorted rows: see the module docstring."""
    dest: jax.Array        # int32 [M]: row of each input row in the tiled buffer (>= n_tiles*bm: dropped)
    src: jax.Array         # int32 [n_tiles*bm]: input row of each tiled row (>= M: a zero row)
    tile_group: jax.Array  # int32 [n_tiles]: group of each tile, -1 = unused
    tile_start: jax.Array  # int32 [E]: first tile of each group
    tile_count: jax.Array  # int32 [E]: tiles of each group
    bm: int
    n_tiles: int


def row_tile(M: int, E: int) -> int:
    """Rows per tile: the mean rows per group as a power of two, within 16 ... 128."""
    return int(min(128, max(16, pl.next_power_of_2(pl.cdiv(M, E)))))


def tile_layout(group_sizes, M: int, bm: int) -> Layout:
    E = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = (sizes + bm - 1) // bm
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    # every group with rows wastes < 1 tile: sum(tiles) <= ceil(M / bm) + min(E, M)
    n_tiles = pl.cdiv(M, bm) + min(E, M)
    tg = jnp.searchsorted(tile_end, jnp.arange(n_tiles, dtype=jnp.int32), side="right")
    tile_group = jnp.where(tg < E, tg, -1).astype(jnp.int32)
    rows = jnp.arange(M, dtype=jnp.int32)
    g = jnp.searchsorted(ends, rows, side="right")
    gc = jnp.minimum(g, E - 1)
    # dest and src are inverse permutations on the rows that are used; every other entry points
    # past the end at a distinct place, so both row gathers (and the scatter-adds that are their
    # gradients) have unique indices: no atomics, and none of the id bookkeeping JAX's
    # differentiation of a scatter with possibly repeated indices adds.
    slots = n_tiles * bm
    dest = jnp.where(g < E, tile_start[gc] * bm + rows - starts[gc], slots + rows)
    src = (M + jnp.arange(slots, dtype=jnp.int32)).at[dest].set(rows, mode="drop", unique_indices=True)
    return Layout(dest.astype(jnp.int32), src, tile_group, tile_start.astype(jnp.int32),
                  jnp.minimum(tiles, n_tiles).astype(jnp.int32), bm, n_tiles)


def _rows(a, idx):
    """``a[idx]`` along axis 0, zero rows where idx is out of range; idx has no repeats."""
    return a.at[idx].get(mode="fill", fill_value=0, unique_indices=True)


class _Static(NamedTuple):
    bm: int
    out_dtype: str
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(static: _Static, xt, w, tile_group, tile_start, tile_count):
    return _gmm.gmm(xt, w, tile_group, bm=static.bm, transpose_w=True,
                    out_dtype=jnp.dtype(static.out_dtype), interpret=static.interpret)


def _tiled_fwd(static, xt, w, tile_group, tile_start, tile_count):
    return _tiled(static, xt, w, tile_group, tile_start, tile_count), (xt, w, tile_group, tile_start,
                                                                          tile_count)


def _tiled_bwd(static, res, dout):
    xt, w, tile_group, tile_start, tile_count = res
    g = dout.astype(xt.dtype)
    dx = _gmm.gmm(g, w, tile_group, bm=static.bm, transpose_w=False, out_dtype=xt.dtype,
                  interpret=static.interpret)
    dw = _gmm.tgmm(g, xt, tile_start, tile_count, bm=static.bm, out_dtype=w.dtype,
                   interpret=static.interpret)
    return dx, dw, None, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mosaic(interpret: bool, x, w, group_sizes):
    return reference.grouped_matmul(x, w, group_sizes)


def _mosaic_fwd(interpret, x, w, group_sizes):
    return _mosaic(interpret, x, w, group_sizes), (x, w, group_sizes)


def _mosaic_bwd(interpret, res, dout):
    x, w, group_sizes = res
    g = dout.astype(x.dtype)
    dx = jax.lax.ragged_dot(g, w, group_sizes, precision=reference._precision(x.dtype),
                            preferred_element_type=x.dtype)
    # dw's blocks take whole dims up to 512 and multiples of 128 beyond
    (M, K), N = x.shape, w.shape[1]
    Kp, Np = (n if n <= 512 else pl.cdiv(n, 128) * 128 for n in (K, N))
    dw = _gmm_mosaic.tgmm(_pad(x, (M, Kp)), _pad(g, (M, Np)), group_sizes, out_dtype=w.dtype,
                          interpret=interpret)[:, :N, :K]
    return dx, dw, None


_mosaic.defvjp(_mosaic_fwd, _mosaic_bwd)


def _padded_dim(n: int, edge: int) -> int:
    return max(16, pl.next_power_of_2(n)) if n <= edge else pl.cdiv(n, edge) * edge


def _pad(x, shape):
    pads = [(0, n - s) for s, n in zip(x.shape, shape)]
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def grouped_matmul(x, w, group_sizes, *, out_dtype=jnp.float32, interpret: bool = False,
                   backend: str | None = None):
    """``out[m] = x[m] @ w[g(m)]ᵀ``, float32 accumulation, ``[M, N]`` in ``out_dtype``.

    Args:
      x: [M, K] float32 | bfloat16, rows sorted by group.
      w: [E, N, K] (the experts' stored ``[E, out, in]`` layout); x and w of mixed dtypes compute
        in the promoted one. float32 runs at full precision, bfloat16 on tensor cores.
      group_sizes: int [E], rows per group, >= 0 (may be traced; concrete sizes are checked);
        sum <= M.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      backend: "triton" | "mosaic" | "xla" | None (by platform). "xla" is ``reference.grouped_matmul``.
    Differentiable in x and w.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    M, K = x.shape
    if w.ndim != 3 or w.shape[2] != K:
        raise ValueError(f"w must be [E, N, K={K}], got shape {w.shape}")
    E, N = w.shape[:2]
    if group_sizes.shape != (E,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array [E={E}], got {group_sizes.dtype} "
                         f"{group_sizes.shape}")
    for name, a in (("x", x), ("w", w)):
        if a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {a.dtype}")
    if not isinstance(group_sizes, jax.core.Tracer) and (np.asarray(group_sizes) < 0).any():
        # ragged_dot (xla, mosaic) and the Triton kernels disagree on a negative size
        raise ValueError(f"group_sizes must be >= 0, got {np.asarray(group_sizes).tolist()}")
    backend = _core.resolve_backend(backend, interpret)
    if backend == "xla":
        return reference.grouped_matmul(x, w, group_sizes).astype(out_dtype)
    dt = jnp.result_type(x, w)
    if M == 0:
        return jnp.zeros((0, N), out_dtype)
    if backend == "mosaic":
        return _mosaic(bool(interpret), x.astype(dt), w.astype(dt), group_sizes.astype(jnp.int32)).astype(out_dtype)
    edge = _gmm.block_edge(dt)
    Kp, Np = _padded_dim(K, edge), _padded_dim(N, edge)
    lay = tile_layout(group_sizes, M, row_tile(M, E))
    xt = _rows(_pad(x.astype(dt), (M, Kp)), lay.src)
    out = _tiled(_Static(lay.bm, jnp.dtype(out_dtype).name, bool(interpret)), xt,
                 _pad(w.astype(dt), (E, Np, Kp)), lay.tile_group, lay.tile_start, lay.tile_count)
    return _rows(out, lay.dest)[:, :N]
