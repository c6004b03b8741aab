"""Whole-model behaviour: decode == prefill, causality, decoding from an empty cache, across configs."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.generate import Engine, cache_bytes
from v4jax.model.transformer import Transformer
from conftest import small_config

CONFIGS = {
    # window-only, CSA, HCA(8) layers; the MTP block is CSA; hc 2
    "mixed": dict(),
    # hc 3, HCA first, no hash layer, no shared expert, width not a multiple of 128, small window / top-k
    "odd": dict(hc_mult=3, compress_ratios=[4, 16, 0, 0], sliding_window=5, index_topk=2, num_hash_layers=0,
                n_shared_experts=0, hidden_size=96, num_attention_heads=3, o_groups=3),
}


def _model(name, mode="exact", seed=0):
    return Transformer(small_config(**CONFIGS[name]), mode=mode, rngs=nnx.Rngs(seed))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_equals_prefill(name):
    model = _model(name)
    S0, M = 37, 12
    tokens = jax.random.randint(jax.random.key(1), (2, S0 + M), 0, model.cfg.vocab_size)
    engine = Engine(model, max_len=S0 + M)
    full, _, _ = engine.prefill(tokens)
    logits, cache, _ = engine.prefill(tokens[:, :S0])
    chex.assert_shape(logits, (2, S0, model.cfg.vocab_size))
    chex.assert_trees_all_close(logits, full[:, :S0], rtol=1e-5, atol=1e-5)
    steps = []
    for t in range(S0, S0 + M):
        step, cache = engine.decode(tokens[:, t], cache)
        steps.append(step)
    assert int(cache.pos) == S0 + M
    assert _rel(jnp.stack(steps, 1), full[:, S0:]).max() < 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_from_empty_cache_equals_full_forward(impl):
    """Every position decoded, the first ones before the window ring is full (window 8, S 26)."""
    model = Transformer(small_config(attention_impl=impl), mode="exact", rngs=nnx.Rngs(0))
    S = 26
    tokens = jax.random.randint(jax.random.key(2), (1, S), 0, model.cfg.vocab_size)
    engine = Engine(model, max_len=S)
    full, _, _ = engine.prefill(tokens)
    cache = model.init_cache(1, S)
    steps = []
    for t in range(S):
        step, cache = engine.decode(tokens[:, t], cache)
        steps.append(step)
    assert _rel(jnp.stack(steps, 1), full).max() < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    model = _model(name, seed=1)
    k, S = 21, 40
    a = jax.random.randint(jax.random.key(3), (2, S), 0, model.cfg.vocab_size)
    b = a.at[:, k:].set(jax.random.randint(jax.random.key(4), (2, S - k), 0, model.cfg.vocab_size))
    f = nnx.jit(lambda m, t: m(t)[0])
    la, lb = f(model, a), f(model, b)
    chex.assert_trees_all_close(la[:, :k], lb[:, :k], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(la[:, k:] - lb[:, k:]).max()) > 1e-3   # later positions do see the change


def test_production_mode_runs_in_bf16_and_stays_close_to_exact():
    exact, prod = _model("mixed"), _model("mixed", mode="production")
    tokens = jax.random.randint(jax.random.key(5), (2, 30), 0, exact.cfg.vocab_size)
    le = nnx.jit(lambda m, t: m(t))(exact, tokens)
    lp = nnx.jit(lambda m, t: m(t))(prod, tokens)
    assert lp[0].dtype == jnp.float32 and lp[1].dtype == jnp.bfloat16      # fp32 logits, bf16 residual
    assert np.median(_rel(lp[0], le[0])) < 0.05


def test_cache_bytes_counts_compressed_entries():
    cfg = small_config()
    r = cache_bytes(cfg, 1024, mode="production")
    hd, win = cfg.head_dim, cfg.sliding_window
    ckv = sum(1024 // m * hd * 2 for m in cfg.compress_ratios[:cfg.num_hidden_layers] if m)
    ikv = sum(1024 // 4 * cfg.index_head_dim * 2 for m in cfg.compress_ratios[:cfg.num_hidden_layers] if m == 4)
    assert r["parts"]["ckv"] == ckv and r["parts"]["ikv"] == ikv
    assert r["parts"]["win_kv"] == cfg.num_hidden_layers * win * hd * 2
