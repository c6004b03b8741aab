"""Pallas Mosaic (TPU) kernel for the experts' weight gradient: ``dw[e] = Σ_{rows m of e} b[m]ᵀ a[m]``.

Why only this one: XLA's TPU compiler lowers ``jax.lax.ragged_dot`` (the grouped matmul of the
forward pass and of ``dx``) to its own grouped-matmul kernel, but the transpose that gives the
weight gradient (a ragged *contraction*) to a dense convolution over every group with the rows of
the others masked out: E times the work (seen in the program libtpu 0.0.42 compiles; docs/benchmarks.md).

The rows stay where they are (sorted by group, no tile layout). The grid is ``(N / bn, K / bk,
steps)``; the step axis walks the groups in order, one step per ``bm``-row tile a group touches
(a tile shared by two groups is visited by both, its other group's rows masked), one step for a
group without rows (it gets zeros), and unused steps at the end that do nothing. Which group and
tile a step takes is computed in XLA (``_visits``) and scalar-prefetched; the output block is the
step's group, so it stays resident in VMEM over the group's steps and is written once, after its
last. float32 accumulation in a VMEM scratch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_BLOCK = 512  # largest bm / bn / bk


def _visits(group_sizes, M: int, bm: int):
    """Per step (group, row tile) int32 ``[steps]``; per group its rows ``[start, end)``; the number of
    steps used, ``[1]``. steps = tiles + E - 1 bounds the visits: groups with rows share at most one
    tile with the next, and a group without rows takes one step."""
    E = group_sizes.shape[0]
    n_tiles = pl.cdiv(M, bm)
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), M)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first = jnp.minimum(starts // bm, n_tiles - 1)
    last = jnp.where(ends > starts, (ends - 1) // bm, first)
    count = last - first + 1
    done = jnp.cumsum(count)
    t = jnp.arange(n_tiles + E - 1, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(done, t, side="right"), E - 1).astype(jnp.int32)
    tile = jnp.minimum(first[group] + t - (done - count)[group], last[group]).astype(jnp.int32)
    return group, tile, starts, ends, done[-1:]


def _kernel(group_ref, tile_ref, start_ref, end_ref, used_ref, a_ref, b_ref, o_ref, acc_ref, *,
            bm, precision):
    t, n = pl.program_id(2), pl.num_programs(2)
    g = group_ref[t]
    used = used_ref[0]

    @pl.when((t == 0) | (g != group_ref[jnp.maximum(t - 1, 0)]))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(t < used)
    def _():
        def rows_of_g(x):  # the tile's rows that belong to group g; the others (and past M) -> 0
            row = tile_ref[t] * bm + lax.broadcasted_iota(jnp.int32, x.shape, 0)
            return jnp.where((row >= start_ref[g]) & (row < end_ref[g]), x, jnp.zeros_like(x))

        a, b = rows_of_g(a_ref[...]), rows_of_g(b_ref[...])                   # [bm, bk], [bm, bn]
        acc_ref[...] += lax.dot_general(b, a, (((0,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)   # [bn, bk]

        @pl.when((t == used - 1) | (g != group_ref[jnp.minimum(t + 1, n - 1)]))
        def _():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def row_tile(M: int, E: int) -> int:
    """Rows per step: the largest of 512, 256, 128 whose E - 1 extra steps (tiles shared by two groups)
    add at most a quarter to the M rows' work; 128 if none does. The accumulator stays in VMEM, so
    the arithmetic intensity per step (bn·bk / (bn + bk)) does not depend on it, only the number of
    steps does."""
    for bm in (_BLOCK, 256):
        if 4 * (E - 1) * bm <= M:
            return bm
    return 128


def _block(n: int) -> int:
    """The largest of 512, 256, 128 dividing n, else n itself (a whole dim)."""
    for b in (_BLOCK, 256, 128):
        if n % b == 0:
            return b
    return n


def tgmm(a, b, group_sizes, *, out_dtype, interpret: bool = False):
    """a ``[M, K]``, b ``[M, N]``, rows sorted by group -> ``[E, N, K]``, ``[e] = b[rows of e]ᵀ a[rows of e]``.

    Rows past ``sum(group_sizes)`` are ignored; a group without rows gets zeros. K and N must be
    multiples of 128 or at most 512 (the caller pads others).
    """
    M, K = a.shape
    N = b.shape[1]
    E = group_sizes.shape[0]
    bm, bk, bn = min(M, row_tile(M, E)), _block(K), _block(N)
    group, tile, starts, ends, used = _visits(group_sizes, M, bm)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, bm=bm, precision=precision)
    steps = group.shape[0]
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((E, N, K), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(N // bn, K // bk, steps),
            in_specs=[pl.BlockSpec((bm, bk), lambda i, j, t, grp, til, *_: (til[t], j)),
                      pl.BlockSpec((bm, bn), lambda i, j, t, grp, til, *_: (til[t], i))],
            out_specs=pl.BlockSpec((None, bn, bk), lambda i, j, t, grp, til, *_: (grp[t], i, j)),
            scratch_shapes=[pltpu.VMEM((bn, bk), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * steps * bm * N * K, transcendentals=0,
                                      bytes_accessed=(M * K * (N // bn) + M * N * (K // bk)) * a.dtype.itemsize
                                      + E * N * K * jnp.dtype(out_dtype).itemsize),
        interpret=interpret, name="v4_tgmm_tpu",
    )(group, tile, starts, ends, used, a, b)
