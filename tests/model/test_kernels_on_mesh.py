"""The Pallas kernels under a device mesh: each device runs them on its own rows (and heads), through
``sharding.local_call``. XLA cannot split a kernel over devices itself: Mosaic (TPU) refuses to
lower one inside an automatically partitioned program, and a Triton kernel would run whole on
every GPU. Four host devices stand in for a slice."""
from __future__ import annotations

import pytest

from conftest import run_on_host_devices

_SCRIPT = """
import chex, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from conftest import small_config
import pallas_kernels
from v4jax import sharding
from v4jax.model.transformer import Transformer

assert jax.device_count() == 4
def build(moe_impl):
    cfg = small_config(attention_impl="pallas", moe_impl=moe_impl, num_attention_heads=4, index_n_heads=4,
                       num_hidden_layers=2, compress_ratios=[4, 8, 0])  # CSA, HCA; the MTP block: window
    return cfg, nnx.split(Transformer(cfg, mode="exact", rngs=nnx.Rngs(0)), nnx.Param, ...)

cfg, (graph, params0, rest) = build("pallas")
params = nnx.to_pure_dict(params0)
tokens = jax.random.randint(jax.random.key(1), (4, 25), 0, cfg.vocab_size)

def merged(params, parts=(graph, params0, rest)):
    state = nnx.State(parts[1])
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(parts[0], state, parts[2])

def loss(params, tokens, parts=(graph, params0, rest)):  # the training forward, every kernel differentiated
    logits, _, _, infos = merged(params, parts)(tokens, train=True)
    return jnp.mean(jnp.sin(logits)) + sum(i["indexer_kl"] for i in infos if "indexer_kl" in i)

tpu_parts = build("xla")[1]  # no grouped-matmul kernel on TPU: ragged_dot

def generate(params, tokens):  # prefill, then one decoding step at a traced position
    m = merged(params)
    logits, cache, _ = m.prefill(tokens[:, :24], max_len=32)
    step, _ = m.decode(tokens[:, 24], cache)
    return logits, step

grad = jax.jit(jax.value_and_grad(loss))
gen = jax.jit(generate)
want_grad, want_gen = grad(params, tokens), gen(params, tokens)
devices = np.asarray(jax.devices())
for shape in ((2, 1, 1, 2), (1, 2, 2, 1)):  # data x tensor (heads split); fsdp x expert
    mesh = Mesh(devices.reshape(shape), sharding.AXES)
    p = jax.device_put(params, sharding.param_shardings(params0, mesh))
    t = jax.device_put(tokens, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        got_grad, got_gen = grad(p, t), gen(p, t[:1])
        with pallas_kernels.target_platform("tpu"):  # Mosaic refuses kernels outside a shard_map
            text = jax.jit(jax.value_and_grad(lambda p, t: loss(p, t, tpu_parts))).trace(p, t).lower(
                lowering_platforms=("tpu",)).as_text()
    chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-4, atol=1e-5, custom_message=str(shape))
    chex.assert_trees_all_close(got_gen, jax.tree.map(lambda x: x[:1], want_gen), rtol=1e-4, atol=1e-5,
                                custom_message=str(shape))
    assert text.count("tpu_custom_call") >= 8 and "sdy.manual_computation" in text, shape
print("ok")
"""


@pytest.mark.slow
def test_kernels_on_a_mesh_match_one_device():
    """Values and gradients of the training forward (all Pallas kernels, interpret mode), and prefill +
    decode logits (one sequence: replicated rows), on data x tensor and fsdp x expert meshes equal
    one device's; the same step lowers for TPU on the mesh (Mosaic kernels inside shard_maps)."""
    out = run_on_host_devices(_SCRIPT, 4, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
