"""Pallas kernels for the lightning indexer's scores (forward only: top-k indices have no gradient).

``score[b, s, j] = Σ_h w[b, s, h] · relu(q[b, s, h] · k[b, j])`` for ``j < (t + 1) // ratio``
(t = q_start + s), -inf elsewhere. The XLA reference materialises the per-head products
``[S, H, N]`` before reducing over heads; here only reduced tiles are ever written. Two kernels:

* ``scores`` (prefill): each program owns ``bq`` query positions x ``bk`` keys and loops over the
  heads. Layouts put the head axis first so that a head is a leading-dimension index: ``q`` as
  ``[B, Hp, S, Dp]`` and ``w`` as ``[B, Hp, 1, S]``. Scores are formed transposed,
  ``sT = k @ q_h^T : [bk, bq]``, so ``w[h]`` is a ``[1, bq]`` row that broadcasts over keys (on TPU
  a lane vector, no relayout), and the tile is transposed once when stored.
* ``decode_scores`` (a few queries, S <= ``DECODE_MAX_S``): the heads are the matmul's rows,
  ``p = q_s @ k^T : [Hp, bk]`` for each query s, reduced over heads to one ``[1, bk]`` row. A
  program streams ``bk`` keys and reads only the real queries, not a ``bq``-row tile that is
  almost all padding: decode is a pass over the key cache and should cost little more.

Keys are an array in q's dtype or FP4 (``reference.Fp4Keys``): packed e2m1 codes and one int8
exponent per 32 dims, decoded to q's dtype inside the kernel (``_fp4_tile``), so an FP4 cache is
read as 0.53 bytes per dim instead of being expanded to a bf16 copy first. The callers pass FP4
keys to the Triton kernels only (``indexer._common_dtype``): the decoding interleaves the two
nibbles of a byte along the minor axis, a relayout not verified under Mosaic.
Tiles past every query's causal limit store -inf without touching the MXU / tensor cores.

Tiles (not timed, no accelerator was available): GPU prefill ``bq = bk = 64`` for bfloat16, 32
for float32 (``bq`` shrinks to 16 for short inputs), 4 warps; GPU decode ``bk = 256`` keys,
8 warps (bfloat16 only: float32 decodes with the prefill kernel, ``use_decode_kernel``): at
ID=128 these compile for sm_90 without register spills
(checked offline, ``tests/pallas_kernels/test_triton_sm90_compile.py``); TPU ``bq = bk = 128``
(decode ``bk = 512``) with the head dim padded to a multiple of 128.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.reference import FP4_BLOCK, Fp4Keys

DECODE_MAX_S = 16  # queries up to which ``decode_scores`` is used


@dataclasses.dataclass(frozen=True)
class Tiles:
    bq: int   # query positions per program (decode: all of them, padded)
    bk: int   # keys per program
    Hp: int   # heads, padded (zero weight)
    Dp: int   # head width, padded (zeros); a multiple of 2·FP4_BLOCK for FP4 keys
    num_warps: int = 4


def choose_tiles(backend: str, S: int, H: int, D: int, dtype, *, fp4: bool = False,
                 decode: bool = False) -> Tiles:
    mosaic = backend == "mosaic"
    if mosaic:
        Dp = pl.cdiv(D, 128) * 128
    else:
        Dp = max(16, pl.next_power_of_2(D))
        if fp4:  # whole FP4 blocks, a power of two of them
            Dp = max(Dp, 2 * FP4_BLOCK)
    if decode:
        if mosaic:
            return Tiles(bq=S, bk=512, Hp=H, Dp=Dp)
        return Tiles(bq=pl.next_power_of_2(S), bk=256, Hp=max(16, pl.next_power_of_2(H)), Dp=Dp, num_warps=8)
    if mosaic:
        return Tiles(bq=128, bk=128, Hp=H, Dp=Dp)
    # float32 products run on FMA units (IEEE precision): 64x64 tiles spill registers at ID=128
    edge = 64 if dtype == jnp.bfloat16 else 32
    return Tiles(bq=min(edge, max(16, pl.next_power_of_2(S))), bk=edge, Hp=pl.next_power_of_2(H), Dp=Dp)


def _fp4_tile(packed, exps, dtype):
    """Decode FP4 keys: packed ``[bk, P]`` uint8 (two e2m1 codes per byte, low nibble = even dim)
    and exponents ``[bk, 2P/FP4_BLOCK]`` int8 -> ``[bk, 2P]`` in ``dtype`` (exact).

    Plain integer arithmetic (no table lookups, which kernels lack): the magnitude code
    ``c = 2e + m`` is ``m/2`` for e = 0 and ``(1 + m/2)·2^(e-1)`` otherwise, i.e. ``n/4`` with
    ``n = 2m`` or ``(2 + m) << e``; the scale ``2^x`` is built from its float32 bit pattern.
    """
    bk, P = packed.shape
    b = packed.astype(jnp.int32)

    def value(c):
        mag = c & 7
        e, m = mag >> 1, mag & 1
        v = jnp.where(e == 0, 2 * m, (2 + m) << e).astype(jnp.float32) * 0.25
        return jnp.where(c >= 8, -v, v)

    vals = jnp.stack([value(b & 15), value(b >> 4)], axis=-1).reshape(bk, 2 * P)
    scale = lax.bitcast_convert_type((exps.astype(jnp.int32) + 127) << 23, jnp.float32)
    n = exps.shape[1]
    scale = jnp.broadcast_to(scale[:, :, None], (bk, n, FP4_BLOCK)).reshape(bk, n * FP4_BLOCK)
    return (vals * scale).astype(dtype)


def _keys(k_refs, dtype):
    """The key tile ``[bk, Dp]`` from one ref (an array) or two (FP4 codes and exponents)."""
    if len(k_refs) == 1:
        return k_refs[0][...]
    return _fp4_tile(k_refs[0][...], k_refs[1][...], dtype)


def _kernel(pos_ref, q_ref, w_ref, *refs, tiles: Tiles, ratio: int, n_keys: int, precision, mosaic: bool):
    *k_refs, o_ref = refs
    bq, bk = tiles.bq, tiles.bk
    i, c = pl.program_id(1), pl.program_id(2)
    q_start = pos_ref[0]
    # the last query of the tile sees the most keys; a tile past that limit is all -inf.
    # (lax.div: truncating division, equal to // for these non-negative ints, cheaper to lower)
    limit = jnp.minimum(lax.div(q_start + (i + 1) * bq, ratio), n_keys)

    @pl.when(c * bk < limit)
    def _():
        k = _keys(k_refs, q_ref.dtype)

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


def _decode_kernel(pos_ref, q_ref, w_ref, *refs, tiles: Tiles, n_queries: int, ratio: int, n_keys: int,
                   precision, mosaic: bool):
    *k_refs, o_ref = refs
    bk = tiles.bk
    c = pl.program_id(1)
    q_start = pos_ref[0]
    limit = jnp.minimum(lax.div(q_start + n_queries, ratio), n_keys)
    j = c * bk + (lax.broadcasted_iota(jnp.int32, (1, bk), 1) if mosaic else jnp.arange(bk)[None, :])

    @pl.when(c * bk < limit)
    def _():
        k = _keys(k_refs, q_ref.dtype)
        for s in range(n_queries):  # a few queries: unrolled, static slices
            p = lax.dot_general(q_ref[s], k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)          # [Hp, bk]
            row = jnp.sum(jnp.maximum(p, 0.0) * w_ref[:, s:s + 1], axis=0, keepdims=True)
            valid = (j < lax.div(q_start + s + 1, ratio)) & (j < n_keys)
            o_ref[s:s + 1, :] = jnp.where(valid, row, -jnp.inf)

    @pl.when(c * bk >= limit)
    def _():
        o_ref[...] = jnp.full((tiles.bq, bk), -jnp.inf, jnp.float32)


def use_decode_kernel(backend: str, S: int, dtype) -> bool:
    """Whether ``scores`` runs ``decode_scores``: for at most ``DECODE_MAX_S`` queries, but not in
    float32 on GPU, where the FMA-unit products of a ``[heads, ID]`` query block spill registers
    at any key-tile size (the prefill kernel's 32x32 tiles do not)."""
    return S <= DECODE_MAX_S and (backend == "mosaic" or dtype == jnp.bfloat16)


def _pad_to(x, shape):
    pads = [(0, n - s) for s, n in zip(x.shape, shape)]
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def _key_operands(k, tiles: Tiles, B: int, Np: int):
    """Padded key arrays and their block specs (index maps take the key-block index ``c``)."""
    if isinstance(k, Fp4Keys):
        P, n = tiles.Dp // 2, tiles.Dp // FP4_BLOCK
        return ([_pad_to(k.packed, (B, Np, P)), _pad_to(k.exps, (B, Np, n))],
                [(tiles.bk, P), (tiles.bk, n)])
    return [_pad_to(k, (B, Np, tiles.Dp))], [(tiles.bk, tiles.Dp)]


def _call(kernel, grid, operands, in_specs, out_spec, out_shape, *, backend, tiles, interpret, name):
    pos = operands[0]
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        return pl.pallas_call(
            kernel, out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                                   out_specs=out_spec),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid)),
            interpret=interpret, name=name)(pos, *operands[1:])
    from jax.experimental.pallas import triton as plgpu
    from pallas_kernels._triton import by_batch_rows, int32_batch_rows

    def call(*batched):  # grid and operands lead with the batch
        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((batched[0].shape[0],) + out_shape.shape[1:], out_shape.dtype),
            grid=(batched[0].shape[0],) + grid[1:], out_specs=out_spec,
            in_specs=[pl.BlockSpec((1,), lambda *g: (0,))] + in_specs,
            compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=2),
            interpret=interpret, name=name)(pos, *batched)
    return by_batch_rows(call, int32_batch_rows(*operands[1:]), *operands[1:])


def scores(q, w, k, q_start, *, ratio: int, backend: str, interpret: bool):
    """Padded scores ``[B, Sp, Np]`` float32 (rows >= S are junk, columns >= N are -inf).

    q ``[B, S, H, D]``, k ``[B, N, D]`` in q's dtype (float32 or bfloat16) or ``Fp4Keys``,
    w ``[B, S, H]`` float32, q_start an int32 scalar (may be traced). ``S <= DECODE_MAX_S`` runs
    ``decode_scores`` (except float32 on GPU, see ``use_decode_kernel``).
    """
    B, S, H, D = q.shape
    if use_decode_kernel(backend, S, q.dtype):
        return decode_scores(q, w, k, q_start, ratio=ratio, backend=backend, interpret=interpret)
    N = k.packed.shape[1] if isinstance(k, Fp4Keys) else k.shape[1]
    mosaic = backend == "mosaic"
    tiles = choose_tiles(backend, S, H, D, q.dtype, fp4=isinstance(k, Fp4Keys))
    Sp, Np = pl.cdiv(S, tiles.bq) * tiles.bq, pl.cdiv(N, tiles.bk) * tiles.bk
    qT = _pad_to(jnp.swapaxes(q, 1, 2), (B, tiles.Hp, Sp, tiles.Dp))
    wT = _pad_to(jnp.swapaxes(w.astype(jnp.float32), 1, 2)[:, :, None, :], (B, tiles.Hp, 1, Sp))
    keys, key_blocks = _key_operands(k, tiles, B, Np)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, tiles=tiles, ratio=ratio, n_keys=N, precision=precision, mosaic=mosaic)
    specs = [pl.BlockSpec((None, tiles.Hp, tiles.bq, tiles.Dp), lambda b, i, c, *_: (b, 0, i, 0)),
             pl.BlockSpec((None, tiles.Hp, 1, tiles.bq), lambda b, i, c, *_: (b, 0, 0, i))]
    specs += [pl.BlockSpec((None,) + blk, lambda b, i, c, *_: (b, c, 0)) for blk in key_blocks]
    out_spec = pl.BlockSpec((None, tiles.bq, tiles.bk), lambda b, i, c, *_: (b, i, c))
    pos = jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,))
    return _call(kernel, (B, Sp // tiles.bq, Np // tiles.bk), [pos, qT, wT, *keys], specs, out_spec,
                 jax.ShapeDtypeStruct((B, Sp, Np), jnp.float32), backend=backend, tiles=tiles,
                 interpret=interpret, name="v4_indexer_scores")


def decode_scores(q, w, k, q_start, *, ratio: int, backend: str, interpret: bool):
    """``scores`` for a few queries (``S <= DECODE_MAX_S``): one program per ``bk`` keys."""
    B, S, H, D = q.shape
    if S > DECODE_MAX_S:
        raise ValueError(f"decode_scores takes at most {DECODE_MAX_S} queries, got {S}")
    if isinstance(k, Fp4Keys) and k.packed.shape[2] * 2 != pl.cdiv(D, FP4_BLOCK) * FP4_BLOCK:
        raise ValueError(f"FP4 keys of {k.packed.shape[2]} bytes per row do not match ID={D}")
    N = k.packed.shape[1] if isinstance(k, Fp4Keys) else k.shape[1]
    tiles = choose_tiles(backend, S, H, D, q.dtype, fp4=isinstance(k, Fp4Keys), decode=True)
    Sp, Np = tiles.bq, pl.cdiv(N, tiles.bk) * tiles.bk
    qp = _pad_to(q, (B, Sp, tiles.Hp, tiles.Dp))
    wT = _pad_to(jnp.swapaxes(w.astype(jnp.float32), 1, 2), (B, tiles.Hp, Sp))
    keys, key_blocks = _key_operands(k, tiles, B, Np)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_decode_kernel, tiles=tiles, n_queries=S, ratio=ratio, n_keys=N,
                               precision=precision, mosaic=backend == "mosaic")
    specs = [pl.BlockSpec((None, Sp, tiles.Hp, tiles.Dp), lambda b, c, *_: (b, 0, 0, 0)),
             pl.BlockSpec((None, tiles.Hp, Sp), lambda b, c, *_: (b, 0, 0))]
    specs += [pl.BlockSpec((None,) + blk, lambda b, c, *_: (b, c, 0)) for blk in key_blocks]
    out_spec = pl.BlockSpec((None, Sp, tiles.bk), lambda b, c, *_: (b, 0, c))
    pos = jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,))
    return _call(kernel, (B, Np // tiles.bk), [pos, qp, wT, *keys], specs, out_spec,
                 jax.ShapeDtypeStruct((B, Sp, Np), jnp.float32), backend=backend, tiles=tiles,
                 interpret=interpret, name="v4_indexer_decode_scores")
