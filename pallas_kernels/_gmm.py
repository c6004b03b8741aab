"""Pallas-Triton (GPU) kernels for the grouped matmul of the routed experts.

Rows arrive in *tile layout* (built by ``grouped_matmul.py``): each group's rows start on a
multiple of ``bm`` and are followed by zero rows up to the next multiple, so every ``bm``-row
tile belongs to exactly one group, named by ``tile_group[t]`` (-1 for the unused tiles at the
end). Then

* ``gmm``: ``out[tile t] = x[tile t] @ w[g]ᵀ`` (``w [E, O, C]``, contraction over its last axis)
  or ``x[tile t] @ w[g]`` (``w [E, C, O]``, ``transpose_w=False``: the backward's ``dx``). One
  program per (tile, ``bo`` output columns), looping over the contraction in ``bc`` slices.
* ``tgmm``: ``dw[e] = Σ_{tiles t of e} a[t]ᵀ @ b[t]`` (the weight gradient). One program per
  (group, ``ba`` x ``bb`` block of ``dw[e]``), looping over the group's tiles; a group without
  rows gets zeros. Deterministic: no atomics.

Products accumulate in float32. Tiles (not timed: no GPU was available): ``bm`` 16 ... 128 from
the rows per group (16 for decode), ``bo = bc = 64`` for bfloat16 (32 for float32, which runs on
FMA units at ``Precision.HIGHEST``), 4 warps, 3 stages.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def block_edge(dtype) -> int:
    return 64 if dtype == jnp.bfloat16 else 32


def _params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=3)


def _gmm_kernel(tg_ref, x_ref, w_ref, o_ref, *, bm, bo, bc, n_c, transpose_w, precision):
    t, j = pl.program_id(0), pl.program_id(1)
    g = tg_ref[0]

    @pl.when(g >= 0)
    def _():
        def step(c, acc):
            x = x_ref[pl.ds(t * bm, bm), pl.ds(c * bc, bc)]                       # [bm, bc]
            if transpose_w:
                w = w_ref[g, pl.ds(j * bo, bo), pl.ds(c * bc, bc)]                # [bo, bc]
                dims = (((1,), (1,)), ((), ()))
            else:
                w = w_ref[g, pl.ds(c * bc, bc), pl.ds(j * bo, bo)]                # [bc, bo]
                dims = (((1,), (0,)), ((), ()))
            return acc + lax.dot_general(x, w, dims, precision=precision,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, n_c, step, jnp.zeros((bm, bo), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(g < 0)
    def _():
        o_ref[...] = jnp.zeros((bm, bo), o_ref.dtype)


def gmm(x, w, tile_group, *, bm: int, transpose_w: bool, out_dtype, interpret: bool):
    """x ``[n_tiles * bm, C]`` in tile layout, w ``[E, O, C]`` (or ``[E, C, O]``) -> ``[n_tiles * bm, O]``.

    C and O must be multiples of the block edge (the caller pads).
    """
    Mp, C = x.shape
    O = w.shape[1] if transpose_w else w.shape[2]
    edge = block_edge(x.dtype)
    bo, bc = min(edge, O), min(edge, C)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_gmm_kernel, bm=bm, bo=bo, bc=bc, n_c=C // bc,
                               transpose_w=transpose_w, precision=precision)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    return pl.pallas_call(
        kernel, grid=(Mp // bm, O // bo),
        in_specs=[pl.BlockSpec((1,), lambda t, j: (t,)), whole(x.shape), whole(w.shape)],
        out_specs=pl.BlockSpec((bm, bo), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, O), out_dtype),
        compiler_params=_params(interpret), interpret=interpret, name="v4_gmm",
    )(tile_group, x, w)


def _tgmm_kernel(start_ref, count_ref, a_ref, b_ref, o_ref, *, bm, ba, bb, precision):
    i, j = pl.program_id(1), pl.program_id(2)
    start = start_ref[0]

    def step(s, acc):
        rows = pl.ds((start + s) * bm, bm)
        a = a_ref[rows, pl.ds(i * ba, ba)]                                          # [bm, ba]
        b = b_ref[rows, pl.ds(j * bb, bb)]                                          # [bm, bb]
        return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count_ref[0], step, jnp.zeros((ba, bb), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def tgmm(a, b, tile_start, tile_count, *, bm: int, out_dtype, interpret: bool):
    """a ``[Mp, A]``, b ``[Mp, B]`` in tile layout -> ``[E, A, B]`` with ``[e] = Σ a[rows of e]ᵀ b[rows of e]``.

    ``tile_start`` / ``tile_count`` int32 ``[E]``: the first tile and number of tiles of each group.
    A and B must be multiples of the block edge.
    """
    Mp, A = a.shape
    Bd = b.shape[1]
    E = tile_start.shape[0]
    edge = block_edge(a.dtype)
    ba, bb = min(edge, A), min(edge, Bd)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_tgmm_kernel, bm=bm, ba=ba, bb=bb, precision=precision)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    per_group = pl.BlockSpec((1,), lambda e, i, j: (e,))
    return pl.pallas_call(
        kernel, grid=(E, A // ba, Bd // bb),
        in_specs=[per_group, per_group, whole(a.shape), whole(b.shape)],
        out_specs=pl.BlockSpec((None, ba, bb), lambda e, i, j: (e, i, j)),
        out_shape=jax.ShapeDtypeStruct((E, A, Bd), out_dtype),
        compiler_params=_params(interpret), interpret=interpret, name="v4_tgmm",
    )(tile_start, tile_count, a, b)
