"""Benchmark the V4 attention kernels (CSA / HCA / window, lightning indexer) against the plain-JAX references.

V4-Flash shapes: H=64 query heads, one KV head, D=512, window 128, CSA top-k 512 over ratio-4
entries, HCA ratio 128, bfloat16. Rows: prefill at S = 4K, 16K, 64K (forward and backward),
decode at batch 1/8/64 and context 16K/128K/1M (forward; one query per row against its last
``window`` kv rows and the compressed cache).

Decode rows time one call as the mean of ``--decode-chain`` calls chained in one jitted loop (each
call's query depends on the previous output), so that the ~0.1 ms dispatch of a single jitted
call does not hide the kernel; the loop adds one small elementwise pass over q per call.

Columns: median time after warm-up (``block_until_ready``), useful TFLOP/s, the fraction of
the compute floor (FLOPs / peak) and of the memory floor (minimal bytes / bandwidth) that the
time achieves, the XLA reference time and the kernel speed-up. Backward = (forward+backward) -
forward, timed the same way for kernel and reference. FLOPs count only the keys a query really
attends to (4*D per query-head-key forward, 2.5x that backward); minimal bytes count every
input read once and every output written once.

Kind ``indexer``: top-k selection (``indexer_topk``, IH=64 heads of ID=128, top-k 512 over the
ratio-4 entries; forward only: indices have no gradient) against the chunked XLA reference
(``backend="xla"``, what ``attention_impl: xla`` runs). FLOPs: 2*ID*IH per query and visible
entry; bytes: q, w, the keys and the indices. Decode rows come twice: bf16 keys, and ``fp4``
keys as ``--kv-cache fp8`` stores them (68 bytes a key, decoded inside the kernel; the reference
dequantises them first). CSA and HCA decode rows come twice too: bf16 entries, and ``fp8`` entries
as ``--kv-cache fp8`` stores them (e4m3 + exponents + bf16 RoPE dims, decoded inside the kernel
where the dims are whole 64-wide blocks; the reference dequantises them first).

``--tiles KIND.KERNEL:FIELD=N,...`` (Triton, repeatable; KERNEL fwd or bwd) adds ``fwd+`` and
``bwd+`` rows after each prefill row of that kind, and ``fwd+`` after its bf16 decode rows (fwd
tiles; FP8 entries keep 16 heads per program): the same passes with those tiles
(``_triton.tiles``), timed in the same run, e.g. ``--tiles csa.fwd:bh=64,bk=16,bcol=128,num_warps=8``.

Usage:  python benchmarks/attention.py            # on a GPU/TPU (full table)
        python benchmarks/attention.py --smoke    # tiny shapes, Pallas interpret mode, any CPU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import _triton
from pallas_kernels import reference as ref

H100_BF16_FLOPS = 740e12   # dense bf16 matmul peak used as the compute floor
H100_HBM_BYTES = 2.5e12    # HBM bandwidth used as the memory floor
CSA_RATIO = 4


def _time(fn, *args, reps):
    """Median seconds of fn(*args) after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _topk(key, B, S, K, q_start, N):
    """[B, S, K] distinct causal entries spread over j < (t+1)//4 (all of them when fewer than K)."""
    t = q_start + jnp.arange(S)[:, None]
    n = jnp.minimum((t + 1) // CSA_RATIO, N)                    # available entries [S, 1]
    k = jnp.arange(K)[None, :]
    width = jnp.maximum(n // K, 1)
    jitter = jax.random.randint(key, (B, S, K), 0, 2 ** 30) % width
    idx = jnp.where(n >= K, k * width + jitter, jnp.broadcast_to(k, (B, S, K)))
    return jnp.where(idx < n, idx, -1).astype(jnp.int32)


def _keys_per_query(kind, cfg, t):
    """Keys attended by a query at position(s) t (numpy int64)."""
    n = np.minimum(t + 1, cfg["window"])
    if kind == "csa":
        n = n + np.minimum(cfg["topk"], (t + 1) // CSA_RATIO)
    elif kind == "hca":
        n = n + (t + 1) // cfg["ratio"]
    return n


def _n_compressed(kind, cfg, T):
    return {"csa": T // CSA_RATIO, "hca": T // cfg["ratio"], "window": 0}[kind]


def _fp8_row_bytes(D):
    """Bytes of one compressed entry as ``--kv-cache fp8`` stores it (RoPE dims D/8 in bf16)."""
    rd = D // 8
    return (D - rd) + -(-(D - rd) // 64) + 2 * rd


def _flops_bytes(kind, cfg, B, S, T, q_start, decode, fp8=False):
    """(forward FLOPs, backward FLOPs, forward min bytes, backward min bytes); ``fp8``: the
    compressed entries in the FP8 cache form."""
    H, D, K = cfg["heads"], cfg["dim"], cfg["topk"]
    e = 2  # bf16
    keys = int(_keys_per_query(kind, cfg, q_start + np.arange(S, dtype=np.int64)).sum())
    fwd = 4 * B * H * D * keys
    N = _n_compressed(kind, cfg, T)
    q_bytes = B * S * H * D * e
    kv_rows = cfg["window"] if decode else T
    c_rows = min(N, K) if (kind == "csa" and decode) else N
    kv_bytes = B * kv_rows * D * e + B * c_rows * (_fp8_row_bytes(D) if fp8 else D * e)
    idx_bytes = B * S * K * 4 if kind == "csa" else 0
    fwd_bytes = 2 * q_bytes + kv_bytes + idx_bytes + B * S * H * 4          # q, o, kv+ckv, idx, lse
    bwd_bytes = 4 * q_bytes + 2 * kv_bytes + idx_bytes + 2 * B * S * H * 4  # q,o,do,dq; kv,dkv; lse,delta
    return fwd, 2.5 * fwd, fwd_bytes, bwd_bytes


def _prefill_case(kind, cfg, S, key):
    B, H, D, W = 1, cfg["heads"], cfg["dim"], cfg["window"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    dt = jnp.bfloat16
    q = jax.random.normal(k1, (B, S, H, D), dt)
    kv = jax.random.normal(k2, (B, S, D), dt)
    ckv = jax.random.normal(k3, (B, max(_n_compressed(kind, cfg, S), 1), D), dt)
    sink = jnp.zeros((H,), jnp.float32)
    idx = _topk(k4, B, S, cfg["topk"], 0, ckv.shape[1]) if kind == "csa" else None
    kw = dict(window=W, scale=D ** -0.5)
    if kind == "hca":
        kw["ratio"] = cfg["ratio"]

    def make(impl, **extra):
        def f(q, kv, ckv, sink):
            if kind == "csa":
                return impl.sparse_attention(q, kv, ckv, idx, sink, **kw, **extra)
            if kind == "hca":
                return impl.compressed_attention(q, kv, ckv, sink, **kw, **extra)
            return impl.window_attention(q, kv, sink, **kw, **extra)
        return f
    return (q, kv, ckv, sink), make, idx


def _backward_parts(kind, cfg, inputs, idx, extra, reps, key):
    """{kernel: (seconds, error)} of each Triton backward kernel alone for a prefill case: "dq" (with
    CSA also the dckv atomics), "dkv" (window keys, key-major), "dckv" (HCA, key-major)."""
    from pallas_kernels import _core
    q, kv, ckv, sink = inputs
    spec = _core.Spec(mode=kind, window=cfg["window"], ratio=cfg["ratio"] if kind == "hca" else 0,
                      scale=q.shape[-1] ** -0.5, backend="triton", interpret=bool(extra.get("interpret")))
    pos = jnp.zeros((2,), jnp.int32)
    c = None if kind == "window" else ckv
    o, lse = jax.jit(lambda q, kv, c, sink: _triton.forward(spec, q, kv, c, idx, sink, pos))(q, kv, c, sink)
    do = jax.random.normal(key, q.shape, q.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    parts = ("dq", "dkv") + (("dckv",) if kind == "hca" else ())
    return {part: _try(jax.jit(lambda q, kv, c, lse, delta, do, part=part: _triton.backward(
        spec, q, kv, c, idx, sink, pos, lse, delta, do, parts=(part,))), q, kv, c, lse, delta, do, reps=reps)
        for part in parts}


def _decode_case(kind, cfg, B, ctx, key):
    """One query at t = ctx-1 per row, kv = its last `window` rows, full compressed cache."""
    H, D, W = cfg["heads"], cfg["dim"], cfg["window"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    dt = jnp.bfloat16
    t = ctx - 1
    q = jax.random.normal(k1, (B, 1, H, D), dt)
    kv = jax.random.normal(k2, (B, W, D), dt)
    N = max(_n_compressed(kind, cfg, ctx), 1)
    ckv = jax.random.normal(k3, (B, N, D), dt)
    sink = jnp.zeros((H,), jnp.float32)
    idx = _topk(k4, B, 1, cfg["topk"], t, N) if kind == "csa" else None
    kw = dict(window=W, scale=D ** -0.5, q_start=t, kv_start=ctx - W)

    def kernel(**extra):
        def f(q, kv, ckv, sink):
            if kind == "csa":
                return pk.sparse_attention(q, kv, ckv, idx, sink, **kw, **extra)
            if kind == "hca":
                return pk.compressed_attention(q, kv, ckv, sink, ratio=cfg["ratio"], **kw, **extra)
            return pk.window_attention(q, kv, sink, **kw, **extra)
        return f

    def xla(q, kv, ckv, sink):
        """Reference decode: gather the key set, then reference.decode_attention."""
        if kind == "csa":
            comp = jax.vmap(lambda c, i: jnp.take(c, jnp.maximum(i, 0), axis=0))(ckv, idx[:, 0])
            cvalid = idx[:, 0] >= 0
        elif kind == "hca":
            comp, cvalid = ckv, jnp.broadcast_to(jnp.arange(N) < ctx // cfg["ratio"], (B, N))
        else:
            comp, cvalid = ckv[:, :0], jnp.zeros((B, 0), bool)
        keys = jnp.concatenate([kv, comp], axis=1)
        valid = jnp.concatenate([jnp.ones((B, W), bool), cvalid], axis=1)
        return ref.decode_attention(q[:, 0], keys, valid, sink, scale=D ** -0.5)[:, None]
    return (q, kv, ckv, sink), kernel, xla


def _as_fp8(ckv, key):
    """Random entries in the FP8 cache form (``pallas_kernels.Fp8Entries``, RoPE dims D/8)."""
    B, N, D = ckv.shape
    rd = D // 8
    return ref.Fp8Entries(ckv[..., :D - rd].astype(jnp.float8_e4m3fn),
                          jax.random.randint(key, (B, N, -(-(D - rd) // 64)), -8, 8).astype(jnp.int8),
                          ckv[..., D - rd:])


def _indexer_case(cfg, B, S, q_start, N, key, fp4=False):
    """Indexer top-k for S queries at q_start over N entries (keys bf16 or, with ``fp4``, as an
    FP8 cache holds them): (inputs, make(**extra) -> fn, FLOPs, bytes)."""
    IH, ID = cfg["index_heads"], cfg["index_dim"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (B, S, IH, ID), jnp.bfloat16)
    w = jax.random.normal(k2, (B, S, IH), jnp.float32)
    if fp4:
        n = -(-ID // 32)
        k = pk.Fp4Keys(jax.random.randint(k3, (B, N, n * 16), 0, 256).astype(jnp.uint8),
                       jax.random.randint(k4, (B, N, n), -8, 8).astype(jnp.int8))
        key_bytes = k.packed.size + k.exps.size
    else:
        k = jax.random.normal(k3, (B, N, ID), jnp.bfloat16)
        key_bytes = k.size * 2
    visible = np.minimum((q_start + np.arange(S, dtype=np.int64) + 1) // CSA_RATIO, N).sum()
    flops = 2 * ID * IH * B * int(visible)
    nbytes = q.size * 2 + w.size * 4 + key_bytes + B * S * cfg["topk"] * 4

    def make(**extra):
        return jax.jit(lambda q, w, k: pk.indexer_topk(q, w, k, cfg["topk"], q_start=q_start, **extra))
    return (q, w, k), make, flops, nbytes


def _indexer_rows(cfg, prefill, decode, extra, reps, no_reference, peak_f, peak_b, key, decode_chain):
    cases = [(f"prefill S={S}", 1, S, 0, S // CSA_RATIO, False) for S in prefill]
    for B, c in decode:
        cases += [(f"decode B={B} ctx={c}{' fp4' * fp4}", B, 1, c - 1, c // CSA_RATIO, fp4) for fp4 in (False, True)]
    for label, B, S, q_start, N, fp4 in cases:
        inputs, make, flops, nbytes = _indexer_case(cfg, B, S, q_start, N, key, fp4)
        chain = decode_chain if S == 1 else 0
        t_k, e1 = _try(make(**extra), *inputs, reps=reps, chain=chain)
        t_x, e2 = (None, "reference skipped") if no_reference else _try(
            make(backend="xla"), *inputs, reps=reps, chain=chain)
        _row("index", label, "fwd", t_k, t_x, flops, nbytes, peak_f, peak_b, e1 or e2)


def _fwd_bwd_fns(f):
    fwd = jax.jit(f)

    def loss(q, kv, ckv, sink):
        return jnp.sum(f(q, kv, ckv, sink).astype(jnp.float32))
    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return fwd, both


def _chained(fn, n):
    """fn(x, *rest) called n times inside one jitted loop, each call's x depending on the previous
    call's output (x + eps * sum(y), eps a traced zero: the values stay, nothing is hoisted)."""
    def loop(eps, x, *rest):
        def body(_, x):
            y = fn(x, *rest)
            return x + (eps * jnp.sum(y.astype(jnp.float32))).astype(x.dtype)
        return jax.lax.fori_loop(0, n, body, x)
    return jax.jit(loop)


def _try(fn, *args, reps, chain=0):
    """(median seconds of fn(*args), error note); ``chain`` = n > 0: the time per call of n chained
    calls in one jitted loop (decode: a call's dispatch takes longer than the kernel)."""
    try:
        if chain:
            return _time(_chained(fn, chain), jnp.float32(0), *args, reps=reps) / chain, ""
        return _time(fn, *args, reps=reps), ""
    except Exception as e:  # noqa: BLE001 - report OOM / unsupported and keep the table going
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, ("OOM" if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
                      else f"error: {msg[:60]}")


def _row(kind, label, pazz, t_k, t_x, flops, nbytes, peak_flops, peak_bw, note):
    fmt = lambda t: f"{t * 1e3:10.3f}" if t else f"{'—':>10}"
    if t_k:
        perf = (f"{flops / t_k / 1e12:8.1f} {flops / peak_flops / t_k:8.1%} "
                f"{nbytes / peak_bw / t_k:8.1%}")
    else:
        perf = f"{'—':>8} {'—':>8} {'—':>8}"
    speed = f"{t_x / t_k:7.2f}x" if (t_k and t_x) else f"{'—':>8}"
    print(f"{kind:6} {label:28} {pazz:4} {fmt(t_k)} {perf} {fmt(t_x)} {speed}  {note}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Pallas interpret mode (CPU)")
    ap.add_argument("--kinds", default="csa,hca,window,indexer")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, smoke 2)")
    ap.add_argument("--backend", default=None, help="triton | mosaic (default: by jax.default_backend())")
    ap.add_argument("--no-reference", action="store_true", help="skip the XLA reference timings")
    ap.add_argument("--breakdown", action="store_true",
                    help="prefill rows: also time each Triton backward kernel alone (dq, dkv, dckv)")
    ap.add_argument("--decode-chain", type=int, default=None,
                    help="decode rows: time per call of N chained calls in one jitted loop (default 20, "
                         "smoke 2); 0 times single calls, dispatch included")
    ap.add_argument("--prefill", default=None, metavar="S,S,...",
                    help="prefill lengths (default 4096,16384,65536; smoke 64,96); empty: no prefill rows")
    ap.add_argument("--decode", default=None, metavar="B:CTX,...",
                    help="decode batch:context pairs (default 1,8,64 x 16K,128K,1M; smoke 1:256,2:512); "
                         "empty: no decode rows")
    ap.add_argument("--tiles", action="append", default=[], metavar="KIND.KERNEL:FIELD=N,...",
                    help="also time KIND's prefill passes (and bf16 decode, fwd tiles) with these Triton tiles for KERNEL (fwd | bwd; fields "
                         "of pallas_kernels._triton.Blocks, see _triton.tiles); repeatable")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_FLOPS / 1e12)
    ap.add_argument("--peak-tbps", type=float, default=H100_HBM_BYTES / 1e12)
    args = ap.parse_args()
    tiles = {}  # kind -> {kernel: fields}
    for spec in args.tiles:
        target, _, fields = spec.partition(":")
        kind, _, kernel = target.partition(".")
        try:
            tiles.setdefault(kind, {})[kernel] = {k: int(v) for k, v in (f.split("=") for f in fields.split(","))}
        except ValueError:
            ap.error(f"--tiles {spec!r}: expected KIND.KERNEL:FIELD=N,FIELD=N,...")
        if kind not in ("csa", "hca", "window") or kernel not in ("fwd", "bwd"):
            ap.error(f"--tiles {spec!r}: KIND is csa, hca or window and KERNEL fwd or bwd")

    if args.smoke:
        cfg = dict(heads=4, dim=64, window=16, topk=16, ratio=8, index_heads=4, index_dim=32)
        prefill, decode = [64, 96], [(1, 256), (2, 512)]
        extra, reps = dict(interpret=True, backend=args.backend or "triton"), args.reps or 2
    else:
        cfg = dict(heads=64, dim=512, window=128, topk=512, ratio=128, index_heads=64, index_dim=128)
        prefill = [4096, 16384, 65536]
        decode = [(b, c) for b in (1, 8, 64) for c in (16384, 131072, 1 << 20)]
        extra, reps = dict(backend=args.backend), args.reps or 10
    try:
        if args.prefill is not None:
            prefill = [int(x) for x in args.prefill.split(",") if x]
        if args.decode is not None:
            decode = [tuple(int(v) for v in x.split(":")) for x in args.decode.split(",") if x]
            if any(len(d) != 2 for d in decode):
                raise ValueError(args.decode)
    except ValueError:
        ap.error(f"--prefill {args.prefill!r} / --decode {args.decode!r}: expected S,S,... / B:CTX,B:CTX,...")
    chain = args.decode_chain if args.decode_chain is not None else (2 if args.smoke else 20)
    peak_f, peak_b = args.peak_tflops * 1e12, args.peak_tbps * 1e12
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"H={cfg['heads']} D={cfg['dim']} window={cfg['window']} top-k={cfg['topk']} "
          f"HCA ratio={cfg['ratio']} bf16; floors: {args.peak_tflops:.0f} TFLOP/s, {args.peak_tbps:.2f} TB/s")
    if args.smoke:
        print("smoke run: interpret mode on tiny shapes; times and floor fractions are meaningless")
    for kind, by_kernel in tiles.items():
        print(f"fwd+, bwd+: {kind} with tiles " + "; ".join(
            f"{kernel} " + ", ".join(f"{k}={v}" for k, v in fields.items()) for kernel, fields in by_kernel.items()))
    print(f"{'kind':6} {'shape':28} {'pass':4} {'kernel ms':>10} {'TFLOP/s':>8} {'%compute':>8} "
          f"{'%memory':>8} {'XLA ms':>10} {'speedup':>8}")
    key = jax.random.PRNGKey(0)
    for kind in args.kinds.split(","):
        if kind == "indexer":
            _indexer_rows(cfg, prefill, decode, extra, reps, args.no_reference, peak_f, peak_b, key, chain)
            continue
        for S in prefill:
            inputs, make, idx = _prefill_case(kind, cfg, S, key)
            f_fwd, f_bwd = _fwd_bwd_fns(make(pk, **extra))
            t_fwd, e1 = _try(f_fwd, *inputs, reps=reps)
            t_all, e2 = _try(f_bwd, *inputs, reps=reps)
            x_fwd = x_all = None
            e3 = "reference skipped" if args.no_reference else ""
            if not args.no_reference:
                r_fwd, r_bwd = _fwd_bwd_fns(make(ref))
                x_fwd, e3 = _try(r_fwd, *inputs, reps=reps)
                x_all, e4 = _try(r_bwd, *inputs, reps=reps) if x_fwd else (None, e3)
                e3 = e3 or e4
            flops_f, flops_b, bytes_f, bytes_b = _flops_bytes(kind, cfg, 1, S, S, 0, False)
            label = f"prefill S={S}"
            _row(kind, label, "fwd", t_fwd, x_fwd, flops_f, bytes_f, peak_f, peak_b, e1 or e3)
            diff = lambda a, b: a - b if (a and b and a > b) else None  # noisy tiny shapes: —
            t_b, x_b = diff(t_all, t_fwd), diff(x_all, x_fwd)
            _row(kind, label, "bwd", t_b, x_b, flops_b, bytes_b, peak_f, peak_b, e2 or e3)
            if kind in tiles:
                with contextlib.ExitStack() as stack:
                    for kernel, fields in tiles[kind].items():
                        stack.enter_context(_triton.tiles(kind, kernel, **fields))
                    g_fwd, g_all = _fwd_bwd_fns(make(pk, **extra))
                    u_fwd, e5 = _try(g_fwd, *inputs, reps=reps)
                    u_all, e6 = _try(g_all, *inputs, reps=reps)
                _row(kind, label, "fwd+", u_fwd, x_fwd, flops_f, bytes_f, peak_f, peak_b, e5 or e3)
                _row(kind, label, "bwd+", diff(u_all, u_fwd), x_b, flops_b, bytes_b, peak_f, peak_b, e6 or e3)
            if args.breakdown and (extra.get("backend") or jax.default_backend()) in ("triton", "gpu"):
                for part, (t, err) in _backward_parts(kind, cfg, inputs, idx, extra, reps, key).items():
                    share = f"{t / t_b:8.1%} of bwd" if (t and t_b) else ""
                    print(f"{kind:6} {label:28} {part:4} {t * 1e3 if t else float('nan'):10.3f}  {share} {err}")
        for B, ctx in decode:
            inputs, kernel, xla = _decode_case(kind, cfg, B, ctx, key)
            t_k, e1 = _try(jax.jit(kernel(**extra)), *inputs, reps=reps, chain=chain)
            t_x, e2 = (None, "reference skipped") if args.no_reference else _try(
                jax.jit(xla), *inputs, reps=reps, chain=chain)
            flops_f, _, bytes_f, _ = _flops_bytes(kind, cfg, B, 1, ctx, ctx - 1, True)
            _row(kind, f"decode B={B} ctx={ctx}", "fwd", t_k, t_x, flops_f, bytes_f, peak_f, peak_b,
                 e1 or e2)
            if "fwd" in tiles.get(kind, {}):
                with _triton.tiles(kind, "fwd", **tiles[kind]["fwd"]):
                    u_k, e5 = _try(jax.jit(kernel(**extra)), *inputs, reps=reps, chain=chain)
                _row(kind, f"decode B={B} ctx={ctx}", "fwd+", u_k, t_x, flops_f, bytes_f, peak_f, peak_b, e5 or e2)
            if kind == "window":
                continue
            # the same with the entries as --kv-cache fp8 holds them (reference: dequantise first)
            q, kv, ckv, sink = inputs
            inputs8 = (q, kv, _as_fp8(ckv, key), sink)
            t_k, e1 = _try(jax.jit(kernel(**extra)), *inputs8, reps=reps, chain=chain)
            t_x, e2 = (None, "reference skipped") if args.no_reference else _try(
                jax.jit(lambda q, kv, e, sink: xla(q, kv, ref.dequant_fp8_entries(e, q.dtype), sink)),
                *inputs8, reps=reps, chain=chain)
            flops_f, _, bytes_f, _ = _flops_bytes(kind, cfg, B, 1, ctx, ctx - 1, True, fp8=True)
            _row(kind, f"decode B={B} ctx={ctx} fp8", "fwd", t_k, t_x, flops_f, bytes_f, peak_f, peak_b,
                 e1 or e2)


if __name__ == "__main__":
    main()
