"""fp32 islands (``layers.dot_f32``) against bf16-stored weights as bf16 matmuls on a GPU / TPU.

CPU runs take the upcast path; these tests force the bf16 path (``layers.bf16_passes``) to check
that it gives fp32-accurate products on any backend and lowers for ``cuda`` without an fp32 copy
of the weight.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.hf.checkpoint import load_model
from v4jax.model import layers
from v4jax.model.layers import WeightLayout, dot_f32, split_bf16
from v4jax.model.transformer import Transformer
from conftest import small_config


def test_split_bf16_is_exact():
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (4096,)) * jnp.exp(jax.random.uniform(k2, (4096,), minval=-40, maxval=40))
    x = x.at[:4].set(jnp.array([0.0, -1.0, 3.4e38, 1 + 2 ** -23]))
    parts = split_bf16(x)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    total = sum(np.asarray(p, np.float64) for p in parts)
    np.testing.assert_array_equal(total, np.asarray(x, np.float64))


def test_bf16_weight_passes_are_as_accurate_as_fp32(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (3, 7, 1024)) * 3.0
    w = (jax.random.normal(jax.random.key(2), (515, 1024)) * 0.05).astype(jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    fp32 = dot_f32(x, w)
    monkeypatch.setattr(layers, "bf16_passes", lambda: True)
    passes = dot_f32(x, w)
    chex.assert_shape(passes, (3, 7, 515))
    assert passes.dtype == jnp.float32

    def err(y):
        return np.median(np.abs(np.asarray(y, np.float64) - exact) / np.abs(exact).mean())

    # fp32 accumulation rounding only: the same size as the upcast path's, far below bf16 (~2e-3)
    assert err(passes) <= 2 * err(fp32) + 1e-8, (err(passes), err(fp32))
    assert err(passes) < 1e-6
    xb = x.astype(jnp.bfloat16)  # production activations: one bf16 matmul, products exact
    exact_b = np.asarray(xb, np.float64) @ np.asarray(w, np.float64).T
    got = np.asarray(dot_f32(xb, w), np.float64)
    assert np.median(np.abs(got - exact_b) / np.abs(exact_b).mean()) < 1e-6


def test_released_model_logits_with_bf16_passes(golden, monkeypatch):
    """The golden checkpoint in the released layout (head and gates bf16): logits with the bf16
    passes equal the upcast path's to fp32 accuracy."""
    tokens = jnp.asarray(np.load(golden / "tiny" / "reference_exact.npz")["tokens"][:, :40])
    model = load_model(golden / "tiny" / "checkpoint", mode="exact", layout="released", progress=False)
    assert model.head.weight[...].dtype == jnp.bfloat16
    fp32 = model(tokens)[0]
    monkeypatch.setattr(layers, "bf16_passes", lambda: True)
    passes = model(tokens)[0]
    chex.assert_trees_all_close(passes, fp32, rtol=1e-5, atol=1e-5 * float(jnp.abs(fp32).max()))


@pytest.mark.parametrize("mode, matmuls", [("production", 1), ("exact", 3)])
def test_decode_lowers_for_gpu_without_an_fp32_head(monkeypatch, mode, matmuls):
    """Released layout, decode step lowered for ``cuda``: the head is multiplied in bf16 against the
    bf16 [V, D] weight (production: the bf16 activations once; exact: the three parts of the fp32
    ones) and never converted to fp32."""
    monkeypatch.setattr(layers, "bf16_passes", lambda: True)
    cfg = small_config(vocab_size=1000, hidden_size=128, moe_intermediate_size=64)
    V, D = cfg.vocab_size, cfg.hidden_size
    model = nnx.eval_shape(lambda: Transformer(cfg, mode=mode, layout=WeightLayout.released(cfg)))
    graphdef, state = nnx.split(model)

    def decode(state, token):
        m = nnx.merge(graphdef, state)
        return m.decode(token, m.init_cache(token.shape[0], 64))[0]

    text = jax.jit(decode).trace(state, jax.ShapeDtypeStruct((2,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    head = [l for l in text.splitlines() if "dot_general" in l and f"tensor<{V}x{D}xbf16>" in l]
    assert len(head) == matmuls, head
    assert f"tensor<{V}x{D}xf32>" not in text
