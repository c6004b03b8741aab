"""Edge cases of the public kernel entry points: the contract checked against a numpy loop, the
kernels (both families, interpret mode on CPU) against the reference in corner cases, and the
argument checks."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref
from pallas_kernels.grouped_matmul import grouped_matmul
from conftest import kernel_kw

BACKENDS = ("triton", "mosaic")


def _loop(q, kv, ckv, idx, sink, *, window, scale, q_start=0, kv_start=0, ratio=None):
    """The contract as a float64 loop: query t sees kv positions t-window < p <= t (kv[i] is position
    kv_start+i) and ckv[j] for every slot j >= 0 of its top-k row (CSA, a repeat counts again) or for
    j < (t+1)//ratio (HCA, ``idx`` None); the sink is in the denominator only."""
    q, kv, ckv, sink = (np.asarray(x, np.float64) for x in (q, kv, ckv, sink))
    B, S, H, D = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for s in range(S):
            t = q_start + s
            keys = [kv[b, p - kv_start] for p in range(max(0, t - window + 1, kv_start), t + 1)]
            if idx is not None:
                keys += [ckv[b, j] for j in np.asarray(idx)[b, s] if j >= 0]
            else:
                keys += [ckv[b, j] for j in range(min(ckv.shape[1], (t + 1) // ratio))]
            keys = np.array(keys).reshape(-1, D)
            for h in range(H):
                sc = keys @ q[b, s, h] * scale
                m = max(sc.max(initial=-np.inf), sink[h])
                p = np.exp(sc - m)
                out[b, s, h] = p @ keys / (p.sum() + np.exp(sink[h] - m))
    return out


def _close(a, e, tol=1e-5):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * (np.abs(e).max() + 1e-30))


EDGE = {
    # one head of width 192, a window wider than all of kv (T > q_start + S), a top-k row that names
    # an entry twice, one that names an entry three times, and one with no entry (window + sink)
    "dups_wide_window": dict(S=3, H=1, D=192, q_start=2, kv_start=0, T=7, W=50, N=4,
                             idx=[[[2, -1, 2, 0]], [[-1, -1, -1, -1]], [[1, 1, 3, 1]]], sink=[0.5]),
    # a single query with window 1, K = 1, kv from kv_start on (T = q_start+S - kv_start), a sink
    # that dominates and one that is -inf
    "one_query_window1": dict(S=1, H=2, D=64, q_start=9, kv_start=9, T=1, W=1, N=3,
                              idx=[[[1]]], sink=[30.0, -np.inf]),
}


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_csa_edge_cases_match_the_contract(backend, case):
    """Values (kernel, reference == numpy loop) and gradients w.r.t. q, kv, ckv, sink (kernel ==
    reference). A repeated entry counts as often as it is named, in the gradient too (the Triton
    dckv atomics, emulated in interpret mode, once kept only one of the repeats)."""
    c = EDGE[case]
    rng = np.random.default_rng(1)
    B, S, H, D, N = 1, c["S"], c["H"], c["D"], c["N"]
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, kv, ckv, do = normal(B, S, H, D), normal(B, c["T"], D), normal(B, N, D), normal(B, S, H, D)
    idx = jnp.asarray(c["idx"], jnp.int32).reshape(B, S, -1)
    sink = jnp.asarray(c["sink"], jnp.float32)
    kw = dict(window=c["W"], scale=D ** -0.5, q_start=c["q_start"], kv_start=c["kv_start"])

    def grads(f):
        o, vjp = jax.vjp(lambda q, kv, ckv, sink: f(q, kv, ckv, idx, sink, **kw), q, kv, ckv, sink)
        return o, vjp(do)

    want = _loop(q, kv, ckv, idx, sink, **kw)
    o_ref, g_ref = grads(ref.sparse_attention)
    _close(o_ref, want)
    o, g = grads(lambda *a, **k: pk.sparse_attention(*a, **k, **kernel_kw(backend)))
    _close(o, want)
    for name, a, e in zip(("dq", "dkv", "dckv", "dsink"), g, g_ref):
        assert np.isfinite(np.asarray(a)).all(), name
        _close(a, e)


@pytest.mark.parametrize("backend", BACKENDS + ("xla",))
def test_topk_indices_outside_the_entries(backend):
    """Concrete indices outside -1 ... N-1 are an error naming topk_idx; traced ones are unused slots
    on every backend and in the reference (which gave NaN for an index >= N, and the TPU kernels
    an extra zero-score key), in the direct and the gathered-picks (S*K < N) TPU paths."""
    rng = np.random.default_rng(2)
    B, S, H, D, W = 1, 3, 2, 16, 4
    q, kv, sink = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, S, H, D), (B, S, D), (H,)))
    kw = dict(window=W, scale=D ** -0.5, **kernel_kw(backend) if backend != "xla" else dict(backend="xla"))
    for N in (5, 40):
        ckv = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
        bad = jnp.asarray([[[1, N, -1], [2, 3, -7], [0, N + 100, N - 1]]], jnp.int32)
        good = jnp.where((bad >= 0) & (bad < N), bad, -1)
        with pytest.raises(ValueError, match=rf"topk_idx must hold indices .*N={N}"):
            pk.sparse_attention(q, kv, ckv, bad, sink, **kw)
        want = _loop(q, kv, ckv, good, sink, window=W, scale=D ** -0.5)
        _close(ref.sparse_attention(q, kv, ckv, bad, sink, window=W, scale=D ** -0.5), want)
        f = jax.jit(lambda ckv, idx: pk.sparse_attention(q, kv, ckv, idx, sink, **kw))
        _close(f(ckv, bad), want)
        g = jax.jit(jax.grad(lambda ckv, idx: jnp.sum(pk.sparse_attention(q, kv, ckv, idx, sink, **kw))))
        _close(g(ckv, bad), g(ckv, good))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_query_gives_an_empty_output(backend):
    """S = 0 (an empty chunk): [B, 0, H, D] outputs and empty indexer results (the kernels failed
    with a slice-size error), gradients included."""
    B, H, D = 2, 2, 16
    q, kv, ckv, sink = jnp.zeros((B, 0, H, D)), jnp.zeros((B, 4, D)), jnp.zeros((B, 1, D)), jnp.zeros((H,))
    kw = dict(window=2, scale=1.0, **kernel_kw(backend))
    csa = lambda q, kv, ckv, sink: pk.sparse_attention(q, kv, ckv, jnp.zeros((B, 0, 3), jnp.int32), sink, **kw)
    hca = lambda q, kv, ckv, sink: pk.compressed_attention(q, kv, ckv, sink, ratio=4, **kw)
    win = lambda q, kv, ckv, sink: pk.window_attention(q, kv, sink, **kw)
    for f in (csa, hca, win):
        chex.assert_shape(f(q, kv, ckv, sink), (B, 0, H, D))
        g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3))(q, kv, ckv, sink)
        chex.assert_trees_all_equal(g, jax.tree.map(jnp.zeros_like, (q, kv, ckv, sink)))
    qi, w, k = jnp.zeros((B, 0, 2, 16)), jnp.zeros((B, 0, 2)), jnp.zeros((B, 5, 16))
    chex.assert_shape(pk.indexer_scores(qi, w, k, **kernel_kw(backend)), (B, 0, 5))
    chex.assert_shape(pk.indexer_topk(qi, w, k, 3, **kernel_kw(backend)), (B, 0, 3))


def test_argument_checks_name_the_argument():
    q, kv, ckv, sink = jnp.zeros((1, 2, 2, 16)), jnp.zeros((1, 4, 16)), jnp.zeros((1, 1, 16)), jnp.zeros((2,))
    kw = dict(scale=1.0, interpret=True)
    # kv from position 3 on misses the window 2-2 < p <= 2 of the query at q_start = 2
    with pytest.raises(ValueError, match=r"kv must cover the first query's window: kv_start = 3 > .* = 1"):
        pk.window_attention(q, kv, sink, window=2, q_start=2, kv_start=3, **kw)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 2.5"):
        pk.window_attention(q, kv, sink, window=2.5, **kw)
    with pytest.raises(ValueError, match="ratio must be an int >= 1"):
        pk.compressed_attention(q, kv, ckv, sink, window=2, ratio=4.0, **kw)
    with pytest.raises(ValueError, match=r"sink must be a float array \[H=2\], got int32"):
        pk.window_attention(q, kv, jnp.zeros((2,), jnp.int32), window=2, **kw)
    with pytest.raises(ValueError, match=r"ckv must be \[B=1, N, D=16\], got shape None"):
        pk.compressed_attention(q, kv, None, sink, window=2, ratio=4, **kw)
    with pytest.raises(ValueError, match=r"topk_idx must be \[B=1, S=2, K>=1\]"):
        pk.sparse_attention(q, kv, ckv, jnp.zeros((1, 2), jnp.int32), sink, window=2, **kw)


def test_reference_computes_mixed_dtypes_in_float32():
    """bf16 queries with float32 keys compute in float32 (as the kernels do): full-precision products,
    not the bf16 passes of the bf16 default (no effect on CPU, hence checked on the jaxpr)."""
    q, kv, ckv = jnp.zeros((1, 2, 2, 16), jnp.bfloat16), jnp.zeros((1, 2, 16)), jnp.zeros((1, 1, 16))
    sink, idx = jnp.zeros((2,)), jnp.zeros((1, 2, 1), jnp.int32)
    kw = dict(window=2, scale=1.0)
    for f in (lambda: ref.sparse_attention(q, kv, ckv, idx, sink, **kw),
              lambda: ref.compressed_attention(q, kv, ckv, sink, ratio=1, **kw),
              lambda: ref.window_attention(q, kv, sink, **kw)):
        dots = [e for e in jax.make_jaxpr(f)().jaxpr.eqns if e.primitive.name == "dot_general"]
        assert dots and all(e.params["precision"] in ((jax.lax.Precision.HIGHEST,) * 2,
                                                      jax.lax.Precision.HIGHEST) for e in dots), dots


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexer_with_no_head_scores_zero(backend):
    """IH = 0: every visible entry scores 0 (the kernels failed), as in the reference."""
    q, w, k = jnp.zeros((1, 8, 0, 16)), jnp.zeros((1, 8, 0)), jnp.zeros((1, 5, 16))
    chex.assert_trees_all_equal(pk.indexer_scores(q, w, k, **kernel_kw(backend)), ref.indexer_scores(q, w, k))
    chex.assert_trees_all_equal(pk.indexer_topk(q, w, k, 3, **kernel_kw(backend)), ref.indexer_topk(q, w, k, 3))


def test_grouped_matmul_rejects_negative_group_sizes():
    """ragged_dot and the Triton kernels disagree on a negative size: concrete ones are an error."""
    x, w = jnp.zeros((8, 16)), jnp.zeros((3, 8, 16))
    with pytest.raises(ValueError, match=r"group_sizes must be >= 0, got \[3, -2, 5\]"):
        grouped_matmul(x, w, jnp.asarray([3, -2, 5], jnp.int32), backend="triton", interpret=True)
