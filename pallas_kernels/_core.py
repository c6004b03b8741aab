"""Shared entry machinery for the V4 attention kernels: validation, backend choice, custom_vjp.

One differentiable function, ``attention``, serves the three layer kinds (``Spec.mode``):
``window`` (window only), ``hca`` (window + every compressed entry ``j < (t+1)//ratio``) and
``csa`` (window + the compressed entries named by ``topk_idx``). The public entry points in
``sparse_attention.py`` and ``compressed_attention.py`` build a ``Spec`` and call it.

Backends: ``triton`` (Pallas on GPU, ``_triton.py``), ``mosaic`` (Pallas on TPU,
``_mosaic.py``); both run anywhere with ``interpret=True``. ``xla`` routes to
``reference.py`` and is used only when the caller asks for it.

Gradients (flash-attention style): the forward saves ``lse [B, S, H]`` (log of the softmax
denominator, sink included); the backward recomputes the probabilities. With
``delta = Σ_d o·do`` the sink gradient is ``d sink[h] = -Σ_{b,s} exp(sink[h] - lse) · delta``
(the sink's probability times the derivative of the output w.r.t. the denominator), computed
here in plain JAX; dq / dkv / dckv come from the backend's Pallas kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference
from pallas_kernels.reference import FP8_BLOCK, Fp8Entries

MODES = ("window", "hca", "csa")
BACKENDS = ("triton", "mosaic", "xla")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one attention call (hashable: a custom_vjp non-diff argument)."""
    mode: str          # "window" | "hca" | "csa"
    window: int        # keys t-window < p <= t
    ratio: int         # HCA compression ratio (0 for other modes)
    scale: float       # score scale, usually head_dim ** -0.5
    backend: str       # "triton" | "mosaic"
    interpret: bool    # run the Pallas kernel in interpret mode
    picked: int = 0    # CSA over ``pick_rows`` output: query s's picks are rows s*picked ... (s+1)*picked-1


_TARGET: list[str] = []  # set by ``target_platform``


@contextlib.contextmanager
def target_platform(name: str):
    """Trace for platform ``name`` ("tpu" | "gpu" | "cpu") instead of ``jax.default_backend()``: the
    kernels (and the model's choices that depend on the platform) are picked for it, so a program can
    be compiled ahead of time for devices this process does not have (``train.py --compile-only``)."""
    if name not in ("tpu", "gpu", "cpu"):
        raise ValueError(f"target platform must be tpu, gpu or cpu, got {name!r}")
    _TARGET.append(name)
    try:
        yield
    finally:
        _TARGET.pop()


def platform() -> str:
    """The platform being traced for: ``target_platform``'s, else ``jax.default_backend()``."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """Pick the kernel family: explicit ``backend`` wins; else by ``platform()``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    target = platform()
    if target == "gpu":
        return "triton"
    if target == "tpu":
        return "mosaic"
    if interpret:
        return "triton"
    raise ValueError(
        f"The Pallas attention kernels need a GPU or TPU, but the default JAX backend is "
        f"{target!r}. Pass interpret=True to run the kernel in Pallas interpret mode, or "
        f"backend='xla' to use the plain-JAX reference explicitly.")


def _static_int(x):
    """The Python int value of ``x`` if it is concrete, else None."""
    try:
        return int(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def validate(mode, q, kv, ckv, topk_idx, sink, *, window, ratio, q_start, kv_start):
    """Check shapes and dtypes at the boundary; raise with the offending name and values."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, H, D], got shape {q.shape}")
    B, S, H, D = q.shape
    fp8 = isinstance(ckv, Fp8Entries)
    if fp8:
        _validate_fp8(ckv, B, D)
    for name, x in (("q", q), ("kv", kv), ("ckv", ckv.rope if fp8 else ckv)):
        if x is not None and x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {x.dtype}")
    if kv.ndim != 3 or kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"kv must be [B={B}, T, D={D}], got shape {kv.shape}")
    if sink.shape != (H,) or not jnp.issubdtype(sink.dtype, jnp.floating):
        raise ValueError(f"sink must be a float array [H={H}], got {sink.dtype} {sink.shape}")
    if not _is_int(window) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if mode != "window" and not fp8:
        if getattr(ckv, "ndim", None) != 3 or ckv.shape[0] != B or ckv.shape[2] != D:
            raise ValueError(f"ckv must be [B={B}, N, D={D}], got shape {getattr(ckv, 'shape', ckv)}")
    if mode == "hca" and (not _is_int(ratio) or ratio < 1):
        raise ValueError(f"ratio must be an int >= 1, got {ratio!r}")
    if mode == "csa":
        if topk_idx.ndim != 3 or topk_idx.shape[:2] != (B, S) or topk_idx.shape[2] < 1:
            raise ValueError(f"topk_idx must be [B={B}, S={S}, K>=1], got shape {topk_idx.shape}")
        if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
            raise ValueError(f"topk_idx must be an integer array, got {topk_idx.dtype}")
        if not isinstance(topk_idx, jax.core.Tracer):  # concrete: its values are checked too
            N = (ckv.codes if fp8 else ckv).shape[1]
            idx = np.asarray(topk_idx)
            bad = np.argwhere((idx < -1) | (idx >= N))
            if len(bad):
                raise ValueError(f"topk_idx must hold indices 0 ... N-1 into ckv (N={N}) or -1, got "
                                 f"{idx[tuple(bad[0])]} at {tuple(int(i) for i in bad[0])}")
    qs, ks = _static_int(q_start), _static_int(kv_start)
    if qs is not None and qs < 0:
        raise ValueError(f"q_start must be >= 0, got {qs}")
    if ks is not None and ks < 0:
        raise ValueError(f"kv_start must be >= 0, got {ks}")
    if qs is not None and ks is not None and ks + kv.shape[1] < qs + S:
        raise ValueError(
            f"kv must cover every query position: kv_start + T = {ks + kv.shape[1]} < "
            f"q_start + S = {qs + S}")
    if qs is not None and ks is not None and ks > max(0, qs - window + 1):
        raise ValueError(
            f"kv must cover the first query's window: kv_start = {ks} > max(0, q_start - window + 1) "
            f"= {max(0, qs - window + 1)}")


def _is_int(x) -> bool:
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def _validate_fp8(ckv: Fp8Entries, B: int, D: int):
    codes, exps, rope = ckv
    if codes.ndim != 3 or codes.shape[0] != B or rope.ndim != 3 or rope.shape[:2] != codes.shape[:2]:
        raise ValueError(f"Fp8Entries.codes and .rope must be [B={B}, N, ...] with the same N, got shapes "
                         f"{codes.shape} and {rope.shape}")
    if codes.shape[2] + rope.shape[2] != D:
        raise ValueError(f"Fp8Entries: codes ({codes.shape[2]} dims) + rope ({rope.shape[2]} dims) must make "
                         f"D={D}")
    want = codes.shape[:2] + (-(-codes.shape[2] // FP8_BLOCK),)
    if exps.shape != want:
        raise ValueError(f"Fp8Entries.exps must be {want} (one per {FP8_BLOCK} dims), got shape {exps.shape}")
    if codes.dtype != jnp.float8_e4m3fn or exps.dtype != jnp.int8:
        raise ValueError(f"Fp8Entries must hold float8_e4m3fn codes and int8 exponents, got "
                         f"({codes.dtype}, {exps.dtype})")


def pick_rows(ckv, topk_idx, dtype=None):
    """The rows of ``ckv`` (``[B, N, ...]``, or ``Fp8Entries``) that ``topk_idx [B, S, K]`` names, in
    top-k order, and the indices renumbered into them: -> (``[B, S*K, ...]``, ``[B, S, K]``). A float
    array's rows come in ``dtype`` (default ckv's); their gradient w.r.t. ckv sums in float32."""
    B, S, K = topk_idx.shape
    flat = jnp.maximum(topk_idx.reshape(B, S * K), 0)
    if isinstance(ckv, Fp8Entries):  # a decoding cache: no gradient
        picked = jax.tree.map(lambda a: jnp.take_along_axis(a, flat[..., None], axis=1), ckv)
    else:
        picked = _take_rows(ckv, flat, dtype or ckv.dtype)
    slots = jnp.arange(S * K, dtype=topk_idx.dtype).reshape(S, K)
    return picked, jnp.where(topk_idx >= 0, slots, -1)


_SCATTER_BYTES = 1 << 25  # float32 row gradients converted at a time by ``pick_rows``'s backward


def _take_rows(table, flat, dtype):
    """``table[b, flat[b, i]]`` in ``dtype``: [B, N, ...], [B, M] -> [B, M, ...]. The table is
    converted before the gather (same values; a float32 table gives no float32 rows). The gradient
    is XLA's scatter-add, but in float32 and rounded once to the table's dtype: an entry picked by
    many queries sums their terms in float32, not bf16."""
    B, M = flat.shape
    # XLA converts all of a scatter's updates to float32 before it (M x D x 4 bytes, 512 MiB for an
    # 8K-query chunk of ``csa_in_chunks``): the backward adds them p rows at a time instead.
    shape, table_dtype = table.shape, table.dtype
    p = max(1, min(M, _SCATTER_BYTES // (B * math.prod(shape[2:]) * 4)))

    @jax.custom_vjp
    def take(table, flat):
        return jnp.take_along_axis(table.astype(dtype), flat[..., None], axis=1)

    def bwd(flat, d_rows):
        def add(d, rows, idx):
            return d.at[jnp.arange(B)[:, None], idx].add(rows.astype(jnp.float32))

        piece = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * p, p, axis=1)
        d = jax.lax.fori_loop(0, M // p, lambda i, d: add(d, piece(d_rows, i), piece(flat, i)),
                              jnp.zeros(shape, jnp.float32))
        if M % p:  # the rows after the last whole piece
            d = add(d, d_rows[:, M - M % p:], flat[:, M - M % p:])
        return d.astype(table_dtype), None

    take.defvjp(lambda table, flat: (take(table, flat), flat), bwd)
    return take(table, flat)


def dequant_for(mode, ckv: Fp8Entries, topk_idx, dtype):
    """FP8 entries as an array for kernels that do not decode them: all rows (HCA), or for CSA
    only the picked rows when they are fewer (decoding), renumbered in top-k order:
    -> (ckv ``[B, N', D]``, topk_idx)."""
    if mode == "csa" and topk_idx.shape[1] * topk_idx.shape[2] < ckv.codes.shape[1]:
        ckv, topk_idx = pick_rows(ckv, topk_idx)
    return reference.dequant_fp8_entries(ckv, dtype), topk_idx


def _gpu_converts_fp8() -> bool:
    """Whether the GPU has FP8 conversions (compute capability 8.9: Ada, Hopper and later; Triton
    aborts the process on older ones). Tracing for a GPU this process does not have (ahead-of-time
    compilation) assumes one that has."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
    if not cc:
        return True
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return (major, minor) >= (8, 9)


def _triton_decodes(ckv: Fp8Entries, D: int) -> bool:
    from pallas_kernels import _triton
    return (_triton.fp8_blocked(ckv.codes.shape[-1], ckv.rope.shape[-1], _triton.choose_blocks("hca", 1, D).Dp)
            and _gpu_converts_fp8())


def _backend_module(name):
    if name == "triton":
        from pallas_kernels import _triton
        return _triton
    from pallas_kernels import _mosaic
    return _mosaic


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(spec: Spec, q, kv, ckv, topk_idx, sink, pos):
    """o [B, S, H, D] for ``spec``; ``pos`` = int32 [q_start, kv_start] (kv[:, i] is position kv_start+i)."""
    return _backend_module(spec.backend).forward(spec, q, kv, ckv, topk_idx, sink, pos)[0]


def _attention_fwd(spec, q, kv, ckv, topk_idx, sink, pos):
    o, lse = _backend_module(spec.backend).forward(spec, q, kv, ckv, topk_idx, sink, pos)
    return o, (q, kv, ckv, topk_idx, sink, pos, o, lse)


def _attention_bwd(spec, res, do):
    q, kv, ckv, topk_idx, sink, pos, o, lse = res
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, S, H]
    p_sink = jnp.exp(sink.astype(jnp.float32)[None, None, :] - lse)          # sink probability
    dsink = -jnp.sum(p_sink * delta, axis=(0, 1)).astype(sink.dtype)
    dq, dkv, dckv = _backend_module(spec.backend).backward(
        spec, q, kv, ckv, topk_idx, sink, pos, lse, delta, do)
    return dq, dkv, dckv, None, dsink, None


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_fp8(spec: Spec, q, kv, ckv: Fp8Entries, topk_idx, sink, pos):
    """``attention`` over FP8 compressed entries (a decoding cache): forward only."""
    return _backend_module(spec.backend).forward(spec, q, kv, ckv, topk_idx, sink, pos)[0]


def _attention_fp8_fwd(spec, q, kv, ckv, topk_idx, sink, pos):
    return attention_fp8(spec, q, kv, ckv, topk_idx, sink, pos), None


def _attention_fp8_bwd(spec, res, do):
    raise ValueError("attention over FP8 compressed entries (Fp8Entries, a decoding cache) has no "
                     "gradient: pass the entries as a float array to differentiate")


attention_fp8.defvjp(_attention_fp8_fwd, _attention_fp8_bwd)


_CHUNK_BYTES = 1 << 28  # picked rows gathered at a time by ``csa_in_chunks`` (per device)
_PLAN_BYTES = 1 << 18   # the Mosaic CSA kernel's query plan, in SMEM (about 1 MiB on a TPU core)


def tpu_csa_chunk(q, kv, ckv, topk_idx) -> int:
    """Queries per chunk for ``csa_in_chunks``, or 0 where the Mosaic kernel's dense visit of the
    entries is cheaper. A query block of ``bq`` positions visits about as many entries as a query
    sees (``N (T - S/2) / T`` for a causal prefill); over gathered picks it visits ``bq * K`` rows,
    plus the gather's traffic: chunks pay once that is under half the entries. A batch of
    sequences whose dense query plan would not fit ``_PLAN_BYTES`` of SMEM is chunked too."""
    from pallas_kernels._mosaic import choose_blocks, plan_bytes

    B, S, H, D = q.shape
    K, N, T = topk_idx.shape[2], ckv.shape[1], kv.shape[1]
    bq = choose_blocks(H).bq
    if 2 * bq * K >= N * (T - S / 2) / T and plan_bytes(B, S, H) <= _PLAN_BYTES:
        return 0
    per_query = B * K * D * ckv.dtype.itemsize
    chunk = min(_CHUNK_BYTES // per_query, _PLAN_BYTES * bq // plan_bytes(B, bq, H))
    return max(bq, chunk // bq * bq)


def csa_in_chunks(spec: Spec, q, kv, ckv, topk_idx, sink, pos, chunk: int):
    """CSA (Mosaic) over a long prefill as ``lax.map`` over chunks of ``chunk`` queries: each chunk
    attends to its own gathered picks (``pick_rows``, ``Spec.picked``) and to the kv rows its
    window reaches, so the work is O(S*K) rather than O(S*N). The backward pass recomputes each
    chunk's gather and forward (the gathered rows, S*K*D in all, are never saved). d(ckv) sums in
    float32, within a chunk (``pick_rows``) and across chunks, and is rounded to ckv's dtype once (an
    8K-query chunk at 128K context, V4-Flash shapes, compiled for v5p: 0.69 GiB of temporaries,
    0.63 GiB with the sums in bf16)."""
    B, S, H, D = q.shape
    T, K = kv.shape[1], topk_idx.shape[2]
    n = -(-S // chunk)
    L = min(chunk + spec.window - 1, T)
    spec = dataclasses.replace(spec, picked=K)

    def split(x, value=0):  # [B, S, ...] -> [n, B, chunk, ...]; padded queries pick nothing
        x = jnp.pad(x, [(0, 0), (0, n * chunk - S)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    firsts = pos[0] + jnp.arange(n, dtype=jnp.int32) * chunk           # first query position
    starts = jnp.clip(firsts - pos[1] - spec.window + 1, 0, T - L)      # first kv row it reaches
    kv_rows = jnp.moveaxis(jnp.take(kv, starts[:, None] + jnp.arange(L), axis=1), 1, 0)

    # The chunks close over ckv in float32, so the scan's backward sums their d(ckv) in float32 (and
    # rounds it once, transposing this cast); their rows are gathered in ckv's dtype (XLA gathers
    # them from ckv itself: the round trip through float32 is simplified away).
    ckv32 = ckv.astype(jnp.float32)

    @jax.checkpoint  # the backward recomputes a chunk's gather and forward: nothing of S*K*D is saved
    def one(args):
        q_c, kv_c, idx_c, first, start = args
        rows, slots = pick_rows(ckv32, idx_c, ckv.dtype)
        return attention(spec, q_c, kv_c, rows, slots, sink, jnp.stack([first, pos[1] + start]))

    o = jax.lax.map(one, (split(q), kv_rows, split(topk_idx, -1), firsts, starts))
    return jnp.moveaxis(o, 0, 1).reshape(B, n * chunk, H, D)[:, :S]


def run(mode, q, kv, ckv, topk_idx, sink, *, window, ratio, scale, q_start, kv_start,
        interpret, backend):
    """Validate, choose the backend and call ``attention`` (or the reference for ``xla``)."""
    validate(mode, q, kv, ckv, topk_idx, sink, window=window, ratio=ratio,
             q_start=q_start, kv_start=kv_start)
    backend = resolve_backend(backend, interpret)
    fp8 = mode != "window" and isinstance(ckv, Fp8Entries)
    if fp8 and not (backend == "triton" and _triton_decodes(ckv, q.shape[-1])):
        # only the Triton forward decodes FP8 entries itself, in whole 64-wide blocks, on GPUs with FP8
        ckv, topk_idx = dequant_for(mode, ckv, topk_idx, jnp.result_type(q, kv, ckv.rope))
        fp8 = False
    if backend == "xla":
        kw = dict(window=window, scale=scale, q_start=q_start, kv_start=kv_start)
        if mode == "csa":
            return reference.sparse_attention(q, kv, ckv, topk_idx, sink, **kw)
        if mode == "hca":
            return reference.compressed_attention(q, kv, ckv, sink, ratio=ratio, **kw)
        return reference.window_attention(q, kv, sink, **kw)
    picked = 0
    if (mode == "csa" and backend == "mosaic"
            and topk_idx.shape[1] * topk_idx.shape[2] < ckv.shape[1]):
        # The TPU kernels visit the entries between a query block's smallest and largest pick
        # densely: with fewer picks than entries (decoding, short chunks of a long context), the
        # picked rows gathered first are fewer bytes and fewer tiles (the gather's gradient is a
        # float32 scatter-add into ckv), and each query block's picks are its own consecutive rows.
        ckv, topk_idx = pick_rows(ckv, topk_idx)
        picked = topk_idx.shape[2]
    if mode != "window" and jax.tree.leaves(ckv)[0].shape[1] == 0:
        mode = "window"  # no complete compressed entry yet (S < ratio): d ckv is then empty
    ckv = None if mode == "window" else ckv
    topk_idx = topk_idx.astype(jnp.int32) if mode == "csa" else None
    spec = Spec(mode=mode, window=int(window), ratio=int(ratio) if mode == "hca" else 0,
                scale=float(scale), backend=backend, interpret=bool(interpret), picked=picked)
    pos = jnp.stack([jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_start, jnp.int32)])
    # Mixed dtypes compute in the promoted type, like the reference; the output has q's dtype.
    dt = jnp.result_type(*(x for x in (q, kv, ckv.rope if fp8 else ckv) if x is not None))
    cast = lambda x: None if x is None else x.astype(dt)
    if fp8:
        o = attention_fp8(spec, cast(q), cast(kv), ckv._replace(rope=cast(ckv.rope)), topk_idx,
                          sink.astype(jnp.float32), pos)
    else:
        args = (cast(q), cast(kv), cast(ckv), topk_idx, sink.astype(jnp.float32), pos)
        long_tpu_csa = mode == "csa" and backend == "mosaic" and not picked
        chunk = tpu_csa_chunk(q, kv, args[2], topk_idx) if long_tpu_csa else 0
        o = csa_in_chunks(spec, *args, chunk) if chunk else attention(spec, *args)
    return o.astype(q.dtype)
