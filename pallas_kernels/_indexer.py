"""Pallas kernel for the lightning indexer's scores (forward only: top-k indices have no gradient).

``score[b, s, j] = Σ_h w[b, s, h] · relu(q[b, s, h] · k[b, j])`` for ``j < (t + 1) // ratio``
(t = q_start + s), -inf elsewhere. The XLA reference materialises the per-head products
``[S, H, N]`` before reducing over heads; here each program owns ``bq`` query positions x ``bk``
keys and loops over the heads, so only the reduced ``[bq, bk]`` tile is ever written.

One kernel body serves both families. Layouts put the head axis first so that a head is a
leading-dimension index: ``q`` as ``[B, Hp, S, Dp]`` and ``w`` as ``[B, Hp, 1, S]``. Scores are
formed transposed, ``sT = k @ q_h^T : [bk, bq]``, so ``w[h]`` is a ``[1, bq]`` row that broadcasts
over keys (on TPU a lane vector, no relayout), and the tile is transposed once when stored.
Tiles past every query's causal limit store -inf without touching the MXU / tensor cores.

Tiles (not timed, no accelerator was available): GPU ``bq = bk = 64`` for bfloat16, 32 for float32
(``bq`` shrinks to 16 for decode), 4 warps: at ID=128 these compile for sm_90 without register
spills (checked offline, ``tests/pallas_kernels/test_triton_sm90_compile.py``); TPU
``bq = bk = 128`` with the head dim padded to a multiple of 128.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Tiles:
    bq: int   # query positions per program
    bk: int   # keys per program
    Hp: int   # heads, padded (zero weight)
    Dp: int   # head width, padded (zeros)


def choose_tiles(backend: str, S: int, H: int, D: int, dtype) -> Tiles:
    if backend == "mosaic":
        return Tiles(bq=128, bk=128, Hp=H, Dp=pl.cdiv(D, 128) * 128)
    # float32 products run on FMA units (IEEE precision): 64x64 tiles spill registers at ID=128
    edge = 64 if dtype == jnp.bfloat16 else 32
    return Tiles(bq=min(edge, max(16, pl.next_power_of_2(S))), bk=edge, Hp=pl.next_power_of_2(H),
                 Dp=max(16, pl.next_power_of_2(D)))


def _kernel(pos_ref, q_ref, w_ref, k_ref, o_ref, *, tiles: Tiles, ratio: int, n_keys: int,
            precision, mosaic: bool):
    bq, bk = tiles.bq, tiles.bk
    i, c = pl.program_id(1), pl.program_id(2)
    q_start = pos_ref[0]
    # the last query of the tile sees the most keys; a tile past that limit is all -inf.
    # (lax.div: truncating division, equal to // for these non-negative ints, cheaper to lower)
    limit = jnp.minimum(lax.div(q_start + (i + 1) * bq, ratio), n_keys)

    @pl.when(c * bk < limit)
    def _():
        k = k_ref[...]

        def head(h, acc):
            s = lax.dot_general(k, q_ref[h], (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)          # [bk, bq]
            return acc + w_ref[h] * jnp.maximum(s, 0.0)

        acc = lax.fori_loop(0, tiles.Hp, head, jnp.zeros((bk, bq), jnp.float32))
        if mosaic:
            j = c * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            t = q_start + i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        else:
            j = c * bk + jnp.arange(bk)[:, None]
            t = q_start + i * bq + jnp.arange(bq)[None, :]
        valid = (j < lax.div(t + 1, ratio)) & (j < n_keys)
        o_ref[...] = jnp.where(valid, acc, -jnp.inf).T

    @pl.when(c * bk >= limit)
    def _():
        o_ref[...] = jnp.full((bq, bk), -jnp.inf, jnp.float32)


def _pad_to(x, shape):
    pads = [(0, n - s) for s, n in zip(x.shape, shape)]
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def scores(q, w, k, q_start, *, ratio: int, backend: str, interpret: bool):
    """Padded scores ``[B, Sp, Np]`` float32 (rows >= S are junk, columns >= N are -inf).

    q ``[B, S, H, D]`` and k ``[B, N, D]`` in one dtype (float32 or bfloat16), w ``[B, S, H]``
    float32, q_start an int32 scalar (may be traced).
    """
    B, S, H, D = q.shape
    N = k.shape[1]
    mosaic = backend == "mosaic"
    tiles = choose_tiles(backend, S, H, D, q.dtype)
    Sp, Np = pl.cdiv(S, tiles.bq) * tiles.bq, pl.cdiv(N, tiles.bk) * tiles.bk
    qT = _pad_to(jnp.swapaxes(q, 1, 2), (B, tiles.Hp, Sp, tiles.Dp))
    wT = _pad_to(jnp.swapaxes(w.astype(jnp.float32), 1, 2)[:, :, None, :], (B, tiles.Hp, 1, Sp))
    kp = _pad_to(k, (B, Np, tiles.Dp))
    pos = jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, tiles=tiles, ratio=ratio, n_keys=N, precision=precision,
                               mosaic=mosaic)
    grid = (B, Sp // tiles.bq, Np // tiles.bk)
    specs = [pl.BlockSpec((None, tiles.Hp, tiles.bq, tiles.Dp), lambda b, i, c, *_: (b, 0, i, 0)),
             pl.BlockSpec((None, tiles.Hp, 1, tiles.bq), lambda b, i, c, *_: (b, 0, 0, i)),
             pl.BlockSpec((None, tiles.bk, tiles.Dp), lambda b, i, c, *_: (b, c, 0))]
    out_spec = pl.BlockSpec((None, tiles.bq, tiles.bk), lambda b, i, c, *_: (b, i, c))
    out_shape = jax.ShapeDtypeStruct((B, Sp, Np), jnp.float32)
    if mosaic:
        from jax.experimental.pallas import tpu as pltpu

        return pl.pallas_call(
            kernel, out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=specs,
                                                   out_specs=out_spec),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
            interpret=interpret, name="v4_indexer_scores")(pos, qT, wT, kp)
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, out_specs=out_spec,
        in_specs=[pl.BlockSpec((1,), lambda *g: (0,))] + specs,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="v4_indexer_scores")(pos, qT, wT, kp)
