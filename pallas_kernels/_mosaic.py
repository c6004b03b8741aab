"""Pallas Mosaic (TPU) kernels for window / HCA / CSA attention: forward, dq, dkv, dckv.

TPU kernels cannot gather rows from VMEM cheaply, so this family works on dense, aligned tiles:
* Query rows: ``bq`` positions x all ``Hp`` heads (``q`` viewed as ``[B, S*Hp, D]``, a free
  reshape), ``M = bq*Hp`` rows per program (a multiple of 128).
* Keys: tiles of ``bk = 128`` rows of ``kv`` (the window span) or ``ckv``, delivered by
  BlockSpec pipelining along the last ("arbitrary") grid axis; which tiles a program needs is
  computed from the positions in the index maps (``_query_tiles``) or, where it depends on the
  top-k rows or for the key-major kernels, up front in XLA (``_plan_*``) and scalar-prefetched
  (SMEM, about 1 MiB: sized per query block, not per query), so index maps only clamp and skipped
  steps re-use the resident tile (no DMA).
* Scores are kept transposed, ``sT = k @ q^T : [bk, M]``, so per-row statistics (max, sum,
  lse) are lane vectors ``[1, M]``; the output accumulator is ``[D, M]`` and is transposed once.
* HCA masks ``j < (t+1)//ratio``. CSA multiplies each entry's probability by its multiplicity
  in the query's top-k row (computed in-kernel by comparing the tile's entry ids with the
  ``[bq, K]`` index block), i.e. it visits the tiles between the smallest and largest selected
  entry of the query block densely. That costs O(S*N) instead of O(S*K) MXU work (TPU
  trade-off: no per-row gather), but needs no atomics: dckv is key-major and deterministic.
  With fewer picks than entries (decoding), ``_core.run`` gathers the picked rows first, and for
  a long prefill it runs chunks of queries over their gathered picks (``_core.csa_in_chunks``);
  then a query block's picks are its own consecutive rows (``Spec.picked``) and the grids' tile
  axes are sized for those, not for every entry.

Backward: dq query-major (as the forward); dkv / dckv key-major, one program per key tile
looping over the query blocks that see it (window: positions p..p+window-1; HCA: queries
t >= (j+1)*ratio-1; CSA: the query blocks whose top-k rows mention the tile).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_BK = 128  # key tile rows


@dataclasses.dataclass(frozen=True)
class Blocks:
    Hp: int   # heads padded to a power of two
    bq: int   # query positions per program (>= 8, bq * Hp >= 128)
    bk: int = _BK

    @property
    def M(self):
        return self.bq * self.Hp

    @property
    def log2_hp(self):
        return self.Hp.bit_length() - 1


def choose_blocks(H: int) -> Blocks:
    Hp = pl.next_power_of_2(H)
    return Blocks(Hp=Hp, bq=max(8, 128 // Hp))


def _pad_to(x, shape, value=0):
    pads = [(0, n - s) for s, n in zip(x.shape, shape)]
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads, constant_values=value)


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, contract, prec):
    return lax.dot_general(a, b, (contract, ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


_NT = ((1,), (1,))   # a @ b^T
_TN = ((0,), (0,))   # a^T @ b


def _row_positions(blk, first_pos):
    """[1, M] int32: query position of every row of a block starting at ``first_pos``."""
    r = lax.broadcasted_iota(jnp.int32, (1, blk.M), 1)
    return first_pos + lax.shift_right_logical(r, blk.log2_hp)


def _topk_counts(idx_ref, j, blk):
    """[bk, M] f32: how many times entry j (tile rows) appears in each row's top-k list."""
    rowpos = _row_positions(blk, 0)

    def add_position(r, cnt):
        ids = idx_ref[pl.ds(r, 1), :]                                          # [1, K]
        c = jnp.sum(jnp.where(ids == j, 1.0, 0.0), axis=1, keepdims=True)    # [bk, 1]
        return cnt + jnp.where(rowpos == r, c, 0.0)

    return lax.fori_loop(0, blk.bq, add_position, jnp.zeros((blk.bk, blk.M), jnp.float32))


def _key_mask(spec, source, blk, j, t, *, kv_start, R, idx_ref):
    """(valid [bk, M] bool, weight [bk, M] f32 | None) for key tile rows j [bk, 1], positions t [1, M]."""
    shape = (blk.bk, blk.M)
    jm, tm = jnp.broadcast_to(j, shape), jnp.broadcast_to(t, shape)
    if source == "window":
        p = jm + kv_start
        return (p <= tm) & (p > tm - spec.window) & (jm < R), None
    if source == "hca":
        return ((jm + 1) * spec.ratio <= tm + 1) & (jm < R), None
    cnt = _topk_counts(idx_ref, j, blk)
    return cnt > 0.0, cnt


# ----------------------------------------------------------------------------- planning (XLA)

def _query_tiles(spec, blk, pos_ref, tab_ref, b, i, *, S, T, N, nqb):
    """Key tiles a query block needs, [w_lo, w_hi) of kv and [c_lo, c_hi) of ckv: closed forms of the
    block's positions, except CSA's compressed tiles (from its top-k rows, ``_plan_csa``). Computed in
    the kernel and index maps, so no table grows with the sequence (SMEM is about 1 MiB)."""
    q_start, kv_start = pos_ref[0], pos_ref[1]
    t0 = q_start + i * blk.bq
    t1 = jnp.minimum(t0 + blk.bq - 1, q_start + S - 1)
    div = lambda x, d: lax.div(x, jnp.int32(d))  # operands >= 0: truncation is floor, and no sign op
    w_lo = div(jnp.maximum(t0 - spec.window + 1 - kv_start, 0), blk.bk)
    w_hi = div(jnp.maximum(jnp.minimum(t1 - kv_start, T - 1), 0), blk.bk) + 1
    if spec.mode == "hca":
        c_lo, c_hi = 0, div(jnp.minimum(N, div(t1 + 1, spec.ratio)) + blk.bk - 1, blk.bk)
    elif spec.mode == "csa":
        base = (b * nqb + i) * 2
        c_lo, c_hi = tab_ref[base], tab_ref[base + 1]
    else:
        c_lo = c_hi = 0
    return w_lo, w_hi, c_lo, c_hi


def _plan_csa(blk, B, N, idxp):
    """int32 [B*nqb*2]: per CSA query block, the compressed tiles [c_lo, c_hi) its top-k rows span
    (a placeholder for other modes)."""
    if idxp is None:
        return jnp.zeros((1,), jnp.int32)
    blocks = idxp.reshape(B, idxp.shape[1] // blk.bq, -1)
    ok = blocks >= 0
    mn = jnp.min(jnp.where(ok, blocks, N), axis=-1)
    mx = jnp.max(jnp.where(ok, blocks, -1), axis=-1)
    any_ok = mx >= 0
    c_lo = jnp.where(any_ok, mn // blk.bk, 0)
    c_hi = jnp.where(any_ok, mx // blk.bk + 1, 0)
    return jnp.stack([c_lo, c_hi], axis=-1).astype(jnp.int32).reshape(-1)


def plan_bytes(B: int, S: int, H: int) -> int:
    """Bytes of CSA's scalar-prefetched query plan (``_plan_csa``) for B x S queries of H heads."""
    return 8 * B * pl.cdiv(S, choose_blocks(H).bq)


def _plan_keys(spec, source, blk, B, S, R, nqb, idxp, pos):
    """int32 [nkb*2] ([B*nkb*2] for CSA): per key tile, the query blocks [q_lo, q_hi) that can see it."""
    q_start, kv_start = pos[0], pos[1]
    nkb = pl.cdiv(R, blk.bk)
    j0 = jnp.arange(nkb) * blk.bk
    last_q = q_start + S - 1
    if source == "window":
        lo = jnp.maximum(kv_start + j0, q_start)
        hi = jnp.minimum(kv_start + jnp.minimum(j0 + blk.bk, R) - 1 + spec.window - 1, last_q)
        q_lo, q_hi = (lo - q_start) // blk.bq, (hi - q_start) // blk.bq + 1
    elif source == "hca":
        lo = jnp.maximum((j0 + 1) * spec.ratio - 1, q_start)
        hi = jnp.full_like(lo, last_q)
        q_lo, q_hi = (lo - q_start) // blk.bq, jnp.full_like(lo, nqb)
    else:
        ok = idxp >= 0
        tile = jnp.where(ok, idxp // blk.bk, nkb)                     # nkb = dummy bucket
        qblk = jnp.broadcast_to((jnp.arange(idxp.shape[1]) // blk.bq)[None, :, None], idxp.shape)
        bidx = jnp.broadcast_to(jnp.arange(B)[:, None, None], idxp.shape)
        lo_t = jnp.full((B, nkb + 1), nqb, jnp.int32).at[bidx, tile].min(qblk)[:, :nkb]
        hi_t = jnp.full((B, nkb + 1), -1, jnp.int32).at[bidx, tile].max(qblk)[:, :nkb]
        lo, hi = lo_t, hi_t
        q_lo, q_hi = lo_t, hi_t + 1
    empty = lo > hi
    q_lo, q_hi = jnp.where(empty, 0, q_lo), jnp.where(empty, 0, q_hi)
    return jnp.stack(jnp.broadcast_arrays(q_lo, q_hi), axis=-1).astype(jnp.int32).reshape(-1)


def _clamped(lo, step, hi):
    """Tile index lo+step clamped into [lo, max(hi-1, lo)] (skipped steps keep the last tile)."""
    return jnp.minimum(jnp.maximum(lo + step, lo), jnp.maximum(hi - 1, lo))


# ----------------------------------------------------------------------------- query-major kernels

def _query_major_kernel(pos_ref, tab_ref, *refs, spec, blk, n_w, n_steps, S, T, N, nqb, bwd):
    """Forward (bwd=False) or dq (bwd=True) for one block of M query rows."""
    refs = list(refs)
    q_ref, kv_ref = refs.pop(0), refs.pop(0)
    ckv_ref = refs.pop(0) if spec.mode != "window" else None
    idx_ref = refs.pop(0) if spec.mode == "csa" else None
    if bwd:
        do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
    else:
        sink_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_start, kv_start = pos_ref[0], pos_ref[1]
    w_lo, w_hi, c_lo, c_hi = _query_tiles(spec, blk, pos_ref, tab_ref, b, i, S=S, T=T, N=N, nqb=nqb)
    t = _row_positions(blk, q_start + i * blk.bq)
    q = q_ref[...]
    prec = _precision(q.dtype)

    @pl.when(c == 0)
    def _init():
        if bwd:
            dq_sc[...] = jnp.zeros_like(dq_sc)
        else:
            m_sc[...] = sink_ref[...]          # the sink: m = sink, l = exp(sink - m) = 1
            l_sc[...] = jnp.ones_like(l_sc)
            acc_sc[...] = jnp.zeros_like(acc_sc)

    def visit(keys, valid, weight):
        sT = _dot(keys, q, _NT, prec) * spec.scale                       # [bk, M]
        if bwd:
            p = jnp.where(valid, jnp.exp(sT - lse_ref[...]), 0.0)
            p = p if weight is None else p * weight
            ds = p * (_dot(keys, do_ref[...], _NT, prec) - delta_ref[...])
            dq_sc[...] += _dot(keys, ds.astype(keys.dtype), _TN, prec)   # [D, M]
            return
        s = jnp.where(valid, sT, -jnp.inf)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=0, keepdims=True))
        p = jnp.exp(s - m_new)
        p = p if weight is None else p * weight
        alpha = jnp.exp(m_old - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=0, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(keys, p.astype(keys.dtype), _TN, prec)
        m_sc[...] = m_new

    w = w_lo + c

    @pl.when((c < n_w) & (w < w_hi))
    def _window():
        j = w * blk.bk + lax.broadcasted_iota(jnp.int32, (blk.bk, 1), 0)
        valid, _ = _key_mask(spec, "window", blk, j, t, kv_start=kv_start, R=T, idx_ref=None)
        visit(kv_ref[...], valid, None)

    if spec.mode != "window":
        cc = c_lo + c - n_w

        @pl.when((c >= n_w) & (cc < c_hi))
        def _compressed():
            j = cc * blk.bk + lax.broadcasted_iota(jnp.int32, (blk.bk, 1), 0)
            valid, weight = _key_mask(spec, spec.mode, blk, j, t, kv_start=kv_start, R=N,
                                      idx_ref=idx_ref)
            visit(ckv_ref[...], valid, weight)

    @pl.when(c == n_steps - 1)
    def _finish():
        if bwd:
            dq_ref[...] = (dq_sc[...] * spec.scale).T.astype(dq_ref.dtype)
        else:
            l = l_sc[...]
            o_ref[...] = (acc_sc[...] / l).T.astype(o_ref.dtype)
            lse_ref[...] = m_sc[...] + jnp.log(l)


def _prepare(spec, blk, q, kv, ckv, topk_idx, D):
    B, S, H, _ = q.shape
    Sp = pl.cdiv(S, blk.bq) * blk.bq
    q2 = _pad_to(q, (B, Sp, blk.Hp, D)).reshape(B, Sp * blk.Hp, D)
    kvp = _pad_to(kv, (B, pl.cdiv(kv.shape[1], blk.bk) * blk.bk, D))
    ckvp = None if ckv is None else _pad_to(ckv, (B, pl.cdiv(ckv.shape[1], blk.bk) * blk.bk, D))
    idxp = None
    if topk_idx is not None:
        idxp = _pad_to(topk_idx, (B, Sp, pl.cdiv(topk_idx.shape[2], 128) * 128), value=-1)
    return q2, kvp, ckvp, idxp


def _query_major_call(spec, blk, q2, kvp, ckvp, idxp, pos, tab, extra, extra_specs, out_shape,
                      out_specs, scratch, *, S, T, N, bwd):
    B, rows, D = q2.shape
    nqb = rows // blk.M
    n_w = pl.cdiv(spec.window + blk.bq - 1, blk.bk) + 1
    n_c = 0 if ckvp is None else ckvp.shape[1] // blk.bk
    if spec.picked:  # a block's picks: its bq*K consecutive rows, at most this many tiles
        n_c = min(n_c, pl.cdiv(blk.bq * spec.picked, blk.bk) + 1)
    n_steps = n_w + n_c

    tiles = functools.partial(_query_tiles, spec, blk, S=S, T=T, N=N, nqb=nqb)

    def kv_map(b, i, c, pos_ref, tab_ref):
        w_lo, w_hi, _, _ = tiles(pos_ref, tab_ref, b, i)
        return b, _clamped(w_lo, c, w_hi), 0

    def ckv_map(b, i, c, pos_ref, tab_ref):
        _, _, c_lo, c_hi = tiles(pos_ref, tab_ref, b, i)
        return b, _clamped(c_lo, c - n_w, c_hi), 0

    in_specs = [pl.BlockSpec((None, blk.M, D), lambda b, i, c, *_: (b, i, 0)),
                pl.BlockSpec((None, blk.bk, D), kv_map)]
    args = [q2, kvp]
    if ckvp is not None:
        in_specs.append(pl.BlockSpec((None, blk.bk, D), ckv_map))
        args.append(ckvp)
    if idxp is not None:
        in_specs.append(pl.BlockSpec((None, blk.bq, idxp.shape[2]), lambda b, i, c, *_: (b, i, 0)))
        args.append(idxp)
    kernel = functools.partial(_query_major_kernel, spec=spec, blk=blk, n_w=n_w, n_steps=n_steps,
                               S=S, T=T, N=N, nqb=nqb, bwd=bwd)
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, nqb, n_steps), in_specs=in_specs + extra_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=spec.interpret,
        name=f"v4_{spec.mode}_attention_{'dq' if bwd else 'fwd'}")(pos, tab, *args, *extra)


def _stat_spec(blk):
    return pl.BlockSpec((None, 1, blk.M), lambda b, i, c, *_: (b, 0, i))


def forward(spec, q, kv, ckv, topk_idx, sink, pos):
    """Returns (o [B,S,H,D] in q.dtype, lse [B,S,H] f32)."""
    B, S, H, D = q.shape
    blk = choose_blocks(H)
    T, N = kv.shape[1], 0 if ckv is None else ckv.shape[1]
    q2, kvp, ckvp, idxp = _prepare(spec, blk, q, kv, ckv, topk_idx, D)
    tab = _plan_csa(blk, B, N, idxp)
    sink_rows = jnp.tile(_pad_to(sink, (blk.Hp,)), blk.bq)[None, :]
    rows = q2.shape[1]
    o2, lse = _query_major_call(
        spec, blk, q2, kvp, ckvp, idxp, pos, tab, [sink_rows],
        [pl.BlockSpec((1, blk.M), lambda *_: (0, 0))],
        [jax.ShapeDtypeStruct(q2.shape, q.dtype), jax.ShapeDtypeStruct((B, 1, rows), jnp.float32)],
        [pl.BlockSpec((None, blk.M, D), lambda b, i, c, *_: (b, i, 0)), _stat_spec(blk)],
        [pltpu.VMEM((1, blk.M), jnp.float32), pltpu.VMEM((1, blk.M), jnp.float32),
         pltpu.VMEM((D, blk.M), jnp.float32)], S=S, T=T, N=N, bwd=False)
    o = o2.reshape(B, -1, blk.Hp, D)[:, :S, :H]
    return o, lse.reshape(B, -1, blk.Hp)[:, :S, :H]


# ----------------------------------------------------------------------------- key-major kernel

def _key_major_kernel(pos_ref, tab_ref, src_ref, q_ref, do_ref, lse_ref, delta_ref, *refs,
                      spec, source, blk, n_q, S, R, nkb):
    """d(src) for one tile of bk source rows, accumulated over the query blocks that see it."""
    idx_ref, out_ref, acc_sc = refs if source == "csa" else (None, *refs)
    b, kb, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_start, kv_start = pos_ref[0], pos_ref[1]
    base = ((b if source == "csa" else 0) * nkb + kb) * 2
    qb = tab_ref[base] + c

    @pl.when(c == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(qb < tab_ref[base + 1])
    def _visit():
        keys, q, do = src_ref[...], q_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        t = _row_positions(blk, q_start + qb * blk.bq)
        j = kb * blk.bk + lax.broadcasted_iota(jnp.int32, (blk.bk, 1), 0)
        valid, weight = _key_mask(spec, source, blk, j, t, kv_start=kv_start, R=R, idx_ref=idx_ref)
        valid = valid & (jnp.broadcast_to(t, valid.shape) < q_start + S)
        p = jnp.where(valid, jnp.exp(_dot(keys, q, _NT, prec) * spec.scale - lse_ref[...]), 0.0)
        p = p if weight is None else p * weight
        ds = p * (_dot(keys, do, _NT, prec) - delta_ref[...]) * spec.scale
        acc_sc[...] += (lax.dot_general(ds.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                                        precision=prec, preferred_element_type=jnp.float32)
                        + lax.dot_general(p.astype(q.dtype), do, (((1,), (0,)), ((), ())),
                                          precision=prec, preferred_element_type=jnp.float32))

    @pl.when(c == n_q - 1)
    def _finish():
        out_ref[...] = acc_sc[...].astype(out_ref.dtype)


def _key_major_call(spec, source, blk, srcp, q2, do2, lse2, delta2, idxp, pos, *, S, R):
    B, rows, D = q2.shape
    nqb = rows // blk.M
    nkb = srcp.shape[1] // blk.bk
    n_q = pl.cdiv(blk.bk + spec.window - 1, blk.bq) + 1 if source == "window" else nqb
    if source == "csa" and spec.picked:  # a tile's rows belong to consecutive queries: few blocks
        n_q = min(nqb, pl.cdiv(blk.bk, blk.bq * spec.picked) + 1)
    tab = _plan_keys(spec, source, blk, B, S, R, nqb, idxp, pos)

    def qblock(b, k, c, pos_ref, tab_ref):
        base = ((b if source == "csa" else 0) * nkb + k) * 2
        return _clamped(tab_ref[base], c, tab_ref[base + 1])

    qspec = pl.BlockSpec((None, blk.M, D), lambda b, k, c, p, t: (b, qblock(b, k, c, p, t), 0))
    sspec = pl.BlockSpec((None, 1, blk.M), lambda b, k, c, p, t: (b, 0, qblock(b, k, c, p, t)))
    in_specs = [pl.BlockSpec((None, blk.bk, D), lambda b, k, c, *_: (b, k, 0)), qspec, qspec,
                sspec, sspec]
    args = [srcp, q2, do2, lse2, delta2]
    if source == "csa":
        in_specs.append(pl.BlockSpec((None, blk.bq, idxp.shape[2]),
                                     lambda b, k, c, p, t: (b, qblock(b, k, c, p, t), 0)))
        args.append(idxp)
    kernel = functools.partial(_key_major_kernel, spec=spec, source=source, blk=blk, n_q=n_q,
                               S=S, R=R, nkb=nkb)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(srcp.shape, srcp.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, nkb, n_q), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, blk.bk, D), lambda b, k, c, *_: (b, k, 0)),
            scratch_shapes=[pltpu.VMEM((blk.bk, D), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=spec.interpret, name=f"v4_{source}_attention_dkv")(pos, tab, *args)
    return out[:, :R]


def backward(spec, q, kv, ckv, topk_idx, sink, pos, lse, delta, do):
    """(dq, dkv, dckv|None) given lse, delta = sum(o*do) [B,S,H] f32 and do [B,S,H,D]."""
    B, S, H, D = q.shape
    blk = choose_blocks(H)
    T, N = kv.shape[1], 0 if ckv is None else ckv.shape[1]
    q2, kvp, ckvp, idxp = _prepare(spec, blk, q, kv, ckv, topk_idx, D)
    Sp = q2.shape[1] // blk.Hp
    do2 = _pad_to(do, (B, Sp, blk.Hp, D)).reshape(q2.shape)
    lse2 = _pad_to(lse, (B, Sp, blk.Hp), value=jnp.inf).reshape(B, 1, -1)  # padded rows: p = 0
    delta2 = _pad_to(delta, (B, Sp, blk.Hp)).reshape(B, 1, -1)
    tab = _plan_csa(blk, B, N, idxp)
    dq2 = _query_major_call(
        spec, blk, q2, kvp, ckvp, idxp, pos, tab, [do2, lse2, delta2],
        [pl.BlockSpec((None, blk.M, D), lambda b, i, c, *_: (b, i, 0)), _stat_spec(blk), _stat_spec(blk)],
        jax.ShapeDtypeStruct(q2.shape, q.dtype),
        pl.BlockSpec((None, blk.M, D), lambda b, i, c, *_: (b, i, 0)),
        [pltpu.VMEM((D, blk.M), jnp.float32)], S=S, T=T, N=N, bwd=True)
    dq = dq2.reshape(B, Sp, blk.Hp, D)[:, :S, :H]
    dkv = _key_major_call(spec, "window", blk, kvp, q2, do2, lse2, delta2, None, pos, S=S, R=T)
    dckv = None
    if spec.mode != "window":
        dckv = _key_major_call(spec, spec.mode, blk, ckvp, q2, do2, lse2, delta2, idxp, pos, S=S, R=N)
    return dq, dkv, dckv
