"""Pallas-Triton (GPU) kernels for window / HCA / CSA attention: forward, dq, dkv, dckv.

Layout: every program owns ``bq`` query positions x ``bh`` heads of one batch row, i.e. a tile of
``M = bq * bh`` query rows that all read the same keys (MQA: one KV head). Key tiles of ``bk``
rows are *gathered* by row index (``ref[rows[:, None], cols[None, :]]``), which covers the three
key sources with one mechanism: the window span ``t0-window+1 ... t0+bq-1`` of ``kv``, the HCA
prefix ``ckv[0 : (t+1)//ratio]`` and the CSA rows ``ckv[topk_idx[t]]`` (CSA uses ``bq = 1``:
each position has its own top-k). Row indices are clamped into range and masked scores are
-inf, so no load is out of bounds.

Forward: online softmax whose state starts at the sink (``m = sink[h]``, ``l = 1``), so the
sink is in the denominator with no value. For small grids (decode) the compressed blocks are
split across ``num_splits`` programs (flash-decoding) and combined with their log-sum-exps.
The forward also takes compressed entries as an FP8 cache holds them (``Fp8Entries``, forward
only): then queries, keys and the accumulator are handled in 64-wide column blocks, and each key
tile is decoded block by block (e4m3 codes x 2^exponent; the RoPE block as stored), never formed
as a whole row, with 16 query rows per program (32 at D=512 spill registers).

Backward (``lse`` saved by the forward, probabilities recomputed):
* dq: query-major like the forward.
* dkv (window keys) and dckv (HCA): key-major, one program per key block looping over the
  query rows that can see it (positions ``p..p+window-1``, resp. ``t >= (j+1)*ratio-1``), all
  heads; with few key blocks the positions are split across programs whose float32 partial sums
  are added afterwards (``_choose_key_splits``); deterministic, no atomics.
* dckv (CSA): the scattered top-k entries are accumulated inside the dq kernel: per key block
  ``G = (ds*scale)^T q + p^T do`` ([bk, D], a tensor-core matmul over the heads) is added to a
  float32 ``[N+1, D]`` buffer with ``atomic_add`` (row N absorbs the -1 slots). Races are
  resolved by the hardware atomics; the summation order, hence the last bits, is not
  deterministic. Interpret mode emulates an ``atomic_add`` as one read-add-write of the tile, which
  would keep only one of the rows of an entry repeated in a ``topk_idx`` row: there the repeats'
  rows are summed first (an entry repeated k times counts k times, as in the reference).

Block sizes (``choose_blocks``; not timed, no GPU was available): rows per program 64 (32 for
D=512, which keeps the f32 [rows, D] accumulator at 64 registers/thread with 8 warps), key tiles
of 64 rows (32 for D=512; smaller in the CSA dq kernel, which also forms the dckv rows), key-major
tiles of 32 keys x 32-64 query rows. They were chosen so that every kernel compiles for sm_90
without register spills, checked offline by compiling the emitted Triton IR with the Triton
compiler and ptxas (see docs/benchmarks.md). At D=512 these 32-row tiles compile to ``mma.sync``
only; 64 rows (all heads of a position) with q / keys / accumulator in 128-wide column blocks
(``bcol``) compile to Hopper ``wgmma``: without spills for the window and HCA forward, 16 bytes
for CSA's, 224 bytes for the dq kernels; the key-major kernels' sums with 64 keys and 16 query
rows per step, no spills. ``tiles`` sets such tilings for a benchmark to time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import FP8_BLOCK, Fp8Entries

_NEG_INIT = -1e30  # running max of a split that holds no sink (finite: avoids inf - inf)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes. Query-major kernels: bq positions x bh heads, key tiles of bk rows.
    Key-major kernels: bkv keys per program, query steps of bqk positions x bhk heads."""
    Hp: int
    Dp: int
    bq: int
    bh: int
    bk: int
    bkv: int
    bqk: int
    bhk: int
    bk_dq: int  # key tile of the dq kernel (smaller for CSA at D=512: it also forms dckv rows)
    num_warps: int
    num_stages: int = 2
    bcol: int = 0  # q (do), keys and the accumulators in column blocks of this width (0: whole rows)


# Tiles other than ``choose_blocks``'s, by (attention kind, "fwd" | "bwd"); set by ``tiles``.
_TILES: dict[tuple[str, str], dict] = {}


@contextlib.contextmanager
def tiles(mode: str, kernel: str, **fields):
    """Kernels of kind ``mode`` traced inside use these ``Blocks`` fields instead of
    ``choose_blocks``'s: ``kernel="fwd"`` the forward (``bq``, ``bh``, ``bk``, ``bcol``,
    ``num_warps``, ``num_stages``), ``"bwd"`` the backward (the dq kernel: ``bq``, ``bh``,
    ``bk_dq``; the key-major dkv / dckv kernels: ``bkv``, ``bqk``, ``bhk``; both: ``bcol``,
    ``num_warps``, ``num_stages``). ``benchmarks/attention.py --tiles`` times a tiling against the
    default in one run. Example, CSA at V4-Flash shapes with the 64 heads of a position in one
    program (each top-k row gathered once, not twice; sm_90 PTX with wgmma, offline):
    ``tiles("csa", "fwd", bh=64, bk=16, bcol=128, num_warps=8)``."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(Blocks)}
    if unknown:
        raise ValueError(f"tiles: unknown Blocks fields {sorted(unknown)}")
    if mode not in ("window", "hca", "csa") or kernel not in ("fwd", "bwd"):
        raise ValueError(f"tiles: mode must be window, hca or csa and kernel fwd or bwd, got {mode!r}, {kernel!r}")
    key = (mode, kernel)
    saved = _TILES.get(key)
    _TILES[key] = fields
    try:
        yield
    finally:
        if saved is None:
            del _TILES[key]
        else:
            _TILES[key] = saved


def _tiled_blocks(mode: str, kernel: str, H: int, D: int) -> Blocks:
    """``choose_blocks`` with the fields ``tiles`` set for this kernel."""
    blk = dataclasses.replace(choose_blocks(mode, H, D), **_TILES.get((mode, kernel), {}))
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0
    ok = (blk.Hp % blk.bh == 0 and pow2(blk.bh) and (blk.bq == 1 or mode != "csa")
          and (blk.bcol == 0 or (blk.Dp % blk.bcol == 0 and blk.bcol >= 16))
          and pow2(blk.bk) and pow2(blk.bk_dq) and (mode != "csa" or kernel != "bwd" or blk.bk_dq <= blk.bk))
    if not ok:
        raise ValueError(f"{kernel} tiles for {mode} at H={H}, D={D}: {blk} is not a tiling (bh must be a power "
                         f"of 2 dividing the padded heads {blk.Hp}, bcol 0 or >= 16 dividing the padded width "
                         f"{blk.Dp}, bq 1 for csa, bk and bk_dq powers of 2, for the csa backward bk_dq <= bk)")
    return blk


def choose_blocks(mode: str, H: int, D: int) -> Blocks:
    Dp = max(16, pl.next_power_of_2(D))
    rows = 64 if Dp <= 256 else 32
    Hp = pl.next_power_of_2(H)
    if mode == "csa":
        Hp = max(Hp, 16)  # one position per program: the heads alone must fill a dot (M >= 16)
    bh = min(Hp, rows)
    bq = 1 if mode == "csa" else max(1, rows // bh)
    bk = 64 if Dp <= 256 else 32
    bk_dq = bk if mode != "csa" or Dp <= 64 else (32 if Dp <= 256 else 16)
    rows_k = 64 if Dp <= 128 else 32           # key-major kernels: query rows per step
    bhk = min(Hp, rows_k)
    return Blocks(Hp=Hp, Dp=Dp, bq=bq, bh=bh, bk=bk, bkv=64 if Dp <= 64 else 32,
                  bqk=max(1, rows_k // bhk), bhk=bhk, bk_dq=bk_dq, num_warps=4 if Dp <= 128 else 8)


def _pad_to(x, shape, value=0):
    pads = [(0, n - s) for s, n in zip(x.shape, shape)]
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads, constant_values=value)


def _dot(a, b, prec, trans_a=False, trans_b=False):
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return lax.dot_general(a, b, (dims, ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def _dot_sum(as_, bs, prec, **kw):
    """sum_c _dot(as_[c], bs[c]): a matmul over column blocks (K split into blocks)."""
    out = None
    for a, b in zip(as_, bs):
        d = _dot(a, b, prec, **kw)
        out = d if out is None else out + d
    return out


def _precision(dtype):
    # float32 inputs: IEEE products (Triton would use TF32 otherwise).
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _gather_rows(ref, rows, Dp):
    """ref [R, Dp], rows [n] in range -> [n, Dp]."""
    return ref[rows[:, None], jnp.arange(Dp)[None, :]]


def fp8_blocked(c: int, rd: int, Dp: int) -> bool:
    """Whether FP8 entries of ``c`` code dims and ``rd`` RoPE dims can be decoded in the kernel:
    both whole 64-wide column blocks that fill ``Dp`` (V4: 448 + 64 = 512)."""
    return c % FP8_BLOCK == 0 and rd % FP8_BLOCK == 0 and c + rd == Dp


_I32_MAX = 2 ** 31 - 1


def int32_batch_rows(*arrays) -> int:
    """Batch rows per call such that Pallas Triton's offsets into these ``[B, ...]`` arrays fit int32.

    The Triton lowering indexes an operand of at most 2^32 bytes with int32 element offsets, which
    wrap negative past 2^31 - 1: a 1-byte operand (FP8 codes, packed FP4 keys) of 2-4 GiB would be read
    at wrong addresses. Those are split into calls over fewer batch rows (larger operands get int64
    offsets; wider dtypes stay under 2^31 elements).
    """
    B = arrays[0].shape[0]
    rows = B
    for a in arrays:
        if a.dtype.itemsize == 1 and _I32_MAX < a.size <= 2 ** 32:
            per_row = a.size // B
            if per_row > _I32_MAX:
                raise ValueError(f"a batch row of {per_row} one-byte elements ({a.shape}) is beyond the "
                                 f"int32 offsets of Pallas Triton")
            rows = min(rows, _I32_MAX // per_row)
    return rows


def by_batch_rows(fn, rows: int, *batched):
    """``fn(*batched)`` (each a ``[B, ...]`` pytree, or None) as calls over ``rows`` batch rows at a time,
    outputs (pytrees of ``[B, ...]`` arrays) concatenated."""
    B = jax.tree.leaves(batched)[0].shape[0]
    if rows >= B:
        return fn(*batched)
    outs = [fn(*jax.tree.map(lambda a: a[i:i + rows], batched)) for i in range(0, B, rows)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def _gather_cols(ref, rows, lo, w):
    """ref [R, ...], rows [n] in range -> columns lo ... lo+w-1 of those rows, [n, w]."""
    return ref[rows[:, None], lo + jnp.arange(w)[None, :]]


def _key_blocks(ref, rows, cols):
    """Key rows as a tuple of column blocks ``cols`` = ((lo, w), ...) of an array ref."""
    return tuple(_gather_cols(ref, rows, lo, w) for lo, w in cols)


def _entry_blocks(ckv_ref, rows, cols):
    """FP8 compressed entries ``rows`` decoded as the 64-wide column blocks ``cols`` (see
    ``fp8_blocked``); ``ckv_ref``: refs of e4m3 codes [R, c], int8 exponents [R, c/64], RoPE dims
    [R, rd]. Each code block is scaled by its row's exponent: one ``[n, 64]`` gather and one
    ``[n]`` gather per block, never a whole row."""
    codes_ref, exps_ref, rope_ref = ckv_ref
    c = codes_ref.shape[-1]
    out = []
    for lo, w in cols:
        if lo < c:
            e = exps_ref[rows, lo // FP8_BLOCK].astype(jnp.int32)
            scale = lax.bitcast_convert_type((e + 127) << 23, jnp.float32)          # 2^e
            codes = _gather_cols(codes_ref, rows, lo, w).astype(jnp.float32)
            out.append((codes * scale[:, None]).astype(rope_ref.dtype))
        else:
            out.append(_gather_cols(rope_ref, rows, lo - c, w))
    return tuple(out)


def _pos_rows(x, bq, bh):
    """[bq] per position -> [bq*bh] per query row (row = position * bh + head)."""
    return jnp.broadcast_to(x[:, None], (bq, bh)).reshape(bq * bh)


def _head_rows(x, bq, bh):
    """[bh] per head -> [bq*bh] per query row."""
    return jnp.broadcast_to(x[None, :], (bq, bh)).reshape(bq * bh)


def _key_loops(spec, blk, *, t0, t_row, kv_start, T, N, Kp, split, n_split, body, carry,
               kv_ref, ckv_ref, idx_ref, cols=None):
    """Run ``body(carry, keys [bk, Dp], valid [M, bk], csa_rows)`` over every key tile of a
    query tile: window tiles (split 0 only), then this split's share of the compressed tiles.
    With ``cols`` (column blocks ((lo, w), ...)) ``keys`` is a tuple of ``[bk, w]`` blocks."""
    bk, Dp, M = blk.bk, blk.Dp, blk.bq * blk.bh
    W = spec.window
    if cols is None:
        rows_of = lambda ref, rows: _gather_rows(ref, rows, Dp)
        entries_of = rows_of
    else:
        rows_of = lambda ref, rows: _key_blocks(ref, rows, cols)
        entries_of = (lambda ref, rows: _entry_blocks(ref, rows, cols)) if isinstance(ckv_ref, tuple) else rows_of

    def window_tile(w, carry):
        p = t0 - W + 1 + w * bk + jnp.arange(bk)          # key positions
        r = p - kv_start                                  # rows of kv
        keys = rows_of(kv_ref, jnp.clip(r, 0, T - 1))
        valid = ((p[None, :] <= t_row[:, None]) & (p[None, :] > t_row[:, None] - W)
                 & ((r >= 0) & (r < T))[None, :])
        return body(carry, keys, valid, None)

    n_w = pl.cdiv(W + blk.bq - 1, bk)
    if n_split > 1:
        # Window tiles only in split 0. Integer arithmetic, not jnp.where(split == 0, n_w, 0):
        # Pallas-Triton mis-lowers a select whose two branches are Python scalars (JAX 0.10.2).
        n_w = n_w * (1 - jnp.minimum(split, 1))
    carry = lax.fori_loop(0, n_w, window_tile, carry)
    if spec.mode == "window":
        return carry

    if spec.mode == "hca":
        n_valid = jnp.minimum(N, (t0 + blk.bq) // spec.ratio)  # entries seen by the last row
        n_c = lax.div(n_valid + bk - 1, bk)
    else:
        n_c = Kp // bk
    per = lax.div(n_c + n_split - 1, n_split)
    lo = split * per
    hi = jnp.minimum(n_c, lo + per)

    def comp_tile(c, carry):
        if spec.mode == "hca":
            j = c * bk + jnp.arange(bk)
            keys = entries_of(ckv_ref, jnp.minimum(j, N - 1))
            valid = ((j[None, :] + 1) * spec.ratio <= t_row[:, None] + 1) & (j < N)[None, :]
            return body(carry, keys, valid, None)
        idx = idx_ref[pl.ds(c * bk, bk)]
        ok = (idx >= 0) & (idx < N)  # -1 slots; an index past the entries (a caller's bug) reads nothing
        keys = entries_of(ckv_ref, jnp.where(ok, idx, 0))
        valid = jnp.broadcast_to(ok[None, :], (M, bk))
        return body(carry, keys, valid, jnp.where(ok, idx, N))

    return lax.fori_loop(lo, hi, comp_tile, carry)


def _unpack(refs, mode, n_tail, n_ckv=1):
    """Split kernel refs into (pos, q, kv, ckv|None, idx|None, *tail); ckv is a tuple of refs for
    FP8 entries (``n_ckv = 3``)."""
    pos, q, kv, *rest = refs
    ckv = idx = None
    if mode != "window":
        ckv, rest = (rest[0] if n_ckv == 1 else tuple(rest[:n_ckv])), rest[n_ckv:]
    if mode == "csa":
        idx, *rest = rest
    assert len(rest) == n_tail
    return pos, q, kv, ckv, idx, rest


def _fwd_kernel(*refs, spec, blk, T, N, Kp, n_split, n_ckv):
    pos_ref, q_ref, kv_ref, ckv_ref, idx_ref, tail = _unpack(refs, spec.mode, 3, n_ckv)
    sink_ref, o_ref, lse_ref = tail
    bq, bh, Dp = blk.bq, blk.bh, blk.Dp
    M = bq * bh
    i, hb = pl.program_id(1), pl.program_id(2)
    split = pl.program_id(3) if n_split > 1 else 0
    q_start, kv_start = pos_ref[0], pos_ref[1]
    t0 = q_start + i * bq
    t_row = _pos_rows(t0 + jnp.arange(bq), bq, bh)
    sink_row = _head_rows(sink_ref[hb * bh + jnp.arange(bh)], bq, bh)
    # In column blocks (scores summed over blocks, one accumulator per block): FP8 entries in
    # 64-wide ones, so that a key tile is decoded block by block; else ``blk.bcol`` wide
    fp8 = isinstance(ckv_ref, tuple)
    width = FP8_BLOCK if fp8 else (blk.bcol or Dp)
    cols = tuple((lo, width) for lo in range(0, Dp, width))
    blocked = fp8 or len(cols) > 1
    qs = tuple(q_ref[:, :, pl.ds(lo, w)].reshape(M, w) for lo, w in cols)
    prec = _precision(qs[0].dtype)

    def body(carry, keys, valid, _):
        m, l, acc = carry
        keys = keys if blocked else (keys,)
        s = jnp.where(valid, _dot_sum(qs, keys, prec, trans_b=True) * spec.scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = tuple(a * alpha[:, None] + _dot(p.astype(kb.dtype), kb, prec) for a, kb in zip(acc, keys))
        return m_new, l, acc

    m0, l0 = sink_row, jnp.ones((M,), jnp.float32)
    if n_split > 1:  # the sink and the window belong to split 0
        m0 = jnp.where(split == 0, m0, jnp.full((M,), _NEG_INIT, jnp.float32))
        l0 = jnp.where(split == 0, l0, jnp.zeros((M,), jnp.float32))
    carry = (m0, l0, tuple(jnp.zeros((M, w), jnp.float32) for _, w in cols))
    m, l, acc = _key_loops(spec, blk, t0=t0, t_row=t_row, kv_start=kv_start, T=T, N=N, Kp=Kp,
                           split=split, n_split=n_split, body=body, carry=carry,
                           kv_ref=kv_ref, ckv_ref=ckv_ref, idx_ref=idx_ref, cols=cols if blocked else None)
    l_safe = jnp.where(l > 0, l, 1.0)
    for (lo, w), a in zip(cols, acc):
        o_ref[:, :, pl.ds(lo, w)] = (a / l_safe[:, None]).reshape(bq, bh, w).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf).reshape(bq, bh)


def _choose_splits(spec, blk, B, Sp, N, Kp):
    """Split the compressed keys across programs when the grid alone cannot fill an H100."""
    programs = B * (Sp // blk.bq) * (blk.Hp // blk.bh)
    n_c = pl.cdiv(N, blk.bk) if spec.mode == "hca" else Kp // blk.bk
    if spec.mode == "window" or programs >= 264 or n_c < 4:
        return 1
    return int(min(pl.cdiv(264, programs), n_c // 2, 32))


def _prepare(spec, blk, q, kv, ckv, topk_idx, sink):
    """Pad to kernel shapes: q [B,Sp,Hp,Dp], kv [B,T,Dp], ckv [B,N,Dp], idx [B,S,Kp] (-1), sink [Hp]."""
    B, S, H, D = q.shape
    Sp = pl.cdiv(S, blk.bq) * blk.bq
    qp = _pad_to(q, (B, Sp, blk.Hp, blk.Dp))
    kvp = _pad_to(kv, (B, kv.shape[1], blk.Dp))
    if isinstance(ckv, Fp8Entries):  # read by gathers with clamped columns: no padding
        ckvp = tuple(ckv)
    else:
        ckvp = None if ckv is None else (_pad_to(ckv, (B, ckv.shape[1], blk.Dp)),)
    idxp = None
    if topk_idx is not None:
        Kp = pl.cdiv(topk_idx.shape[2], blk.bk) * blk.bk
        idxp = _pad_to(topk_idx, (B, S, Kp), value=-1)
    return qp, kvp, ckvp, idxp, _pad_to(sink, (blk.Hp,))


def _shared_specs(spec, blk, T, N, Kp, ckv_widths=None):
    """BlockSpecs of (pos, q, kv[, ckv...][, idx]) for a grid (b, i, hb, ...); ``ckv_widths``:
    the last dims of the compressed-entry arrays (default one of ``Dp``)."""
    specs = [pl.BlockSpec((2,), lambda *g: (0,)),
             pl.BlockSpec((None, blk.bq, blk.bh, blk.Dp), lambda b, i, h, *_: (b, i, h, 0)),
             pl.BlockSpec((None, T, blk.Dp), lambda b, *_: (b, 0, 0))]
    if spec.mode != "window":
        specs += [pl.BlockSpec((None, N, w), lambda b, *_: (b, 0, 0)) for w in (ckv_widths or (blk.Dp,))]
    if spec.mode == "csa":
        specs.append(pl.BlockSpec((None, None, Kp), lambda b, i, *_: (b, i, 0)))
    return specs


def forward(spec, q, kv, ckv, topk_idx, sink, pos, num_splits=None):
    """Returns (o [B,S,H,D] in q.dtype, lse [B,S,H] f32). ckv may be ``Fp8Entries`` (decoded per
    key tile; the backward kernels take arrays only)."""
    B, S, H, D = q.shape
    if isinstance(ckv, Fp8Entries) and int32_batch_rows(*ckv) < B:
        return by_batch_rows(lambda *a: forward(spec, *a[:4], sink, pos, num_splits), int32_batch_rows(*ckv),
                             q, kv, ckv, topk_idx)
    blk = _tiled_blocks(spec.mode, "fwd", H, D)
    if isinstance(ckv, Fp8Entries):
        # 16 query rows per program: with the per-block accumulators and decoding, 32 rows at
        # D=512 spill registers on sm_90 (checked offline, see test_triton_sm90_compile.py)
        blk = dataclasses.replace(blk, bq=1, bh=min(blk.bh, 16))
    qp, kvp, ckvp, idxp, sinkp = _prepare(spec, blk, q, kv, ckv, topk_idx, sink)
    Sp, T = qp.shape[1], kv.shape[1]
    N = 0 if ckv is None else ckvp[0].shape[1]
    Kp = 0 if idxp is None else idxp.shape[2]
    n_split = num_splits or _choose_splits(spec, blk, B, Sp, N, Kp)
    grid = (B, Sp // blk.bq, blk.Hp // blk.bh) + ((n_split,) if n_split > 1 else ())
    if n_split > 1:
        out_shape = [jax.ShapeDtypeStruct((n_split, B, Sp, blk.Hp, blk.Dp), jnp.float32),
                     jax.ShapeDtypeStruct((n_split, B, Sp, blk.Hp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, blk.bq, blk.bh, blk.Dp),
                                  lambda b, i, h, s: (s, b, i, h, 0)),
                     pl.BlockSpec((None, None, blk.bq, blk.bh), lambda b, i, h, s: (s, b, i, h))]
    else:
        out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype),
                     jax.ShapeDtypeStruct((B, Sp, blk.Hp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, blk.bq, blk.bh, blk.Dp), lambda b, i, h: (b, i, h, 0)),
                     pl.BlockSpec((None, blk.bq, blk.bh), lambda b, i, h: (b, i, h))]
    widths = None if ckvp is None else tuple(x.shape[2] for x in ckvp)
    kernel = functools.partial(_fwd_kernel, spec=spec, blk=blk, T=T, N=N, Kp=Kp, n_split=n_split,
                               n_ckv=len(widths or (0,)))
    args = [pos, qp, kvp, *(ckvp or ())] + ([idxp] if idxp is not None else []) + [sinkp]
    o, lse = pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape, out_specs=out_specs,
        in_specs=_shared_specs(spec, blk, T, N, Kp, widths) + [pl.BlockSpec((blk.Hp,), lambda *g: (0,))],
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=spec.interpret, name=f"v4_{spec.mode}_attention_fwd")(*args)
    if n_split > 1:  # combine the splits (flash-decoding)
        lse_all = jax.nn.logsumexp(lse, axis=0)
        o = jnp.sum(jnp.exp(lse - lse_all)[..., None] * o, axis=0).astype(q.dtype)
        lse = lse_all
    return o[:, :S, :H, :D], lse[:, :S, :H]


def _dq_kernel(*refs, spec, blk, T, N, Kp):
    csa = spec.mode == "csa"
    pos_ref, q_ref, kv_ref, ckv_ref, idx_ref, tail = _unpack(refs, spec.mode, 6 if csa else 4)
    if csa:  # the f32 dckv accumulator is aliased: tail = (..., acc_in, dq_out, acc_out)
        do_ref, lse_ref, delta_ref, _, dq_ref, acc_ref = tail
    else:
        do_ref, lse_ref, delta_ref, dq_ref = tail
    bq, bh, Dp = blk.bq, blk.bh, blk.Dp
    M = bq * bh
    i = pl.program_id(1)
    q_start, kv_start = pos_ref[0], pos_ref[1]
    t0 = q_start + i * bq
    t_row = _pos_rows(t0 + jnp.arange(bq), bq, bh)
    # q, do, keys and dq in column blocks of blk.bcol (scores summed over the blocks)
    width = blk.bcol or Dp
    cols = tuple((lo, width) for lo in range(0, Dp, width))
    qs = tuple(q_ref[:, :, pl.ds(lo, w)].reshape(M, w) for lo, w in cols)
    dos = tuple(do_ref[:, :, pl.ds(lo, w)].reshape(M, w) for lo, w in cols)
    lse = lse_ref[...].reshape(M)
    delta = delta_ref[...].reshape(M)
    prec = _precision(qs[0].dtype)

    def body(dq, keys, valid, csa_rows):
        keys = keys if len(cols) > 1 else (keys,)
        s = _dot_sum(qs, keys, prec, trans_b=True) * spec.scale
        p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot_sum(dos, keys, prec, trans_b=True)
        ds = p * (dp - delta[:, None])
        if csa_rows is not None:  # scatter this tile's dckv rows (row N absorbs -1 slots)
            dss, ps = (ds * spec.scale).astype(qs[0].dtype), p.astype(qs[0].dtype)
            # Interpret mode emulates the atomics as one read-add-write of the tile, so an entry
            # repeated in the tile would keep one of its rows: each repeat gets their sum instead.
            same = (csa_rows[:, None] == csa_rows[None, :]).astype(jnp.float32) if spec.interpret else None
            for (lo, w), qc, dc in zip(cols, qs, dos):
                g = _dot(dss, qc, prec, trans_a=True) + _dot(ps, dc, prec, trans_a=True)
                if same is not None:
                    g = _dot(same, g, lax.Precision.HIGHEST)
                plgpu.atomic_add(acc_ref, (csa_rows[:, None], lo + jnp.arange(w)[None, :]), g)
        return tuple(a + _dot(ds.astype(kc.dtype), kc, prec) for a, kc in zip(dq, keys))

    dq = _key_loops(spec, dataclasses.replace(blk, bk=blk.bk_dq), t0=t0, t_row=t_row,
                    kv_start=kv_start, T=T, N=N, Kp=Kp, split=0, n_split=1, body=body,
                    carry=tuple(jnp.zeros((M, w), jnp.float32) for _, w in cols),
                    kv_ref=kv_ref, ckv_ref=ckv_ref, idx_ref=idx_ref, cols=cols if len(cols) > 1 else None)
    for (lo, w), a in zip(cols, dq):
        dq_ref[:, :, pl.ds(lo, w)] = (a * spec.scale).reshape(bq, bh, w).astype(dq_ref.dtype)


def _dkv_kernel(pos_ref, q_ref, src_ref, do_ref, lse_ref, delta_ref, out_ref, *, spec, source,
                blk, S, R, n_split):
    """d(src) rows [kb*bkv, (kb+1)*bkv) of kv (source "window") or ckv ("hca"), all heads, from
    this program's share (``n_split`` > 1: program axis 2) of the query positions that see them.

    q_ref, do_ref: [Sp*Hp, Dp] (row = position * Hp + head); lse_ref, delta_ref: [Sp*Hp]."""
    bkv, bqk, bhk, Dp, Hp = blk.bkv, blk.bqk, blk.bhk, blk.Dp, blk.Hp
    Mk = bqk * bhk
    Sp = q_ref.shape[0] // Hp
    kb = pl.program_id(1)
    q_start, kv_start = pos_ref[0], pos_ref[1]
    j = kb * bkv + jnp.arange(bkv)
    # keys, q, do and the accumulator in column blocks of blk.bcol
    width = blk.bcol or Dp
    cols = tuple((lo, width) for lo in range(0, Dp, width))
    keys = _key_blocks(src_ref, jnp.minimum(j, R - 1), cols)
    prec = _precision(keys[0].dtype)
    if source == "window":  # positions p see queries p ... p+window-1
        p0 = kv_start + kb * bkv
        s_lo = jnp.maximum(p0 - q_start, 0)
        s_hi = jnp.minimum(S, p0 + bkv + spec.window - 1 - q_start)
    else:  # entry j is seen by t >= (j+1)*ratio - 1
        s_lo = jnp.maximum((kb * bkv + 1) * spec.ratio - 1 - q_start, 0)
        s_hi = S
    if n_split > 1:  # this program's share, whole steps of bqk positions
        per = lax.div(lax.div(jnp.maximum(s_hi - s_lo, 0) + n_split - 1, n_split) + bqk - 1, bqk) * bqk
        s_lo = s_lo + pl.program_id(2) * per
        s_hi = jnp.minimum(s_hi, s_lo + per)
    n_hb = Hp // bhk
    n_steps = jnp.maximum(lax.div(s_hi - s_lo + bqk - 1, bqk), 0) * n_hb

    def step(it, acc):
        s_idx = s_lo + lax.div(it, n_hb) * bqk + jnp.arange(bqk)   # query positions (relative)
        h = lax.rem(it, n_hb) * bhk + jnp.arange(bhk)
        rows = (jnp.minimum(s_idx, Sp - 1)[:, None] * Hp + h[None, :]).reshape(Mk)
        qr, dor = _key_blocks(q_ref, rows, cols), _key_blocks(do_ref, rows, cols)
        lse, delta = lse_ref[rows], delta_ref[rows]
        t = _pos_rows(q_start + s_idx, bqk, bhk)[:, None]
        ok = _pos_rows(s_idx < S, bqk, bhk)[:, None] & (j < R)[None, :]
        if source == "window":
            pk = (kv_start + j)[None, :]
            ok = ok & (pk <= t) & (pk > t - spec.window)
        else:
            ok = ok & ((j[None, :] + 1) * spec.ratio <= t + 1)
        p = jnp.where(ok, jnp.exp(_dot_sum(qr, keys, prec, trans_b=True) * spec.scale - lse[:, None]), 0.0)
        ds = (p * (_dot_sum(dor, keys, prec, trans_b=True) - delta[:, None]) * spec.scale).astype(qr[0].dtype)
        p = p.astype(qr[0].dtype)
        return tuple(a + _dot(ds, qc, prec, trans_a=True) + _dot(p, dc, prec, trans_a=True)
                     for a, qc, dc in zip(acc, qr, dor))

    acc = lax.fori_loop(0, n_steps, step, tuple(jnp.zeros((bkv, w), jnp.float32) for _, w in cols))
    for (lo, w), a in zip(cols, acc):
        out_ref[:, pl.ds(lo, w)] = a.astype(out_ref.dtype)


def _choose_key_splits(source, spec, blk, B, S, R):
    """Programs per key block of the key-major backward. An HCA entry is seen by every later
    query, so with few entries (S / ratio) a program per key block leaves the GPU idle (H100,
    S = 4K: one program for 32 entries looping over all 262K query rows). Split the query
    positions across programs until about two per SM, each keeping >= 64 positions; the
    float32 partial sums are added afterwards (deterministic, no atomics)."""
    programs = B * pl.cdiv(R, blk.bkv)
    span = S if source == "hca" else blk.bkv + spec.window - 1
    if programs >= 264:
        return 1
    return int(max(1, min(pl.cdiv(264, programs), span // 64)))


def _key_major(spec, source, blk, qp, src, dop, lsep, deltap, pos, S):
    """d(src) for src = kv (window) or ckv (HCA): [B, R, Dp] in src.dtype."""
    B, Sp = qp.shape[:2]
    R = src.shape[1]
    Rp = pl.cdiv(R, blk.bkv) * blk.bkv
    rows = Sp * blk.Hp
    n_split = _choose_key_splits(source, spec, blk, B, S, R)
    full_q = pl.BlockSpec((None, rows, blk.Dp), lambda b, k, *_: (b, 0, 0))
    full_stat = pl.BlockSpec((None, rows), lambda b, k, *_: (b, 0))
    if n_split > 1:  # float32 partial sums per split, added below
        out_spec = pl.BlockSpec((None, None, blk.bkv, blk.Dp), lambda b, k, s: (s, b, k, 0))
        out_shape = jax.ShapeDtypeStruct((n_split, B, Rp, blk.Dp), jnp.float32)
    else:
        out_spec = pl.BlockSpec((None, blk.bkv, blk.Dp), lambda b, k: (b, k, 0))
        out_shape = jax.ShapeDtypeStruct((B, Rp, blk.Dp), src.dtype)
    out = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, source=source, blk=blk, S=S, R=R, n_split=n_split),
        grid=(B, Rp // blk.bkv) + ((n_split,) if n_split > 1 else ()),
        in_specs=[pl.BlockSpec((2,), lambda *g: (0,)), full_q,
                  pl.BlockSpec((None, R, blk.Dp), lambda b, k, *_: (b, 0, 0)), full_q, full_stat, full_stat],
        out_specs=out_spec, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=spec.interpret, name=f"v4_{source}_attention_dkv")(
            pos, qp.reshape(B, rows, blk.Dp), src, dop.reshape(B, rows, blk.Dp),
            lsep.reshape(B, rows), deltap.reshape(B, rows))
    if n_split > 1:
        out = jnp.sum(out, axis=0).astype(src.dtype)
    return out[:, :R]


def backward(spec, q, kv, ckv, topk_idx, sink, pos, lse, delta, do, parts=("dq", "dkv", "dckv")):
    """(dq, dkv, dckv|None) given lse, delta = sum(o*do) [B,S,H] f32 and do [B,S,H,D].

    ``parts`` (benchmarks: one kernel at a time) names the kernels to run, the others' results are
    None: "dq" (with CSA also dckv, formed in the same kernel), "dkv" (window keys, key-major),
    "dckv" (HCA, key-major)."""
    B, S, H, D = q.shape
    blk = _tiled_blocks(spec.mode, "bwd", H, D)
    qp, kvp, ckvp, idxp, _ = _prepare(spec, blk, q, kv, ckv, topk_idx, sink)
    ckvp = None if ckvp is None else ckvp[0]   # an array: FP8 entries are forward only
    Sp, T = qp.shape[1], kv.shape[1]
    N = 0 if ckv is None else ckv.shape[1]
    Kp = 0 if idxp is None else idxp.shape[2]
    dop = _pad_to(do, qp.shape)
    lsep = _pad_to(lse, (B, Sp, blk.Hp), value=jnp.inf)   # padded rows: probability 0
    deltap = _pad_to(delta, (B, Sp, blk.Hp))

    stat = pl.BlockSpec((None, blk.bq, blk.bh), lambda b, i, h: (b, i, h))
    qspec = pl.BlockSpec((None, blk.bq, blk.bh, blk.Dp), lambda b, i, h: (b, i, h, 0))
    in_specs = _shared_specs(spec, blk, T, N, Kp) + [qspec, stat, stat]
    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype)]
    out_specs = [qspec]
    args = [pos, qp, kvp] + [x for x in (ckvp, idxp) if x is not None] + [dop, lsep, deltap]
    aliases = {}
    if spec.mode == "csa":
        acc_spec = pl.BlockSpec((None, N + 1, blk.Dp), lambda b, i, h: (b, 0, 0))
        in_specs.append(acc_spec)
        out_specs.append(acc_spec)
        out_shape.append(jax.ShapeDtypeStruct((B, N + 1, blk.Dp), jnp.float32))
        aliases = {len(args): 1}
        args.append(jnp.zeros((B, N + 1, blk.Dp), jnp.float32))
    dq = dkv = dckv = None
    if "dq" in parts:
        outs = pl.pallas_call(
            functools.partial(_dq_kernel, spec=spec, blk=blk, T=T, N=N, Kp=Kp),
            grid=(B, Sp // blk.bq, blk.Hp // blk.bh), in_specs=in_specs, out_specs=out_specs,
            out_shape=out_shape, input_output_aliases=aliases,
            compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
            interpret=spec.interpret, name=f"v4_{spec.mode}_attention_dq")(*args)
        dq = outs[0][:, :S, :H, :D]
        if spec.mode == "csa":
            dckv = outs[1][:, :N, :D].astype(ckv.dtype)
    if "dkv" in parts:
        dkv = _key_major(spec, "window", blk, qp, kvp, dop, lsep, deltap, pos, S)[..., :D]
    if "dckv" in parts and spec.mode == "hca":
        dckv = _key_major(spec, "hca", blk, qp, ckvp, dop, lsep, deltap, pos, S)[..., :D]
    return dq, dkv, dckv
