"""Kernel == reference for CSA / HCA / window attention: values and gradients.

Both kernel families (``triton`` for GPU, ``mosaic`` for TPU) run against
``pallas_kernels.reference`` in Pallas interpret mode, or compiled on their own accelerator
(``conftest.kernel_kw``: run this file on a GPU to test the compiled Triton kernels).
Gradients are of ``sum(o * do)`` with a random ``do`` w.r.t. q, kv, ckv and sink. bfloat16
kernels are compared with the float32 reference on the same (bf16-valued) inputs. The lowering
tests check, from CPU, that every kernel lowers to Triton IR (``cuda``) and to Mosaic (``tpu``)
at V4-Flash shapes.
"""
from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref
from conftest import attention_sum, kernel_kw

BACKENDS = ("triton", "mosaic")
MODES = ("window", "hca", "csa")
CSA_RATIO = 4  # the indexer picks among j < (t+1)//4


def _topk(rng, B, S, K, q_start, N):
    """[B, S, K] int32: distinct random causal entries per row, -1 in random slots; rows whose
    position has no complete compressed entry yet are all -1."""
    idx = np.full((B, S, K), -1, np.int32)
    for b in range(B):
        for s in range(S):
            n = min(N, (q_start + s + 1) // CSA_RATIO)
            k = int(rng.integers(0, min(n, K) + 1))
            if k:
                slots = rng.choice(K, k, replace=False)
                idx[b, s, slots] = rng.choice(n, k, replace=False)
    return jnp.asarray(idx)


def _make(case, mode, seed=0):
    """Random inputs for a case: (args dict, static kwargs)."""
    rng = np.random.default_rng(seed)
    B, S, H, D, q_start = case["B"], case["S"], case["H"], case["D"], case["q_start"]
    T = q_start + S + 3                      # 3 future positions that no query may see
    ratio = case["ratio"] if mode == "hca" else CSA_RATIO
    N = max(T // ratio, 1)
    dt = case["dtype"]
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dt)
    args = dict(q=normal(B, S, H, D), kv=normal(B, T, D), ckv=normal(B, N, D),
                sink=jnp.asarray(rng.standard_normal(H), jnp.float32),
                do=jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32).astype(dt))
    if mode == "csa":
        args["idx"] = _topk(rng, B, S, case["K"], q_start, N)
    kw = dict(window=case["W"], scale=D ** -0.5, q_start=q_start)
    if mode == "hca":
        kw["ratio"] = ratio
    return args, kw


def _call(mode, impl, args, kw, **extra):
    """o = attention(q, kv, ckv, sink) as a function of the differentiable inputs."""
    def f(q, kv, ckv, sink):
        if mode == "csa":
            return impl.sparse_attention(q, kv, ckv, args["idx"], sink, **kw, **extra)
        if mode == "hca":
            return impl.compressed_attention(q, kv, ckv, sink, **kw, **extra)
        return impl.window_attention(q, kv, sink, **kw, **extra)
    return f


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_grads(f, q, kv, ckv, sink, do):
    o, vjp = jax.vjp(f, q, kv, ckv, sink)
    return o, vjp(do.astype(o.dtype))


def _assert_close(actual, expected, tol):
    """|a - e| <= tol * (|e| + max|e|): relative, with a floor at the tensor's own scale."""
    actual = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), actual)
    expected = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        chex.assert_trees_all_close(a, e, rtol=tol, atol=tol * float(jnp.max(jnp.abs(e)) + 1e-30))


def _check(mode, backend, case, seed=0):
    args, kw = _make(case, mode, seed)
    f32 = lambda x: x.astype(jnp.float32)
    kernel = _call(mode, pk, args, kw, **kernel_kw(backend))
    o, grads = _value_and_grads(kernel, args["q"], args["kv"], args["ckv"], args["sink"], args["do"])
    o_ref, grads_ref = _value_and_grads(_call(mode, ref, args, kw), f32(args["q"]), f32(args["kv"]),
                                        f32(args["ckv"]), args["sink"], f32(args["do"]))
    B, S, H, D = args["q"].shape
    chex.assert_shape(o, (B, S, H, D))
    assert o.dtype == args["q"].dtype
    chex.assert_trees_all_equal_shapes(grads, (args["q"], args["kv"], args["ckv"], args["sink"]))
    tol = 1e-5 if case["dtype"] == jnp.float32 else 1e-2
    _assert_close(o, o_ref, tol)
    names = ("dq", "dkv", "dckv", "dsink")
    for name, g, g_ref in zip(names, grads, grads_ref):
        if mode == "window" and name == "dckv":
            continue
        assert bool(jnp.all(jnp.isfinite(g))), name
        _assert_close(g, g_ref, tol)


CASES = {
    # chunked prefill: q_start > 0, S not a multiple of any block, -1 padding incl. empty rows
    "chunk_f32": dict(B=2, S=37, H=4, D=64, q_start=11, W=8, ratio=4, K=6, dtype=jnp.float32),
    # the very start: fewer keys than the window; a single head
    "start_h1_f32": dict(B=1, S=21, H=1, D=128, q_start=0, W=32, ratio=4, K=5, dtype=jnp.float32),
    "bf16_h16_d256": dict(B=1, S=24, H=16, D=256, q_start=5, W=16, ratio=8, K=8, dtype=jnp.bfloat16),
}
SLOW_CASES = {
    # V4-Flash head shape (H=64, D=512), K not a multiple of the key tile
    "v4_heads_bf16": dict(B=1, S=5, H=64, D=512, q_start=290, W=128, ratio=128, K=40, dtype=jnp.bfloat16),
    "v4_heads_f32": dict(B=1, S=3, H=64, D=512, q_start=140, W=128, ratio=16, K=24, dtype=jnp.float32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, mode, case):
    _check(mode, backend, CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
@pytest.mark.parametrize("mode", ("hca", "csa"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_v4_heads(backend, mode, case):
    _check(mode, backend, SLOW_CASES[case])


@pytest.mark.parametrize("splits", (3, 50))
@pytest.mark.parametrize("mode", ("window", "hca"))
def test_key_major_backward_split_over_queries(monkeypatch, mode, splits):
    """The Triton dkv / dckv kernels with the query positions split across programs (what
    prefill at few key blocks uses on a GPU; the small test shapes need no split by themselves):
    3 splits that do not divide the positions, and 50, more than there are positions (empty
    shares)."""
    from pallas_kernels import _triton
    monkeypatch.setattr(_triton, "_choose_key_splits", lambda *a: splits)
    _check(mode, "triton", CASES["chunk_f32"])
    _check(mode, "triton", CASES["bf16_h16_d256"])


@pytest.mark.parametrize("mode", ("hca", "csa"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_window_buffer(backend, mode):
    """One query at a traced position t against only its last kv rows (kv_start > 0), with
    enough compressed keys that the GPU forward splits them across programs."""
    rng = np.random.default_rng(3)
    B, H, D, W, t = 2, 4, 64, 8, 1299
    N = (t + 1) // 4
    q = jnp.asarray(rng.standard_normal((B, 1, H, D)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((B, t + 1, D)), jnp.float32)
    ckv = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(N, 300, replace=False) for _ in range(B)])[:, None])
    kw = dict(window=W, scale=D ** -0.5)

    @jax.jit
    def kernel(pos):
        tail = kv[:, t + 1 - W:]
        if mode == "hca":
            return pk.compressed_attention(q, tail, ckv, sink, ratio=4, q_start=pos, kv_start=pos + 1 - W,
                                           **kernel_kw(backend), **kw)
        return pk.sparse_attention(q, tail, ckv, idx, sink, q_start=pos, kv_start=pos + 1 - W,
                                   **kernel_kw(backend), **kw)

    if mode == "hca":
        expected = ref.compressed_attention(q, kv, ckv, sink, ratio=4, q_start=t, **kw)
    else:
        expected = ref.sparse_attention(q, kv, ckv, idx, sink, q_start=t, **kw)
    _assert_close(kernel(jnp.int32(t)), expected, 1e-5)


@pytest.mark.parametrize("B,S,H,K,q_start", [(2, 3, 4, 6, 3990), (1, 40, 64, 8, 2000)], ids=["h4", "h64"])
def test_tpu_csa_gathers_the_picks_when_fewer_than_the_entries(B, S, H, K, q_start):
    """A short chunk over a long context (S·K < N): the TPU kernel gets only the picked rows (not
    every entry between the smallest and largest pick), with values and gradients unchanged, and
    its programs visit only their own picks' tiles."""
    rng = np.random.default_rng(5)
    D, W = 64, 8
    N = (q_start + S) // CSA_RATIO
    q, do = (jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32) for _ in range(2))
    kv = jnp.asarray(rng.standard_normal((B, q_start + S, D)), jnp.float32)
    ckv = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = _topk(rng, B, S, K, q_start, N).at[:, 0, 0].set(N - 1).at[:, 1, 0].set(0)
    args = dict(idx=idx)
    kw = dict(window=W, scale=D ** -0.5, q_start=q_start)
    kernel = _call("csa", pk, args, kw, **kernel_kw("mosaic"))
    got = _value_and_grads(kernel, q, kv, ckv, sink, do)
    _assert_close(got, _value_and_grads(_call("csa", ref, args, kw), q, kv, ckv, sink, do), 1e-5)
    calls = {e.params["name"]: e for e in _pallas_calls(
        jax.make_jaxpr(lambda *a: _value_and_grads(kernel, *a))(q, kv, ckv, sink, do).jaxpr)}
    fwd, dckv = calls["v4_csa_attention_fwd"], calls["v4_csa_attention_dkv"]
    operands = [v.aval.shape for v in fwd.invars]
    if H == 4:  # the forward kernel's operands kv, ckv: the S*K = 18 picked rows in one 128-row tile
        assert operands[3:5] == [(B, 4096, D), (B, 128, D)], operands
    else:  # 320 picked rows in 3 tiles; a program's 8 queries x 8 picks span at most 2 of them, and
        # its grid steps are 2 window tiles + those 2; a tile's d(ckv) program loops over the at most
        # 3 query blocks its rows belong to, not over all 5
        assert operands[4] == (B, 384, D), operands
        assert fwd.params["grid_mapping"].grid == (B, 5, 2 + 2), fwd.params["grid_mapping"].grid
        assert dckv.params["grid_mapping"].grid == (B, 3, 3), dckv.params["grid_mapping"].grid


@pytest.mark.parametrize("q_start,S", [(0, 300), (100, 300)], ids=["prefill", "chunk"])
def test_tpu_csa_long_prefill_runs_over_the_picks_in_chunks(monkeypatch, q_start, S):
    """Many more entries than a query block's picks, and S*K >= N (a long prefill): the TPU kernel
    runs over chunks of 64 queries (the last one ragged), each over its own gathered picks and the
    kv rows its window reaches, with the reference's values and gradients."""
    from pallas_kernels import _core

    rng = np.random.default_rng(7)
    B, H, D, W, K = 1, 64, 64, 8, 2
    monkeypatch.setattr(_core, "_CHUNK_BYTES", 64 * B * K * D * 4)  # 64 queries per chunk
    N = (q_start + S) // CSA_RATIO
    q, do = (jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32) for _ in range(2))
    kv = jnp.asarray(rng.standard_normal((B, q_start + S, D)), jnp.float32)
    ckv = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = _topk(rng, B, S, K, q_start, N)
    assert S * K >= N
    args, kw = dict(idx=idx), dict(window=W, scale=D ** -0.5, q_start=q_start)
    kernel = _call("csa", pk, args, kw, **kernel_kw("mosaic"))
    got = _value_and_grads(kernel, q, kv, ckv, sink, do)
    _assert_close(got, _value_and_grads(_call("csa", ref, args, kw), q, kv, ckv, sink, do), 1e-5)
    jaxpr = jax.make_jaxpr(lambda *a: _value_and_grads(kernel, *a))(q, kv, ckv, sink, do).jaxpr
    fwd = next(e for e in _pallas_calls(jaxpr) if e.params["name"] == "v4_csa_attention_fwd")
    # 64 queries: 64 + W - 1 rows of kv and 64 * K picked rows, each padded to one 128-row tile
    assert [v.aval.shape for v in fwd.invars][3:5] == [(B, 128, D), (B, 128, D)]


@pytest.mark.parametrize("q_start,S,K", [(100, 300, 2), (3990, 40, 8)], ids=["chunks", "gathered"])
def test_tpu_csa_sums_the_gradient_of_a_popular_entry_in_float32(monkeypatch, q_start, S, K):
    """bf16 inputs, entry 0 picked by every query: its d(ckv) sums S per-query terms, over 19 chunks
    of 16 queries (a long prefill) or in one gather (S*K < N). Summed in float32 and rounded once it
    is within a bf16 ulp of the float32 reference's (summed in bf16: up to 2.5 and 2.9 ulps off).
    The backward's scatter-add runs in pieces of 12 rows and a last one of 8."""
    from pallas_kernels import _core

    rng = np.random.default_rng(11)
    B, H, D, W = 1, 64, 64, 8
    monkeypatch.setattr(_core, "_CHUNK_BYTES", 16 * B * K * D * 2)  # 16 bf16 queries per chunk
    monkeypatch.setattr(_core, "_SCATTER_BYTES", 12 * B * D * 4)
    N = (q_start + S) // CSA_RATIO
    bf16 = lambda x: jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)
    # small scores and a positive do: d(ckv) is mostly sum p * do, terms of one sign and of sizes
    # that vary by query and dimension (the bf16 sums' rounding errors do not cancel by chance)
    q = bf16(0.1 * rng.standard_normal((B, S, H, D)))
    do = bf16(np.exp(rng.standard_normal((B, S, 1, D))) * (0.5 + rng.random((B, S, H, D))))
    kv = bf16(rng.standard_normal((B, q_start + S, D)))
    ckv = bf16(rng.standard_normal((B, N, D)))
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = _topk(rng, B, S, K, q_start, N)
    idx = jnp.where(idx == 0, -1, idx).at[:, :, 0].set(0)
    args, kw = dict(idx=idx), dict(window=W, scale=D ** -0.5, q_start=q_start)
    got = _value_and_grads(_call("csa", pk, args, kw, **kernel_kw("mosaic")), q, kv, ckv, sink, do)
    f32 = lambda x: x.astype(jnp.float32)
    want = _value_and_grads(_call("csa", ref, args, kw), f32(q), f32(kv), f32(ckv), sink, f32(do))
    _assert_close(got, want, 1e-2)
    popular, expected = np.asarray(f32(got[1][2][:, 0])), np.asarray(want[1][2][:, 0])
    ulps = np.abs(popular - expected) / np.abs(np.spacing(expected.astype(jnp.bfloat16))).astype(np.float32)
    assert ulps.max() <= 1, f"d(ckv) of entry 0 is up to {ulps.max():.1f} bf16 ulps off"


def _pallas_calls(jaxpr):
    """The pallas_call equations of a jaxpr, in order, through nested jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _pallas_calls(sub)
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_compressed_entries_yet(backend):
    """S < ratio: ckv is [B, 0, D]; HCA and CSA reduce to window attention, d ckv is empty."""
    rng = np.random.default_rng(4)
    B, S, H, D, W = 1, 3, 2, 16, 2
    q = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
    ckv = jnp.zeros((B, 0, D), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = -jnp.ones((B, S, 4), jnp.int32)
    kw = dict(window=W, scale=D ** -0.5, **kernel_kw(backend))
    hca = pk.compressed_attention(q, kv, ckv, sink, ratio=128, **kw)
    _assert_close(hca, ref.compressed_attention(q, kv, ckv, sink, window=W, ratio=128, scale=D ** -0.5), 1e-5)
    csa = lambda c: pk.sparse_attention(q, kv, c, idx, sink, **kw)
    _assert_close(csa(ckv), ref.window_attention(q, kv, sink, window=W, scale=D ** -0.5), 1e-5)
    chex.assert_shape(jax.grad(lambda c: jnp.sum(csa(c)))(ckv), (B, 0, D))


def test_mixed_dtypes_promote_like_the_reference():
    """f32 queries with bf16 key/values compute in f32 and return q's dtype."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 16)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 9, 16)), jnp.bfloat16)
    ckv = jnp.asarray(rng.standard_normal((1, 4, 16)), jnp.bfloat16)
    sink = jnp.zeros((2,), jnp.float32)
    kw = dict(window=3, ratio=2, scale=0.25)
    got = pk.compressed_attention(q, kv, ckv, sink, **kernel_kw(), **kw)
    assert got.dtype == jnp.float32
    _assert_close(got, ref.compressed_attention(q, kv, ckv, sink, **kw), 1e-5)


def test_cpu_without_interpret_is_an_error():
    if jax.default_backend() != "cpu":
        pytest.skip("only meaningful on a CPU-only JAX")
    q = jnp.zeros((1, 2, 1, 16))
    with pytest.raises(ValueError, match="interpret=True"):
        pk.window_attention(q, jnp.zeros((1, 2, 16)), jnp.zeros((1,)), window=2, scale=1.0)


def test_xla_backend_is_the_reference():
    args, kw = _make(CASES["chunk_f32"], "csa")
    got = pk.sparse_attention(args["q"], args["kv"], args["ckv"], args["idx"], args["sink"],
                              backend="xla", **kw)
    want = ref.sparse_attention(args["q"], args["kv"], args["ckv"], args["idx"], args["sink"], **kw)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_reference_with_kv_start_equals_the_full_kv(mode):
    """A chunk of queries (chunked prefill) against kv rows from kv_start on: the reference's answer
    equals the one from the whole kv (the rows before kv_start are out of every query's window)."""
    rng = np.random.default_rng(4)
    B, S, H, D, W, q0 = 2, 6, 3, 32, 5, 17
    T, N = q0 + S, (q0 + S) // 4
    q = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    ckv = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(H), jnp.float32)
    idx = jnp.asarray(_topk(rng, B, S, 3, q0, N))
    kw = dict(window=W, scale=D ** -0.5, backend="xla")
    for ks in (q0 - W + 1, q0 - W - 2):
        def attend(kv, ks):
            if mode == "csa":
                return pk.sparse_attention(q, kv, ckv, idx, sink, q_start=q0, kv_start=ks, **kw)
            if mode == "hca":
                return pk.compressed_attention(q, kv, ckv, sink, ratio=4, q_start=q0, kv_start=ks, **kw)
            return pk.window_attention(q, kv, sink, q_start=q0, kv_start=ks, **kw)
        chex.assert_trees_all_equal(attend(kv[:, ks:], ks), attend(kv, 0))


def test_rejects_bad_shapes():
    q = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="kv must cover"):
        pk.window_attention(q, jnp.zeros((1, 3, 16)), jnp.zeros((2,)), window=2, scale=1.0,
                            interpret=True)
    with pytest.raises(ValueError, match="sink"):
        pk.window_attention(q, jnp.zeros((1, 4, 16)), jnp.zeros((3,)), window=2, scale=1.0,
                            interpret=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_lowers_for_accelerator(backend, platform, mode):
    """Forward and backward lower (jaxpr -> Triton IR / Mosaic) at V4-Flash shapes, bf16."""
    B, S, H, D, W = 1, 256, 64, 512, 128
    sd = jax.ShapeDtypeStruct
    q, kv, sink = sd((B, S, H, D), jnp.bfloat16), sd((B, S, D), jnp.bfloat16), sd((H,), jnp.float32)
    ckv = sd((B, S // (4 if mode == "csa" else 128), D), jnp.bfloat16)
    idx = sd((B, S, 512), jnp.int32)
    kw = dict(window=W, scale=D ** -0.5, backend=backend)
    f = attention_sum(mode, **kw)

    lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 4))).trace(
        q, kv, ckv, idx, sink).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    n_kernels = text.count(target)
    assert n_kernels == {"window": 3, "hca": 4, "csa": 3 if backend == "triton" else 4}[mode], n_kernels


FP8_CASES = {
    # whole 64-wide blocks (decoded inside the Triton kernel): V4 decode width, and a few queries
    # in a chunk after earlier ones (q_start > 0), float32
    "v4_decode_bf16": dict(B=2, S=1, H=16, D=512, rd=64, q_start=1001, dtype=jnp.bfloat16),
    "chunk_f32": dict(B=1, S=5, H=3, D=128, rd=64, q_start=90, dtype=jnp.float32),
    # a partial block (dequantised before the kernel on every backend)
    "partial_block_f32": dict(B=2, S=2, H=2, D=96, rd=16, q_start=40, dtype=jnp.float32),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
@pytest.mark.parametrize("mode", ("hca", "csa"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_entries_match_their_values(backend, mode, case):
    """Compressed entries as an FP8 cache holds them (``Fp8Entries``) give what their dequantised
    values give to the reference; -1 top-k slots, a causal prefix and the window included."""
    from v4jax import quant

    c = FP8_CASES[case]
    rng = np.random.default_rng(7)
    B, S, H, D, rd, q_start, dt = (c[k] for k in ("B", "S", "H", "D", "rd", "q_start", "dtype"))
    W, T = 16, q_start + S
    ratio = CSA_RATIO if mode == "csa" else 8
    N = T // ratio + 2                                   # 2 entries past every query's prefix
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, kv, sink = normal(B, S, H, D).astype(dt), normal(B, T, D).astype(dt), normal(H)
    x = normal(B, N, D) * jnp.asarray(rng.uniform(0.01, 30, (B, N, 1)), jnp.float32)
    codes, exps = quant.quant_fp8_act(x[..., :D - rd], 64)
    entries = ref.Fp8Entries(codes, exps, x[..., D - rd:].astype(dt))
    values = ref.dequant_fp8_entries(entries, jnp.float32)
    idx = _topk(rng, B, S, 24, q_start, N)
    kw = dict(window=W, scale=D ** -0.5, q_start=q_start)
    if mode == "csa":
        got = pk.sparse_attention(q, kv, entries, idx, sink, **kw, **kernel_kw(backend))
        want = ref.sparse_attention(q.astype(jnp.float32), kv.astype(jnp.float32), values, idx, sink, **kw)
    else:
        got = pk.compressed_attention(q, kv, entries, sink, ratio=ratio, **kw, **kernel_kw(backend))
        want = ref.compressed_attention(q.astype(jnp.float32), kv.astype(jnp.float32), values, sink,
                                        ratio=ratio, **kw)
    chex.assert_shape(got, (B, S, H, D))
    assert got.dtype == dt
    _assert_close(got, want, 1e-5 if dt == jnp.float32 else 1e-2)


def test_fp8_entries_are_checked():
    q, kv, sink = jnp.zeros((1, 2, 2, 128)), jnp.zeros((1, 2, 128)), jnp.zeros((2,))
    codes = jnp.zeros((1, 3, 64), jnp.float8_e4m3fn)
    good = ref.Fp8Entries(codes, jnp.zeros((1, 3, 1), jnp.int8), jnp.zeros((1, 3, 64)))
    kw = dict(window=2, ratio=4, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="must make D=128"):
        pk.compressed_attention(q, kv, good._replace(rope=jnp.zeros((1, 3, 32))), sink, **kw)
    with pytest.raises(ValueError, match="exps must be"):
        pk.compressed_attention(q, kv, good._replace(exps=jnp.zeros((1, 3, 2), jnp.int8)), sink, **kw)
    with pytest.raises(ValueError, match="float8_e4m3fn codes"):
        pk.compressed_attention(q, kv, good._replace(codes=jnp.zeros((1, 3, 64))), sink, **kw)
    with pytest.raises(ValueError, match="has no gradient"):  # a decoding cache, not trained
        jax.grad(lambda q: jnp.sum(pk.compressed_attention(q, kv, good, sink, **kw)))(q)


def test_fp8_entries_past_int32_offsets_split_the_batch(monkeypatch):
    """Pallas Triton indexes an operand of at most 4 GiB with int32 offsets: FP8 codes of 2-4 GiB (CSA
    at 1M context, batch 19-38) are read by calls over fewer batch rows, larger ones by one call."""
    from pallas_kernels import _triton
    from v4jax import quant
    sd = jax.ShapeDtypeStruct
    H, D, W, t = 64, 512, 128, (1 << 20) - 1
    N = (1 << 20) // 4

    def kernels(B):
        entries = ref.Fp8Entries(sd((B, N, 448), jnp.float8_e4m3fn), sd((B, N, 7), jnp.int8),
                                 sd((B, N, 64), jnp.bfloat16))
        f = lambda q, kv, e, sink, idx: pk.sparse_attention(q, kv, e, idx, sink, window=W, scale=D ** -0.5,
                                                            q_start=t, kv_start=t + 1 - W, backend="triton")
        args = (sd((B, 1, H, D), jnp.bfloat16), sd((B, W, D), jnp.bfloat16), entries, sd((H,), jnp.float32),
                sd((B, 1, 512), jnp.int32))
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton")
    assert [kernels(B) for B in (16, 20, 40)] == [1, 2, 1]  # 2^31 elements = 18.3 rows; 2^32 bytes = 36.6

    # the split calls give the values of one call (a small limit, interpret mode)
    rng = np.random.default_rng(3)
    B, S, H, D, q_start = 5, 3, 4, 128, 40
    T, N = q_start + S, (q_start + S) // 4
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, kv, sink, x = normal(B, S, H, D), normal(B, T, D), normal(H), normal(B, N, D)
    entries = ref.Fp8Entries(*quant.quant_fp8_act(x[..., :64], 64), x[..., 64:])
    idx = _topk(rng, B, S, 6, q_start, N)
    kw = dict(window=8, scale=D ** -0.5, q_start=q_start, backend="triton", interpret=True)
    whole = pk.sparse_attention(q, kv, entries, idx, sink, **kw)
    monkeypatch.setattr(_triton, "_I32_MAX", 2 * N * 64)  # two batch rows of codes per call
    split = pk.sparse_attention(q, kv, entries, idx, sink, **kw)
    assert _triton.int32_batch_rows(*entries) == 2
    np.testing.assert_array_equal(np.asarray(split), np.asarray(whole))


def test_fp8_entries_are_dequantised_first_on_gpus_without_fp8(monkeypatch):
    """Triton has no FP8 conversion before compute capability 8.9 (A100: 8.0) and aborts the process;
    the entries are then dequantised by XLA before the kernel."""
    from pallas_kernels import _core

    class Gpu:
        platform, compute_capability = "gpu", "8.0"
    sd = jax.ShapeDtypeStruct
    B, H, D, N = 1, 8, 512, 64
    entries = ref.Fp8Entries(sd((B, N, 448), jnp.float8_e4m3fn), sd((B, N, 7), jnp.int8), sd((B, N, 64), jnp.bfloat16))
    args = (sd((B, 1, H, D), jnp.bfloat16), sd((B, 16, D), jnp.bfloat16), entries, sd((H,), jnp.float32))

    def lowered():  # a new function each time: no cached trace
        f = lambda q, kv, e, sink: pk.compressed_attention(q, kv, e, sink, window=16, ratio=8, scale=0.1,
                                                           q_start=600, kv_start=585, backend="triton")
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    expanded = "tensor<1x%dx512xbf16>" % N
    assert expanded not in lowered()
    monkeypatch.setattr(_core.jax, "devices", lambda *a: [Gpu()])
    assert expanded in lowered()


@pytest.mark.parametrize("mode", ("hca", "csa"))
def test_fp8_decode_lowers_for_gpu_as_one_kernel(mode):
    """V4-Flash decode at 1M context with FP8 entries: one Triton kernel and no dequantised copy
    of the entries (which the Mosaic path, dequantising first, does make for HCA)."""
    sd = jax.ShapeDtypeStruct
    B, H, D, W, t = 2, 64, 512, 128, (1 << 20) - 1
    N = (1 << 20) // (4 if mode == "csa" else 128)
    entries = ref.Fp8Entries(sd((B, N, 448), jnp.float8_e4m3fn), sd((B, N, 7), jnp.int8),
                             sd((B, N, 64), jnp.bfloat16))
    args = (sd((B, 1, H, D), jnp.bfloat16), sd((B, W, D), jnp.bfloat16), entries, sd((H,), jnp.float32),
            sd((B, 1, 512), jnp.int32))

    def lowered(backend, platform):
        kw = dict(window=W, scale=D ** -0.5, q_start=t, kv_start=t + 1 - W, backend=backend)
        if mode == "csa":
            f = lambda q, kv, e, sink, idx: pk.sparse_attention(q, kv, e, idx, sink, **kw)
        else:
            f = lambda q, kv, e, sink, idx: pk.compressed_attention(q, kv, e, sink, ratio=128, **kw)
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    text = lowered("triton", "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 1
    expanded = "tensor<2x%dx512xbf16>" % N                     # the entries dequantised whole
    assert expanded not in text
    if mode == "hca":
        assert expanded in lowered("mosaic", "tpu")


@pytest.mark.slow
def test_benchmark_smoke_runs():
    """benchmarks/attention.py --smoke --breakdown --tiles (interpret mode) prints every row, with no
    error note, the backward kernels one by one and the tiled passes: the script the GPU sessions
    run keeps working."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--reps", "1", "--breakdown", "--prefill", "64",
                          "--decode", "1:256",
                          "--tiles", "csa.fwd:bh=4,bk=8,bcol=32", "--tiles", "csa.bwd:bh=2,bk_dq=8,bcol=16"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split()[:1] in (["csa"], ["hca"], ["window"], ["index"])]
    assert not any("error:" in " ".join(r) or "OOM" in r for r in rows), out.stdout
    passes = {(r[0], r[3]) for r in rows if r[1] == "prefill"}
    assert passes >= {(k, p) for k in ("csa", "hca", "window") for p in ("fwd", "bwd", "dq", "dkv")}
    assert ("hca", "dckv") in passes and ("index", "fwd") in passes, passes
    # csa with --tiles: fwd+ / bwd+ after the prefill row, fwd+ after the bf16 decode row
    tiled = [(r[2], r[3]) for r in rows if r[1] == "prefill" and r[3].endswith("+")]
    assert tiled == [("S=64", "fwd+"), ("S=64", "bwd+")], tiled
    assert [r[2] for r in rows if r[1] == "decode" and r[4] == "fwd+"] == ["B=1"]
    decode = [r for r in rows if r[1] == "decode"]
    assert len(decode) == 3 + 2 + 1 + 2, decode   # csa (bf16, tiled, fp8), hca (bf16 + fp8), window, index (+ fp4)


@pytest.mark.parametrize("mode,case,fwd,bwd", [
    # all heads in one program, q / keys / accumulators in column blocks
    ("csa", "bf16_h16_d256", dict(bh=16, bk=8, bcol=64), dict(bh=16, bk_dq=8, bcol=128)),
    ("csa", "chunk_f32", dict(bh=2, bk=16, bcol=16, num_warps=4), dict(bh=4, bk_dq=4, bcol=32)),
    ("hca", "chunk_f32", dict(bh=4, bq=3, bk=8, bcol=32), dict(bh=2, bq=5, bk_dq=16, bcol=16, bkv=8, bqk=3)),
    ("window", "start_h1_f32", dict(bq=5, bk=16, bcol=64), dict(bq=3, bk_dq=8, bcol=32, bkv=16, bqk=7)),
    # the 64-row tilings of docs/benchmarks.md at V4-Flash head shapes
    *(pytest.param(mode, "v4_heads_bf16", dict(bh=64, bk=16, bcol=128, num_warps=8),
                   dict(bh=64, bk_dq=16, bcol=128, bkv=64, bqk=1, bhk=16), marks=pytest.mark.slow)
      for mode in ("csa", "hca")),
])
def test_tilings_match_the_reference(mode, case, fwd, bwd):
    """The Triton kernels with other tiles than the default (``_triton.tiles``, what
    ``benchmarks/attention.py --tiles`` times): more heads per program, other key tiles, q / do /
    keys / accumulators in column blocks (forward, dq and the key-major dkv), other key-major tiles;
    values and gradients. The traced
    kernels' grids and matmul counts show the tiles were used."""
    from pallas_kernels import _triton
    c = {**CASES, **SLOW_CASES}[case]
    args, kw = _make(c, mode)
    blk = _triton.choose_blocks(mode, c["H"], c["D"])

    def trace():
        f = _call(mode, pk, args, kw, backend="triton", interpret=True)
        text = str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1](args["do"]))(
            args["q"], args["kv"], args["ckv"], args["sink"]))
        kernels = re.split(r"pallas_call\[", text)[1:]
        return {re.search(r"name=(v4_\w+)", k).group(1): k for k in kernels}

    default = trace()
    with _triton.tiles(mode, "fwd", **fwd), _triton.tiles(mode, "bwd", **bwd):
        _check(mode, "triton", c)
        tiled = trace()
    B, S = c["B"], c["S"]
    for name, t in (("fwd", fwd), ("dq", bwd), ("dkv", bwd)):
        kernel = tiled[f"v4_{mode if name != 'dkv' else 'window'}_attention_{name}"]
        if name != "dkv":
            grid = re.search(r"GridMapping\(grid=\((\d+), (\d+), (\d+)[,)]", kernel).groups()
            bq, bh = t.get("bq", blk.bq), t.get("bh", blk.bh)
            assert grid == (str(B), str(-(-S // bq)), str(blk.Hp // bh)), (name, grid)
        # a matmul per column block where the default has one
        dots = default[f"v4_{mode if name != 'dkv' else 'window'}_attention_{name}"].count("dot_general")
        assert kernel.count("dot_general") == dots * blk.Dp // t["bcol"], name
    if "bkv" in bwd:
        grid = re.search(r"GridMapping\(grid=\((\d+), (\d+)", tiled["v4_window_attention_dkv"]).groups()
        assert grid == (str(B), str(-(-(kw["q_start"] + S + 3) // bwd["bkv"]))), grid


def test_tiles_are_checked():
    from pallas_kernels import _triton
    args, kw = _make(CASES["chunk_f32"], "csa")
    with pytest.raises(ValueError, match="unknown Blocks fields"):
        with _triton.tiles("csa", "fwd", heads=8):
            pass
    with pytest.raises(ValueError, match="kernel fwd or bwd"):
        with _triton.tiles("csa", "dq", bh=2):
            pass
    with pytest.raises(ValueError, match="not a tiling"), _triton.tiles("csa", "fwd", bcol=24):
        _call("csa", pk, args, kw, backend="triton", interpret=True)(args["q"], args["kv"], args["ckv"], args["sink"])
    # a dq key tile wider than the backward's (which pads the top-k rows) would drop top-k slots
    grad = jax.grad(lambda q: jnp.sum(_call("csa", pk, args, kw, backend="triton", interpret=True)(
        q, args["kv"], args["ckv"], args["sink"])))
    with pytest.raises(ValueError, match="not a tiling"), _triton.tiles("csa", "bwd", bk_dq=128):
        grad(args["q"])

