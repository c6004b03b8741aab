"""Optional: compile the TPU (Mosaic) kernels, the training step and a decoding step for TPU slices on
a machine without a TPU.

libtpu (``pip install 'jax[tpu]'``) describes a slice (``jax.experimental.topologies``) and XLA's
TPU compiler compiles for it ahead of time: each Pallas kernel goes through Mosaic's own checks
(layouts, alignment, VMEM capacity) and the step through XLA's buffer assignment in the chips'
memory. Skipped where libtpu is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from conftest import attention_sum

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"]


def _one_chip(topology):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from v4jax.trainer import tpu_devices
    return NamedSharding(Mesh(tpu_devices(topology)[:1], ("x",)), P())


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_attention_kernels_compile_for_tpu(mode, topology):
    """Forward + backward of a 1K-token prefill and a decoding step at 64K context, V4-Flash shapes
    (64 heads, head dim 512, window 128, top-k 512), bf16; for CSA on v5p also forward + backward
    of an 8K-token chunk at 128K context (``csa_in_chunks``)."""
    rep = _one_chip(topology)

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    H, D = 64, 512
    for decode in (False, True):
        B, S, T, ctx = (2, 1, 128, 1 << 16) if decode else (1, 1024, 1024, 1024)
        N = ctx // (4 if mode == "csa" else 128)
        kw = dict(window=128, scale=D ** -0.5, backend="mosaic")
        if decode:
            kw.update(q_start=ctx - 1, kv_start=ctx - T)
        f = attention_sum(mode, **kw)
        g = f if decode else jax.value_and_grad(f, argnums=(0, 1, 2, 4))
        args = (sd((B, S, H, D), jnp.bfloat16), sd((B, T, D), jnp.bfloat16), sd((B, N, D), jnp.bfloat16),
                sd((B, S, 512), jnp.int32), sd((H,), jnp.float32))
        compiled = jax.jit(g).trace(*args).lower().compile()
        assert compiled.as_text().count("tpu_custom_call") >= (1 if decode else 3)
    if mode == "csa" and topology == "v5p:2x2x1":
        # an 8K-query chunk at 128K context runs as chunks of queries over their gathered picks; the
        # backward recomputes them: the temporaries hold no 8K x 512 picked rows (4 GiB in bf16), and
        # d(ckv)'s float32 sums convert a chunk's row gradients a piece at a time (0.69 GiB; 1.19 GiB
        # with all 512 MiB of them converted at once, 0.63 GiB with the sums in bf16)
        S, T = 8192, 1 << 17
        f = attention_sum(mode, window=128, scale=D ** -0.5, backend="mosaic", q_start=T - S)
        args = (sd((1, S, H, D), jnp.bfloat16), sd((1, T, D), jnp.bfloat16), sd((1, T // 4, D), jnp.bfloat16),
                sd((1, S, 512), jnp.int32), sd((H,), jnp.float32))
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 4))).trace(*args).lower().compile()
        assert compiled.as_text().count("tpu_custom_call") >= 4 and "while" in compiled.as_text()
        assert compiled.memory_analysis().temp_size_in_bytes < (1 << 30)


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_long_prefills_compile_for_tpu(mode):
    """Scalar-prefetched plans stay within SMEM (about 1 MiB) however long the prefill or large the
    batch: 512K queries of V4-Flash shapes (forward), 1M queries of 8 heads (forward + backward), and
    for CSA 64 sequences of 16K queries (forward + backward, chunked)."""
    rep = _one_chip("v5p:2x2x1")

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    cases = [(1, 1 << 19, 64, 512, False), (1, 1 << 20, 8, 128, True)]
    if mode == "csa":
        cases = [(1, 1 << 19, 64, 512, False), (64, 1 << 14, 8, 128, True)]
    for B, S, H, D, grad in cases:
        N = S // (4 if mode == "csa" else 128)
        f = attention_sum(mode, window=128, scale=D ** -0.5, backend="mosaic")
        g = jax.value_and_grad(f, argnums=(0, 1, 2, 4)) if grad else f
        args = (sd((B, S, H, D), jnp.bfloat16), sd((B, S, D), jnp.bfloat16), sd((B, N, D), jnp.bfloat16),
                sd((B, S, 512 if D == 512 else 64), jnp.int32), sd((H,), jnp.float32))
        compiled = jax.jit(g).trace(*args).lower().compile()
        assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("keys", ["bf16", "fp4"])
def test_indexer_compiles_for_tpu(keys, topology):
    """Indexer top-k (64 heads of width 128, top-k 512): a 4K-token prefill and a decoding step at 1M context."""
    rep = _one_chip(topology)

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    for S, N, q_start in ((4096, 1024, 0), (1, 1 << 18, (1 << 20) - 1)):
        k = (pk.Fp4Keys(sd((2, N, 64), jnp.uint8), sd((2, N, 4), jnp.int8)) if keys == "fp4"
             else sd((2, N, 128), jnp.bfloat16))
        f = jax.jit(lambda q, w, k: pk.indexer_topk(q, w, k, 512, q_start=q_start, backend="mosaic"))
        f.trace(sd((2, S, 64, 128), jnp.bfloat16), sd((2, S, 64), jnp.float32), k).lower().compile()


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_grouped_matmul_compiles_for_tpu(topology):
    """Forward + backward of the experts' grouped matmul at one device's V4-Flash shapes under expert
    parallelism 64 (4 experts, 30K rows, hidden 4096, expert width 2048), bf16: the weight gradient is
    the Mosaic kernel, and no dense product over all groups is left (XLA's transpose of ragged_dot
    is a convolution over every group)."""
    rep = _one_chip(topology)
    M, K, N, E = 30720, 4096, 2048, 4
    args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in
            (((M, K), jnp.bfloat16), ((E, N, K), jnp.bfloat16), ((E,), jnp.int32))]
    f = jax.value_and_grad(lambda x, w, s: jnp.sum(pk.grouped_matmul(x, w, s, backend="mosaic")), argnums=(0, 1))
    text = jax.jit(f).trace(*args).lower().compile().as_text()
    assert "v4_tgmm_tpu" in text
    assert "convolution(" not in text


def test_tpu_topology_errors_name_the_problem():
    from v4jax.config import ConfigError
    from v4jax.trainer import tpu_devices
    with pytest.raises(ConfigError, match="'v9z:2x2'.*libtpu"):
        tpu_devices("v9z:2x2")
    assert len(tpu_devices("v5p:1x1x1")) == 1 and len(tpu_devices("v6e:4x4")) == 16


@pytest.mark.slow
def test_train_compile_only_for_a_tpu_slice():
    """``train.py --compile-only``: the tiny config's training step (2 layers: CSA and HCA; Pallas kernels for attention, the
    indexer and the experts' weight gradient, expert parallelism over 2 chips, Muon) compiles for a v5p slice of 4 chips."""
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--compile-only", "v5p:2x2x1",
                          "model.attention_impl=pallas", "model.moe_impl=pallas", "mesh.data=2", "mesh.expert=2",
                          "model.num_hidden_layers=2", "model.compress_ratios=[4,16,0]"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("compiled the training step for v5p:2x2x1 (4 x TPU v5, mesh data=2 x fsdp=1 x "
                                "expert=2 x tensor=1) in "), lines
    assert lines[-1].startswith("per device: ") and "GiB (parameters, optimizer state and batch" in lines[-1], lines


@pytest.mark.parametrize("mesh", ["expert=8", "fsdp=8", "expert=4,tensor=2", "expert=4,fsdp=2"])
def test_decode_moves_activations_not_weights_on_a_tpu_slice(mesh):
    """``Engine.decode`` of V4-Flash's shapes (2 layers, the released FP8 / FP4 weights) over 8 v5p chips:
    each chip multiplies the part of each weight it holds and the small partial products are summed.
    Left to itself, XLA's partitioner gathered every dense weight and the 1 GiB output head to every
    chip at each token (1.2 GiB of all-gathers per step; now under 4 MiB); with ``expert`` and
    ``tensor`` / ``fsdp`` the routed experts' widths were also gathered (1.6 GiB per step)."""
    from flax import nnx
    from v4jax.config import MeshConfig, load_config
    from v4jax.generate import Engine
    from v4jax.model.layers import WeightLayout
    from v4jax.model.transformer import Transformer
    from v4jax.sharding import collective_bytes, make_mesh, param_shardings
    from v4jax.trainer import tpu_devices

    cfg = load_config(REPO / "configs" / "v4_flash.yaml", ["model.num_hidden_layers=2", "model.num_hash_layers=1",
                                                          "model.compress_ratios=[4,128,0]"]).model
    mesh = make_mesh(MeshConfig(**{k: int(v) for k, v in (a.split("=") for a in mesh.split(","))}),
                     tpu_devices("v5p:2x2x2"))
    model = nnx.eval_shape(lambda: Transformer(cfg, mode="production", layout=WeightLayout.released(cfg),
                                               rngs=nnx.Rngs(0)))
    engine = Engine(model, max_len=4096)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
        param_shardings(state, mesh)))
    cache = jax.eval_shape(lambda: model.init_cache(8, 4096))
    with pk.target_platform("tpu"), jax.set_mesh(mesh):
        hlo = engine._decode.lower(state, jax.ShapeDtypeStruct((8,), jnp.int32), cache).compile().as_text()
    assert collective_bytes(hlo).get("all-gather", 0) < 4 * 2**20
