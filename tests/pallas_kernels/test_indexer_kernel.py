"""Lightning-indexer kernel == reference: scores and top-k, both kernel families in interpret mode
(compiled on their own accelerator: ``conftest.kernel_kw``)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref
from conftest import kernel_kw

BACKENDS = ("triton", "mosaic")
CASES = {
    # S not a multiple of any tile, chunked prefill (q_start > 0), D not a power of two
    "chunk_f32": dict(B=2, S=37, H=3, D=40, N=14, q_start=11, dtype=jnp.float32),
    # the very start: the first rows see no entry at all; a single head
    "start_h1_f32": dict(B=1, S=70, H=1, D=64, N=17, q_start=0, dtype=jnp.float32),
    # V4 indexer heads (IH=64, ID=128), more keys than one tile, bf16
    "v4_heads_bf16": dict(B=1, S=20, H=64, D=128, N=150, q_start=580, dtype=jnp.bfloat16),
    # decode: one query against a long cache of which only a prefix is visible yet
    "decode_f32": dict(B=3, S=1, H=16, D=128, N=300, q_start=777, dtype=jnp.float32),
}


def _make(case, seed=0):
    rng = np.random.default_rng(seed)
    B, S, H, D, N = (case[k] for k in "BSHDN")
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return normal(B, S, H, D).astype(case["dtype"]), normal(B, S, H), normal(B, N, D).astype(case["dtype"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_reference(backend, case):
    c = CASES[case]
    q, w, k = _make(c)
    got = pk.indexer_scores(q, w, k, q_start=c["q_start"], **kernel_kw(backend))
    want = ref.indexer_scores(q, w, k, q_start=c["q_start"])
    chex.assert_shape(got, (c["B"], c["S"], c["N"]))
    assert got.dtype == jnp.float32
    visible = np.isfinite(np.asarray(want))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), visible)  # the same causal mask
    assert not visible.all() and visible.any()
    scale = float(jnp.max(jnp.abs(jnp.where(visible, want, 0))))
    chex.assert_trees_all_close(jnp.where(visible, got, 0), jnp.where(visible, want, 0),
                                rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_matches_reference_in_chunks(backend, case):
    c, topk = CASES[case], 6
    q, w, k = _make(c, seed=1)
    want = np.asarray(ref.indexer_topk(q, w, k, topk, q_start=c["q_start"]))
    for chunk in (None, 16):  # one chunk / several, the last one ragged
        got = pk.indexer_topk(q, w, k, topk, q_start=c["q_start"], chunk=chunk, **kernel_kw(backend))
        chex.assert_shape(got, (c["B"], c["S"], topk))
        assert got.dtype == jnp.int32
        # the same selected set per row (the order of equal scores is unspecified)
        np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(want, -1))
    rows_with_gaps = (want == -1).any(-1)
    if c["q_start"] == 0:
        assert rows_with_gaps.any()  # early positions see fewer than topk entries: -1 slots


def test_traced_q_start_and_xla_backend():
    c = CASES["chunk_f32"]
    q, w, k = _make(c, seed=2)
    f = jax.jit(lambda s: pk.indexer_topk(q, w, k, 4, q_start=s, chunk=8, **kernel_kw()))
    np.testing.assert_array_equal(np.sort(np.asarray(f(jnp.int32(11))), -1),
                                  np.sort(np.asarray(ref.indexer_topk(q, w, k, 4, q_start=11)), -1))
    chex.assert_trees_all_equal(pk.indexer_topk(q, w, k, 4, q_start=11, backend="xla", chunk=8),
                                ref.indexer_topk(q, w, k, 4, q_start=11))


def test_no_entries_yet():
    q, w, k = _make(dict(B=1, S=3, H=2, D=16, N=0, dtype=jnp.float32))
    chex.assert_shape(pk.indexer_scores(q, w, k, **kernel_kw()), (1, 3, 0))
    chex.assert_trees_all_equal(pk.indexer_topk(q, w, k, 2, **kernel_kw()), jnp.full((1, 3, 2), -1, jnp.int32))


def test_rejects_bad_inputs():
    q, w, k = _make(dict(B=1, S=4, H=2, D=16, N=3, dtype=jnp.float32))
    with pytest.raises(ValueError, match="w must be"):
        pk.indexer_scores(q, w[..., :1], k, interpret=True)
    with pytest.raises(ValueError, match="k must be"):
        pk.indexer_scores(q, w, k[..., :8], interpret=True)
    with pytest.raises(ValueError, match="q dtype"):
        pk.indexer_scores(q.astype(jnp.float16), w, k, interpret=True)
    with pytest.raises(ValueError, match="topk"):
        pk.indexer_topk(q, w, k, 0, interpret=True)
    with pytest.raises(ValueError, match="q_start"):
        pk.indexer_topk(q, w, k, 2, q_start=-1, interpret=True)


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_lowers_for_accelerator(backend, platform, decode):
    """Top-k selection lowers (jaxpr -> Triton IR / Mosaic) at V4-Flash indexer shapes, bf16."""
    S, N, q_start = (1, 1 << 18, (1 << 20) - 1) if decode else (4096, 1024, 0)
    sd = jax.ShapeDtypeStruct
    q, w, k = sd((2, S, 64, 128), jnp.bfloat16), sd((2, S, 64), jnp.float32), sd((2, N, 128), jnp.bfloat16)
    f = lambda q, w, k: pk.indexer_topk(q, w, k, 512, q_start=q_start, backend=backend)
    text = jax.jit(f).trace(q, w, k).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") == 1
