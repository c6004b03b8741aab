"""FP8 / FP4 / E8M0 formats (SPEC §4) against hand-computed values, and the QAT fake quantisers (SPEC §5)."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import reference
from v4jax import quant
from v4jax.hf.safetensors import SafetensorsReader


def test_e8m0_means_power_of_two():
    b = np.array([127, 128, 120, 0, 254], np.uint8)
    np.testing.assert_array_equal(quant.e8m0_to_float(b), [1.0, 2.0, 2.0 ** -7, 2.0 ** -127, 2.0 ** 127])


def test_fp4_nibbles_low_is_even_column():
    # byte 0x93: low nibble 3 (= +1.5, column 0), high nibble 9 (= sign | 1 -> -0.5, column 1)
    packed = np.array([[0x93, 0x1E]], np.uint8).view(np.int8)  # byte 2: low 0xE (-4.0), high 0x1 (+0.5)
    scale = np.array([[128]], np.uint8).view(ml_dtypes.float8_e8m0fnu)     # 2.0
    w = quant.dequant_fp4(np.concatenate([packed, np.zeros((1, 14), np.int8)], 1), scale)
    np.testing.assert_array_equal(w[0, :4], [1.5 * 2, -0.5 * 2, -4.0 * 2, 0.5 * 2])


def test_fp8_block_scales_apply_per_128_block():
    q = np.ones((130, 260), np.float32).astype(ml_dtypes.float8_e4m3fn)
    s = np.array([[127, 128, 129], [130, 131, 132]], np.uint8).view(ml_dtypes.float8_e8m0fnu)
    w = quant.dequant_fp8(q, s)
    assert w[0, 0] == 1 and w[0, 128] == 2 and w[0, 259] == 4 and w[129, 0] == 8 and w[129, 259] == 32


def test_quantisers_preserve_released_values(golden):
    """Re-quantising dequantised release weights keeps every value (the release grid is representable).

    Bytes can differ where the release chose a larger scale than the block's dequantised amax needs
    (the original amax was rounded down), which is why conversion keeps the quantised tensors as they are.
    """
    with SafetensorsReader(golden / "tiny" / "checkpoint") as r:
        w, s = r["layers.1.attn.wq_b.weight"], r["layers.1.attn.wq_b.scale"]
        d = quant.dequant_fp8(w, s)
        q2, s2 = quant.quant_fp8(d)
        np.testing.assert_array_equal(quant.dequant_fp8(q2, s2), d)
        np.testing.assert_array_equal(q2.view(np.uint8), w.view(np.uint8))  # same scale rule on this tensor
        for name in ["layers.2.ffn.experts.5.w2", "layers.0.ffn.experts.1.w1"]:
            w, s = r[name + ".weight"], r[name + ".scale"]
            d = quant.dequant_fp4(w, s)
            np.testing.assert_array_equal(quant.dequant_fp4(*quant.quant_fp4(d)), d)


def test_fake_quant_fp8_matches_formula():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 256)) * np.array([[1e-3], [1.0], [300.0]])).astype(np.float32)
    got = np.asarray(quant.fake_quant_fp8(jnp.asarray(x), 128))
    for r in range(3):
        for b in range(2):
            blk = x[r, b * 128:(b + 1) * 128]
            s = 2.0 ** np.ceil(np.log2(max(np.abs(blk).max(), 1e-4) / 448.0))
            want = (np.clip(blk / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s)
            np.testing.assert_array_equal(got[r, b * 128:(b + 1) * 128], want)


def test_fake_quant_fp4_round_to_nearest_even_and_partial_blocks():
    x = jnp.asarray([[0.25, 0.75, 1.25, 2.5, 5.0, 6.0, -0.2, -3.4] + [0.0] * 24])  # amax 6 -> scale 1
    np.testing.assert_array_equal(np.asarray(quant.fake_quant_fp4(x, 32))[0, :8], [0, 1, 1, 2, 4, 6, -0, -3])
    y = jnp.asarray(np.linspace(-3, 3, 40, dtype=np.float32))[None]  # 40 = one full + one partial block
    out = np.asarray(quant.fake_quant_fp4(y, 32))
    np.testing.assert_array_equal(out[0, 32:], np.asarray(quant.fake_quant_fp4(y[:, 32:], 32))[0])


@pytest.mark.parametrize("shape", [(4, 64), (3, 130, 96)])
def test_fp4_fp8_round_trip_on_grid_values(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    p, s = quant.quant_fp4(w)
    d = quant.dequant_fp4(p, s)
    assert np.abs(d - w).max() <= np.abs(w).max() / 4  # e2m1 resolution at the top of the range
    np.testing.assert_array_equal(quant.dequant_fp4(*quant.quant_fp4(d)), d)  # grid values are fixed points
    q, s8 = quant.quant_fp8(w.reshape(-1, shape[-1]))
    d8 = quant.dequant_fp8(q, s8)
    np.testing.assert_array_equal(quant.dequant_fp8(*quant.quant_fp8(d8)), d8)


def test_fp8_activation_codes_round_trip():
    """The stored form of SPEC §5b/a (FP8 KV cache): codes and int8 exponents per block, a ragged last
    block, and exact round trips of values already on the grid."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((5, 100)) * np.array([[1e-6], [1e-3], [1.0], [300.0], [0.0]])).astype(np.float32)
    codes, exps = quant.quant_fp8_act(jnp.asarray(x), 64)
    assert codes.dtype == jnp.float8_e4m3fn and exps.dtype == jnp.int8 and exps.shape == (5, 2)
    for b, (lo, hi) in enumerate([(0, 64), (64, 100)]):
        amax = np.maximum(np.abs(x[:, lo:hi]).max(-1), 1e-4)
        np.testing.assert_array_equal(np.asarray(exps[:, b]), np.ceil(np.log2(amax / 448.0)))
    fq = quant.fake_quant_fp8(jnp.asarray(x), 64)
    np.testing.assert_array_equal(np.asarray(quant.dequant_fp8_act(codes, exps, 64)), np.asarray(fq))
    for dt in (jnp.float32, jnp.bfloat16):  # grid values survive a second encoding, in either dtype
        g = fq.astype(dt)
        np.testing.assert_array_equal(np.asarray(quant.dequant_fp8_act(*quant.quant_fp8_act(g, 64), 64, dt)),
                                      np.asarray(g))


def test_fp4_activation_codes_round_trip():
    """The stored form of SPEC §5c (FP4 indexer keys in an FP8 cache): packed codes, int8 exponents,
    ragged and short rows, signed zeros; bit-identical to the fake quantiser and to the formula."""
    rng = np.random.default_rng(3)
    for d in (128, 40, 16):
        x = (rng.standard_normal((4, d)) * np.array([[1e-30], [1e-3], [1.0], [100.0]])).astype(np.float32)
        x[0, :2] = [-0.0, -1e-40]
        packed, exps = quant.quant_fp4_act(jnp.asarray(x), 32)
        n = -(-d // 32)
        assert packed.dtype == jnp.uint8 and packed.shape == (4, n * 16) and exps.shape == (4, n)
        got = np.asarray(reference.dequant_fp4_keys(reference.Fp4Keys(packed, exps), d, jnp.float32))
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(quant.fake_quant_fp4(jnp.asarray(x), 32)).view(np.uint32))
        for b in range(n):
            blk = x[:, b * 32:(b + 1) * 32]
            s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(blk).max(-1), 6 * 2.0 ** -126) / 6))[:, None]
            want = (np.clip(blk / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s)
            np.testing.assert_array_equal(got[:, b * 32:(b + 1) * 32], want)


def test_rounding_hook_sees_each_rounding_and_can_change_it():
    """quant.rounding_hook (the golden qat tie analysis): the hook gets the scaled values and their
    rounding; returning q unchanged changes nothing, a replaced grid value is used, and outside the
    context no hook runs."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 200)).astype(np.float32))
    seen = []

    def record(grid, v, q, rows):
        seen.append((grid, v.shape, rows))
        dtype = ml_dtypes.float8_e4m3fn if grid == "e4m3" else ml_dtypes.float4_e2m1fn
        np.testing.assert_array_equal(np.asarray(q), np.asarray(v).astype(dtype).astype(np.float32))
        return q

    with quant.rounding_hook(record):
        a8, a4 = quant.fake_quant_fp8(x, 128, rows=jnp.arange(3)), quant.fake_quant_fp4(x, 32)
    assert [(g, s) for g, s, _ in seen] == [("e4m3", (3, 2, 128)), ("e2m1", (3, 7, 32))]
    assert seen[0][2] is not None and seen[1][2] is None
    np.testing.assert_array_equal(np.asarray(a8), np.asarray(quant.fake_quant_fp8(x, 128)))
    np.testing.assert_array_equal(np.asarray(a4), np.asarray(quant.fake_quant_fp4(x, 32)))
    assert len(seen) == 2

    with quant.rounding_hook(lambda grid, v, q, rows: q.at[0, 0, 0].set(448.0)):
        b = quant.fake_quant_fp8(x, 128)
    s = 2.0 ** np.ceil(np.log2(np.abs(np.asarray(x[0, :128])).max() / 448.0))
    assert float(b[0, 0]) == 448.0 * s
    np.testing.assert_array_equal(np.asarray(b)[:, 1:], np.asarray(a8)[:, 1:])
