"""Experts' grouped matmul: Triton kernels, and the TPU path (ragged_dot + the Mosaic weight-gradient
kernel), in interpret mode on CPU (compiled on their accelerator) == reference (ragged_dot) == numpy
loop."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.grouped_matmul import grouped_matmul, row_tile, tile_layout
from conftest import kernel_kw

CASES = {
    # ragged groups, empty groups, dims that are not multiples of a tile
    "ragged_f32": dict(sizes=[9, 0, 17, 1, 0, 8], M=37, K=40, N=24, dtype=jnp.float32),
    # one group takes every row; rows span several tiles
    "one_group_f32": dict(sizes=[0, 70, 0], M=70, K=64, N=32, dtype=jnp.float32),
    # decode: fewer rows than experts; trailing rows past sum(sizes) must come out zero
    "decode_rows_f32": dict(sizes=[0, 1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], M=6, K=32, N=16,
                            dtype=jnp.float32),
    # bf16 with several column and contraction blocks
    "multi_block_bf16": dict(sizes=[50, 3, 0, 91, 16], M=160, K=192, N=128, dtype=jnp.bfloat16),
}
# TPU weight gradient: row tiles of 128 shared by groups, a partial last tile, rows past the groups,
# K in several 128-column blocks, N past 512 and not a multiple of 128 (padded)
TPU_CASES = {"tiles_f32": dict(sizes=[200, 0, 333, 1, 150], M=700, K=384, N=520, dtype=jnp.float32)}
BACKEND_CASES = [(b, c) for b in ("triton", "mosaic") for c in CASES] + [("mosaic", c) for c in TPU_CASES]
CASES.update(TPU_CASES)
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _make(case, seed=0):
    rng = np.random.default_rng(seed)
    E = len(case["sizes"])
    x = jnp.asarray(rng.standard_normal((case["M"], case["K"])), case["dtype"])
    w = jnp.asarray(rng.standard_normal((E, case["N"], case["K"])) / np.sqrt(case["K"]), case["dtype"])
    return x, w, jnp.asarray(case["sizes"], jnp.int32)


def _numpy(x, w, sizes):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, r = np.zeros((x.shape[0], w.shape[1])), 0
    for e, n in enumerate(np.asarray(sizes)):
        out[r:r + n] = x[r:r + n] @ w[e].T
        r += n
    return out


@pytest.mark.parametrize("backend,case", BACKEND_CASES)
def test_forward_matches_reference(backend, case):
    c = CASES[case]
    x, w, sizes = _make(c)
    got = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, **kernel_kw(backend)))(x, w, sizes)
    want = ref.grouped_matmul(x, w, sizes)
    chex.assert_shape(got, (c["M"], c["N"]))
    assert got.dtype == jnp.float32
    chex.assert_trees_all_close(got, want, **TOL[c["dtype"]])
    np.testing.assert_allclose(np.asarray(want), _numpy(x, w, sizes), **TOL[c["dtype"]])
    tail = int(np.sum(c["sizes"]))
    chex.assert_trees_all_equal(got[tail:], jnp.zeros_like(got[tail:]))


@pytest.mark.parametrize("backend,case", BACKEND_CASES)
def test_gradients_match_reference(backend, case):
    c = CASES[case]
    x, w, sizes = _make(c, seed=1)
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((c["M"], c["N"])), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.tanh(fn(x, w, sizes)) * probe)

    got = jax.jit(jax.grad(loss(lambda *a: grouped_matmul(*a, **kernel_kw(backend))), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(ref.grouped_matmul), argnums=(0, 1))(x, w)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    tol = TOL[c["dtype"]] if c["dtype"] == jnp.float32 else dict(rtol=3e-2, atol=6e-2)
    if c["M"] > 500:  # float32 sums over hundreds of rows in another order
        tol = dict(rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(got, want, **tol)
    # an expert that received no row gets an exactly zero weight gradient
    empty = [e for e, n in enumerate(c["sizes"]) if n == 0]
    chex.assert_trees_all_equal(got[1][jnp.asarray(empty, jnp.int32)] if empty else 0.0,
                                jnp.zeros_like(got[1][jnp.asarray(empty, jnp.int32)]) if empty else 0.0)


def test_mixed_dtypes_compute_in_promoted_type():
    x, w, sizes = _make(CASES["ragged_f32"])
    got = grouped_matmul(x.astype(jnp.bfloat16), w, sizes, **kernel_kw())
    want = ref.grouped_matmul(x.astype(jnp.bfloat16), w, sizes)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes,bm", [([5, 0, 40, 1], 16), ([0, 0, 0], 16), ([300, 2], 128)])
def test_tile_layout(sizes, bm):
    """Each tile holds the rows of one group only, in order; no two rows share a slot; ``src`` inverts
    ``dest`` on the used slots, and neither repeats an index (so their gathers need no atomics)."""
    M = max(sum(sizes), 1)
    lay = tile_layout(jnp.asarray(sizes, jnp.int32), M, bm)
    dest, tg = np.asarray(lay.dest), np.asarray(lay.tile_group)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    live = dest < lay.n_tiles * bm
    assert live.sum() == sum(sizes) and len(set(dest[live])) == live.sum()
    np.testing.assert_array_equal(tg[dest[live] // bm], groups)
    assert np.all(np.diff(dest[live]) > 0)
    np.testing.assert_array_equal(np.asarray(lay.tile_count), -(-np.asarray(sizes) // bm))
    assert (tg >= 0).sum() == np.asarray(lay.tile_count).sum() <= lay.n_tiles
    src = np.asarray(lay.src)
    assert src.shape == (lay.n_tiles * bm,)
    np.testing.assert_array_equal(src[dest[live]], np.flatnonzero(live))
    unused = np.ones(src.size, bool)
    unused[dest[live]] = False
    assert np.all(src[unused] >= M)
    assert len(set(dest)) == dest.size and len(set(src)) == src.size


def test_row_tile_follows_rows_per_group():
    assert row_tile(6, 256) == 16        # decode
    assert row_tile(64 * 384, 64) == 128  # training: many rows per expert
    assert row_tile(2000, 64) == 32


@pytest.mark.parametrize("sizes,M", [([5, 0, 40, 1], 46), ([0, 0, 0], 10), ([300, 2, 0, 700], 1100)])
def test_tpu_weight_gradient_visits(sizes, M):
    """The TPU dw kernel's steps walk the groups in order; each group's steps cover its rows' tiles
    exactly, once each; a group without rows takes one step; the steps used fit the grid."""
    from pallas_kernels import _gmm_mosaic

    assert _gmm_mosaic.row_tile(30720, 4) == 512 and _gmm_mosaic.row_tile(49152, 64) == 128
    bm = 128
    group, tile, starts, ends, used = (np.asarray(a) for a in _gmm_mosaic._visits(jnp.asarray(sizes), M, bm))
    used = int(used[0])
    assert len(group) == -(-M // bm) + len(sizes) - 1 >= used
    assert np.all(np.diff(group[:used]) >= 0)
    for e, n in enumerate(sizes):
        want = sorted({r // bm for r in range(starts[e], ends[e])}) if n else [None]
        got = tile[:used][group[:used] == e].tolist()
        assert len(got) == len(want) and (n == 0 or got == want), (e, got, want)


def test_bad_inputs_are_named():
    x, w, sizes = _make(CASES["ragged_f32"])
    with pytest.raises(ValueError, match=r"w must be \[E, N, K=40\]"):
        grouped_matmul(x, w[:, :, :8], sizes, interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes must be an integer array \[E=6\]"):
        grouped_matmul(x, w, sizes[:3], interpret=True)
    with pytest.raises(ValueError, match="x dtype"):
        grouped_matmul(x.astype(jnp.float16), w, sizes, interpret=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_matmul(x, w, sizes, backend="cuda")


def test_lowers_for_gpu_at_v4_flash_expert_shapes():
    """Forward + backward lower to three Triton kernels at V4-Flash sizes (4K tokens x top-6 rows,
    hidden 4096, expert width 2048, 256 experts), bf16."""
    sd = jax.ShapeDtypeStruct
    M, K, N, E = 4096 * 6, 4096, 2048, 256

    def loss(x, w, sizes):
        return jnp.sum(grouped_matmul(x, w, sizes, backend="triton"))

    args = (sd((M, K), jnp.bfloat16), sd((E, N, K), jnp.bfloat16), sd((E,), jnp.int32))
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_benchmark_smoke_runs():
    """benchmarks/moe.py --smoke (interpret mode) prints its table: the script keeps working."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--reps", "1"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("w1 ")]
    assert len(rows) == 4 and not any("error" in r for r in rows), out.stdout
