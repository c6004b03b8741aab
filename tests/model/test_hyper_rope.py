"""mHC Sinkhorn projection and RoPE / YaRN frequencies against the formulas of SPEC §2."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.config import RopeScaling
from v4jax.model.hyper import hc_mixes, hc_post, hc_pre, sinkhorn
from v4jax.model.rope import apply_rope, rope_frequencies, rope_tables


@pytest.mark.parametrize("hc", [2, 4, 6])
def test_sinkhorn_is_doubly_stochastic(hc):
    logits = jax.random.normal(jax.random.key(hc), (5, 7, hc, hc))
    C = sinkhorn(logits, iters=20, eps=1e-6)
    chex.assert_shape(C, (5, 7, hc, hc))
    assert bool(jnp.all(C > 0))
    chex.assert_trees_all_close(C.sum(-2), jnp.ones((5, 7, hc)), atol=1e-5)   # columns (normalised last)
    chex.assert_trees_all_close(C.sum(-1), jnp.ones((5, 7, hc)), atol=1e-4)   # rows (20 iterations)


def test_sinkhorn_converges_on_peaked_logits():
    logits = jax.random.normal(jax.random.key(0), (5, 7, 4, 4)) * 3   # far from uniform: slower convergence
    err = [float(jnp.abs(sinkhorn(logits, iters=n, eps=1e-6).sum(-1) - 1).max()) for n in (20, 100, 500)]
    assert err[0] > err[1] > err[2] and err[2] < 1e-4


def test_hc_mixes_ranges_and_identity_mixing():
    hc, D = 4, 8
    X = jax.random.normal(jax.random.key(0), (2, 3, hc, D))
    fn = jax.random.normal(jax.random.key(1), ((2 + hc) * hc, hc * D)) * 0.1
    pre, post, C = hc_mixes(X, fn, jnp.zeros((2 + hc) * hc), jnp.ones(3), iters=20, hc_eps=1e-6, norm_eps=1e-6)
    assert bool(jnp.all((pre > 0) & (pre < 1 + 1e-5))) and bool(jnp.all((post > 0) & (post < 2)))
    # with C = identity and post = 0 the residual passes unchanged; u is the pre-weighted sum of copies
    out = hc_post(jnp.ones((2, 3, D)), X, jnp.zeros((2, 3, hc)), jnp.broadcast_to(jnp.eye(hc), (2, 3, hc, hc)))
    chex.assert_trees_all_close(out, X)
    u = hc_pre(X, pre, jnp.float32)
    chex.assert_trees_all_close(u, jnp.einsum("bsi,bsid->bsd", pre, X), atol=1e-6)


def test_hc_post_index_order_source_to_target():
    X = jnp.arange(2 * 3, dtype=jnp.float32).reshape(1, 1, 2, 3)  # copy 0 = [0,1,2], copy 1 = [3,4,5]
    C = jnp.array([[[[0.0, 1.0], [0.0, 0.0]]]])                  # C[i=0, j=1] = 1: copy 0 flows into copy 1
    out = hc_post(jnp.zeros((1, 1, 3)), X, jnp.zeros((1, 1, 2)), C)
    np.testing.assert_array_equal(np.asarray(out[0, 0]), [[0, 0, 0], [0, 1, 2]])


def _yarn_by_hand(rd, theta, factor, L0, bfast, bslow):
    def d(n):
        return rd * math.log(L0 / (2 * math.pi * n)) / (2 * math.log(theta))
    lo, hi = max(math.floor(d(bfast)), 0), min(math.ceil(d(bslow)), rd - 1)
    out = []
    for i in range(rd // 2):
        f = theta ** (-2 * i / rd)
        r = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f / factor * r + f * (1 - r))
    return np.array(out)


@pytest.mark.parametrize("rd,theta,factor,L0", [(64, 160000.0, 16, 65536), (16, 160000.0, 4, 64), (32, 10000.0, 8, 4096)])
def test_yarn_frequencies_match_formula(rd, theta, factor, L0):
    got = rope_frequencies(rd, theta, RopeScaling("yarn", factor, L0, 32, 1))
    np.testing.assert_allclose(got, _yarn_by_hand(rd, theta, factor, L0, 32, 1), rtol=1e-6)
    np.testing.assert_allclose(rope_frequencies(rd, theta), theta ** (-np.arange(0, rd, 2) / rd), rtol=1e-6)


def test_rope_rotates_interleaved_pairs_and_inverts():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 24))
    freqs = rope_frequencies(8, 10000.0)
    cos, sin = rope_tables(jnp.arange(5), freqs)
    y = apply_rope(x, cos[:, None], sin[:, None])
    chex.assert_trees_all_close(y[..., :16], x[..., :16])          # non-RoPE dims untouched
    t, i = 3, 2                                                     # pair (2i, 2i+1) of the RoPE part
    a, b = x[0, t, 0, 16 + 2 * i], x[0, t, 0, 16 + 2 * i + 1]
    ang = t * freqs[i]
    chex.assert_trees_all_close(y[0, t, 0, 16 + 2 * i], a * math.cos(ang) - b * math.sin(ang), atol=1e-6)
    chex.assert_trees_all_close(y[0, t, 0, 16 + 2 * i + 1], a * math.sin(ang) + b * math.cos(ang), atol=1e-6)
    chex.assert_trees_all_close(apply_rope(y, cos[:, None], sin[:, None], inverse=True), x, atol=1e-6)
