"""MoE routing (score and hash) and the grouped expert computation (ragged_dot and the Pallas kernel)
against a per-token loop."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.model.layers import Numerics, WeightLayout
from v4jax.model.moe import MoE
from conftest import run_on_host_devices, small_config


def _moe(hashed, **over):
    cfg = small_config(**over)
    return cfg, MoE(cfg, hashed=hashed, numerics=Numerics("exact"), layout=WeightLayout.float(), rngs=nnx.Rngs(3))


def _loop_reference(moe, cfg, x, tokens, keep=None):
    """Per token: route, run each chosen expert's clamped SwiGLU, sum; plus the shared expert (numpy f64).
    ``keep`` (bool ``[T, k]``): only these (token, slot) pairs count."""
    x = np.asarray(x, np.float64)
    gw = np.asarray(moe.gate.weight[...], np.float64)
    w1, w2, w3 = (np.asarray(getattr(moe.experts, n).weight[...], np.float64) for n in ("w1", "w2", "w3"))
    L = cfg.swiglu_limit
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        g = np.sqrt(np.log1p(np.exp(gw @ x[t])))
        if moe.gate.hashed:
            idx = np.asarray(moe.gate.tid2eid[...])[tokens[t]]
        else:
            idx = np.argsort(-(g + np.asarray(moe.gate.bias[...])))[:cfg.num_experts_per_tok]
        wts = g[idx] / g[idx].sum() * cfg.routed_scaling_factor
        for j, (e, wt) in enumerate(zip(idx, wts)):
            if keep is not None and not keep[t, j]:
                continue
            a, b = np.minimum(w1[e] @ x[t], L), np.clip(w3[e] @ x[t], -L, L)
            out[t] += w2[e] @ (a / (1 + np.exp(-a)) * b * wt)
    s = moe.shared_experts
    sw1, sw2, sw3 = (np.asarray(getattr(s, n).weight[...], np.float64) for n in ("w1", "w2", "w3"))
    a, b = np.minimum(x @ sw1.T, L), np.clip(x @ sw3.T, -L, L)
    return out + (a / (1 + np.exp(-a)) * b) @ sw2.T


def test_hash_routing_uses_tid2eid():
    cfg, moe = _moe(True)
    table = np.stack([np.arange(cfg.vocab_size) % 4, (np.arange(cfg.vocab_size) + 1) % 4], 1).astype(np.int32)
    moe.gate.tid2eid[...] = jnp.asarray(table)
    tokens = jnp.asarray([[5, 6, 7, 100]])
    x = jax.random.normal(jax.random.key(0), (1, 4, cfg.hidden_size))
    _, route = moe(x, tokens)
    np.testing.assert_array_equal(np.asarray(route["experts"][0]), table[[5, 6, 7, 100]])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_score_routing_picks_topk_of_biased_scores_and_matches_loop(impl):
    cfg, moe = _moe(False, swiglu_limit=0.5, moe_impl=impl)  # a small limit so the clamps are active
    moe.gate.bias[...] = jnp.asarray([0.0, 5.0, 0.0, -5.0])   # expert 1 always chosen, expert 3 never
    x = jax.random.normal(jax.random.key(1), (2, 6, cfg.hidden_size)) * 3
    tokens = jnp.zeros((2, 6), jnp.int32)
    y, route = moe(x, tokens)
    e = np.asarray(route["experts"])
    assert (e == 1).any(-1).all() and not (e == 3).any()
    want = _loop_reference(moe, cfg, np.asarray(x).reshape(-1, cfg.hidden_size), np.zeros(12, int))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.hidden_size), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_hash_moe_matches_loop(impl):
    cfg, moe = _moe(True, moe_impl=impl)
    x = jax.random.normal(jax.random.key(2), (1, 9, cfg.hidden_size))
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, cfg.vocab_size)
    y, _ = moe(x, tokens)
    want = _loop_reference(moe, cfg, np.asarray(x)[0], np.asarray(tokens)[0])
    np.testing.assert_allclose(np.asarray(y)[0], want, rtol=2e-5, atol=2e-5)


def test_pallas_experts_gradients_match_ragged_dot():
    """Training differentiates through the experts: the kernel's custom VJP gives ragged_dot's gradients."""
    x = jax.random.normal(jax.random.key(4), (2, 7, small_config().hidden_size))
    tokens = jnp.zeros((2, 7), jnp.int32)
    grads = {}
    for impl in ("xla", "pallas"):
        _, moe = _moe(False, moe_impl=impl)
        graphdef, params = nnx.split(moe, nnx.Param)

        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x, tokens)
            return jnp.sum(jnp.sin(y))

        grads[impl] = jax.grad(loss, argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(grads["pallas"], grads["xla"], rtol=1e-5, atol=1e-5)


_EP_SCRIPT = """
import sys
import chex, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from v4jax.model.layers import Numerics, WeightLayout
from v4jax.model.moe import MoE
from conftest import small_config

assert jax.device_count() == 4
cfg = small_config(moe_impl=sys.argv[1])
moe = MoE(cfg, hashed=False, numerics=Numerics("exact"), layout=WeightLayout.float(), rngs=nnx.Rngs(3))
graphdef, params = nnx.split(moe, nnx.Param)
x = jax.random.normal(jax.random.key(4), (4, 7, cfg.hidden_size))
tokens = jnp.zeros((4, 7), jnp.int32)

def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, tokens)
    return jnp.sum(jnp.sin(y))

f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
one = f(params, x)
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1, 2, 1), ("data", "fsdp", "expert", "tensor"))
with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(loss)(params, x))
    assert "all_gather" in jaxpr and "reduce_scatter" in jaxpr   # the expert-parallel path ran
    ep = f(params, x)
chex.assert_trees_all_close(ep, one, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_expert_parallel_matches_one_device(impl):
    """On a mesh with expert=2 (4 host devices), values and gradients equal the single-device MoE."""
    out = run_on_host_devices(_EP_SCRIPT, 4, impl)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("expert_dtype,mode", [("fp4", "exact"), ("fp8", "exact"), ("fp4", "qat")])
def test_few_pairs_dequantise_only_the_picked_experts(tmp_path, expert_dtype, mode):
    """Quantised experts with fewer token-expert pairs than experts (decoding) gather and dequantise only
    the picked experts' matrices; the output equals the dequantise-all path (here: float weights)."""
    from conftest import write_random_checkpoint
    from v4jax.hf.checkpoint import load_model

    cfg = small_config(expert_dtype=expert_dtype, n_routed_experts=8, hidden_size=128)
    write_random_checkpoint(tmp_path, cfg)
    quantised = load_model(tmp_path, mode=mode, layout="released", progress=False).layers[1].ffn  # score-routed
    dense = load_model(tmp_path, mode=mode, layout="float", progress=False).layers[1].ffn
    for tokens, picked in ((3, True), (4, False)):  # 3·2 pairs < 8 experts; 4·2 = 8 do not
        x = jax.random.normal(jax.random.key(tokens), (1, tokens, cfg.hidden_size))
        ids = jnp.zeros((1, tokens), jnp.int32)
        jaxpr = str(jax.make_jaxpr(lambda x: quantised(x, ids)[0])(x))
        assert ("ragged_dot" not in jaxpr) == picked
        chex.assert_trees_all_close(quantised(x, ids)[0], dense(x, ids)[0], rtol=1e-5, atol=1e-5)


_CAPACITY_SCRIPT = """
import math
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from v4jax.model.layers import Numerics, WeightLayout
from v4jax.model.moe import MoE
from conftest import small_config
from test_moe import _loop_reference

T, k, n = 12, 2, 4
mesh = Mesh(np.asarray(jax.devices()).reshape(1, 1, n, 1), ("data", "fsdp", "expert", "tensor"))
x = jax.random.normal(jax.random.key(5), (1, T, small_config().hidden_size))
tokens = jnp.arange(T)[None] % 3
table = np.array([[1, 0], [1, 2], [1, 3]] + [[0, 1]] * 157, np.int32)  # expert 1 takes every token
for c in (4.0, 1.0, 0.5):  # 4: room for every pair; 1, 0.5: cap = 6, 3 pairs per device
    cfg = small_config(moe_capacity=c)
    moe = MoE(cfg, hashed=True, numerics=Numerics("exact"), layout=WeightLayout.float(), rngs=nnx.Rngs(3))
    moe.gate.tid2eid[...] = jnp.asarray(table)
    with jax.set_mesh(mesh):
        y, route = jax.jit(lambda x: moe(x, tokens))(x)
    # expected: device e keeps its expert's first `cap` pairs in (token, slot) order
    cap = min(T * k, math.ceil(c * T * k / n))
    ids = table[np.asarray(tokens)[0]]
    keep = np.zeros_like(ids, bool)
    for e in range(n):
        pairs = np.flatnonzero(ids.reshape(-1) == e)[:cap]
        keep.reshape(-1)[pairs] = True
    want = _loop_reference(moe, cfg, np.asarray(x)[0], np.asarray(tokens)[0], keep=keep)
    np.testing.assert_allclose(np.asarray(y)[0], want, rtol=2e-5, atol=2e-5, err_msg=str(c))
    np.testing.assert_allclose(float(route["dropped"]), 1 - keep.mean(), rtol=1e-6, err_msg=str(c))
    assert (c < 4) == (keep.mean() < 1), (c, keep.mean())
print("ok")
"""


def test_expert_capacity_drops_the_pairs_past_it():
    """moe_capacity on a mesh with expert=4 (4 host devices, one expert each): each device keeps its
    expert's first ceil(c * pairs / 4) pairs in (token, slot) order; the rest contribute nothing and the
    dropped fraction is reported. A capacity with room for every pair gives the dropless result."""
    out = run_on_host_devices(_CAPACITY_SCRIPT, 4)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


_WIDTHS_SCRIPT = """
import sys
from pathlib import Path
import chex, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from v4jax.hf.checkpoint import load_model
from v4jax.model.layers import Numerics, WeightLayout
from v4jax.model.moe import MoE
from v4jax.sharding import collective_bytes, param_shardings, weights_in_place
from conftest import small_config, write_random_checkpoint

mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2, 2, 2), ("data", "fsdp", "expert", "tensor"))

def placed(state):
    with jax.set_mesh(mesh):
        pure = jax.device_put(nnx.to_pure_dict(state), param_shardings(state, mesh))
    nnx.replace_by_pure_dict(state, pure)
    return state

# training-side: float experts, values and gradients (I over tensor; D over fsdp for these few rows)
for impl in ("xla", "pallas"):
    cfg = small_config(moe_impl=impl)
    moe = MoE(cfg, hashed=False, numerics=Numerics("exact"), layout=WeightLayout.float(), rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(moe, nnx.Param)
    for shape in ((4, 8), (1, 3)):
        x = jax.random.normal(jax.random.key(4), (*shape, cfg.hidden_size))
        tokens = jnp.zeros(shape, jnp.int32)

        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x, tokens)
            return jnp.sum(jnp.sin(y))

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        one = f(params, x)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(loss)(params, x))
            got = f(placed(nnx.split(moe, nnx.Param)[1]), x)
        assert "psum[axes=('fsdp',)" in jaxpr and "'tensor'" in jaxpr, jaxpr  # the widths stayed split
        chex.assert_trees_all_close(got, one, rtol=1e-5, atol=1e-5)

# decoding: quantised experts as released; no expert weight moves between devices
for dtype, mode in (("fp4", "exact"), ("fp8", "exact"), ("fp4", "qat")):
    cfg = small_config(expert_dtype=dtype, n_routed_experts=8, hidden_size=256, moe_intermediate_size=256)
    path = Path(sys.argv[1]) / f"{dtype}-{mode}"
    write_random_checkpoint(path, cfg)
    ffn = load_model(path, mode=mode, layout="released", progress=False).layers[1].ffn
    x = jax.random.normal(jax.random.key(1), (1, 3, cfg.hidden_size))
    ids = jnp.zeros((1, 3), jnp.int32)
    graphdef, state = nnx.split(ffn)

    @jax.jit
    def step(state, x):
        with weights_in_place():
            return nnx.merge(graphdef, state)(x, ids)[0]

    one = step(state, x)
    state = placed(state)
    with jax.set_mesh(mesh):
        got = step(state, x)
        moved = collective_bytes(step.lower(state, x).compile().as_text())
    chex.assert_trees_all_close(got, one, rtol=1e-5, atol=1e-5)
    # the experts' weights (fp4: 3 x 8 x 256 x 128 bytes) used to be gathered over fsdp and tensor
    assert moved.get("all-gather", 0) < 16 * 1024, (dtype, mode, moved)
print("ok")
"""


def test_expert_widths_stay_split_over_tensor_and_fsdp(tmp_path):
    """On a mesh with fsdp = expert = tensor = 2 (8 host devices) each device multiplies the part of its
    experts' weights it holds (hidden width over tensor, model width over fsdp for a few rows):
    values and gradients equal one device's, and a decoding step of released (FP4 / FP8) experts
    gathers none of their weights."""
    out = run_on_host_devices(_WIDTHS_SCRIPT, 8, str(tmp_path), timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
