"""Lightning-indexer kernels == reference: scores and top-k, float and FP4 keys, prefill and decode
kernels, both kernel families in interpret mode (compiled on their own accelerator:
``conftest.kernel_kw``)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _indexer, reference as ref
from v4jax import quant
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
    # decode kernel (bf16): V4 heads, the visible prefix ends inside a key tile
    "decode_v4_bf16": dict(B=2, S=1, H=64, D=128, N=600, q_start=1001, dtype=jnp.bfloat16),
    # decode kernel with a few queries (speculative decoding), odd head count and width
    "few_queries_bf16": dict(B=1, S=3, H=5, D=96, N=70, q_start=150, dtype=jnp.bfloat16),
}


def _make(case, seed=0):
    rng = np.random.default_rng(seed)
    B, S, H, D, N = (case[k] for k in "BSHDN")
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return normal(B, S, H, D).astype(case["dtype"]), normal(B, S, H), normal(B, N, D).astype(case["dtype"])


def _fp4(k):
    """Keys rounded to SPEC §5c's FP4 grid, in their stored form."""
    return pk.Fp4Keys(*quant.quant_fp4_act(k.astype(jnp.float32), 32))


@pytest.mark.parametrize("keys", ["float", "fp4"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_reference(backend, case, keys):
    c = CASES[case]
    q, w, k = _make(c)
    if keys == "fp4":
        k = _fp4(k)
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
    if case.startswith("decode"):
        k = _fp4(k)   # what an FP8 cache holds
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


def test_fp4_keys_decode_to_their_values():
    """The reference's FP4 decoding (table lookup) and the kernels' (integer arithmetic on the
    codes) give the SPEC §5c values of every code, signed zeros too."""
    rng = np.random.default_rng(5)
    packed = jnp.asarray(np.concatenate([np.arange(256), rng.integers(0, 256, 256 * 16 - 256)]).reshape(256, 16),
                         jnp.uint8)  # every byte value
    # exponent extremes whose values are normal finite float32 (0.5·2^-125, 6·2^125): XLA on CPU
    # flushes subnormal results to zero
    exps = jnp.asarray(np.concatenate([[[-125], [125]], rng.integers(-125, 126, (254, 1))]), jnp.int8)
    want = (np.asarray(quant.unpack_fp4(packed)) * np.ldexp(1.0, np.asarray(exps, np.int32))).astype(np.float32)
    bits = lambda x: np.asarray(x, np.float32).view(np.uint32)   # signed zeros compare unequal
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(bits(ref.dequant_fp4_keys(pk.Fp4Keys(packed, exps), 32, dtype)), bits(want))
        np.testing.assert_array_equal(bits(_indexer._fp4_tile(packed, exps, dtype)), bits(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_kernel_is_used_for_a_few_queries(backend):
    assert _indexer.use_decode_kernel(backend, 1, jnp.bfloat16)
    assert _indexer.use_decode_kernel(backend, pk.indexer.DECODE_MAX_S, jnp.bfloat16)
    assert not _indexer.use_decode_kernel(backend, pk.indexer.DECODE_MAX_S + 1, jnp.bfloat16)
    assert _indexer.use_decode_kernel(backend, 1, jnp.float32) == (backend == "mosaic")


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
    fp4 = _fp4(k)
    with pytest.raises(ValueError, match="packed must be"):
        pk.indexer_scores(q, w, pk.Fp4Keys(fp4.packed[..., :4], fp4.exps), interpret=True)
    with pytest.raises(ValueError, match="exps must be"):
        pk.indexer_scores(q, w, pk.Fp4Keys(fp4.packed, fp4.exps[:, :2]), interpret=True)
    with pytest.raises(ValueError, match="uint8, int8"):
        pk.indexer_scores(q, w, pk.Fp4Keys(fp4.packed.astype(jnp.int8), fp4.exps), interpret=True)


@pytest.mark.parametrize("keys", ["bf16", "fp4"])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_lowers_for_accelerator(backend, platform, decode, keys):
    """Top-k selection lowers (jaxpr -> Triton IR / Mosaic) at V4-Flash indexer shapes, bf16."""
    S, N, q_start = (1, 1 << 18, (1 << 20) - 1) if decode else (4096, 1024, 0)
    sd = jax.ShapeDtypeStruct
    q, w = sd((2, S, 64, 128), jnp.bfloat16), sd((2, S, 64), jnp.float32)
    k = (pk.Fp4Keys(sd((2, N, 64), jnp.uint8), sd((2, N, 4), jnp.int8)) if keys == "fp4"
         else sd((2, N, 128), jnp.bfloat16))
    f = lambda q, w, k: pk.indexer_topk(q, w, k, 512, q_start=q_start, backend=backend)
    text = jax.jit(f).trace(q, w, k).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") == 1


def test_fp4_keys_past_int32_offsets_split_the_batch():
    """Packed FP4 keys of 2-4 GiB (1M context, batch 128-255) are scored by Triton calls over fewer batch
    rows (Pallas Triton indexes an operand of at most 4 GiB with int32 offsets); larger ones by one."""
    sd = jax.ShapeDtypeStruct
    N, t = 1 << 18, (1 << 20) - 1

    def kernels(B):
        q, w = sd((B, 1, 64, 128), jnp.bfloat16), sd((B, 1, 64), jnp.float32)
        k = pk.Fp4Keys(sd((B, N, 64), jnp.uint8), sd((B, N, 4), jnp.int8))
        f = lambda q, w, k: pk.indexer_scores(q, w, k, q_start=t, backend="triton")
        return jax.jit(f).trace(q, w, k).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton")
    assert [kernels(B) for B in (100, 160, 300)] == [1, 2, 1]
