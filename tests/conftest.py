"""Shared fixtures: golden data location, small configs, random checkpoints in the released layout."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from v4jax import quant
from v4jax.config import RUNTIME_KEYS, ModelConfig, from_hf_config
from v4jax.hf.names import expected_tensors
from v4jax.hf.safetensors import INDEX_FILE, write_safetensors

REPO = Path(__file__).resolve().parents[1]


def run_on_host_devices(script: str, n_devices: int, *args: str, timeout: int = 600, env: dict | None = None):
    """``python -c script *args`` in a fresh process whose CPU backend has ``n_devices`` devices (a mesh
    needs them before JAX starts), importing this directory's modules (``conftest``, the model tests').
    Returns the ``CompletedProcess`` (text output)."""
    import subprocess
    import sys

    env = dict(os.environ, **(env or {}), XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "tests" / "model"), str(REPO),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def eval_cli():
    """``eval.py`` imported as a module (its helpers are tested directly)."""
    spec = importlib.util.spec_from_file_location("v4jax_eval_cli", REPO / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# One persistent XLA compilation cache for the run, shared by the xdist workers and by the
# train.py / eval.py subprocesses that tests start (they inherit the variable): a program that
# several tests build compiles once. Entries are keyed by the program, options and versions.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "v4jax-tests-xla-cache"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def golden_dir() -> Path | None:
    d = Path(os.environ.get("V4JAX_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
    return d if (d / "tiny" / "checkpoint" / "config.json").is_file() else None


@pytest.fixture(scope="session")
def golden():
    d = golden_dir()
    if d is None:
        pytest.skip("golden data not found: set V4JAX_GOLDEN_DIR or place it at ../shared/golden")
    return d


def small_config(**over) -> ModelConfig:
    """A small config in HF form (every key given explicitly), with overrides."""
    d = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, head_dim=64,
             qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, moe_intermediate_size=32,
             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.5,
             swiglu_limit=10.0, num_hash_layers=1, num_nextn_predict_layers=1, sliding_window=8,
             index_n_heads=2, index_head_dim=32, index_topk=3, compress_ratios=[0, 4, 8, 4], hc_mult=2,
             hc_sinkhorn_iters=5, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
             compress_rope_theta=160000.0,
             rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=64, beta_fast=32,
                               beta_slow=1),
             expert_dtype="fp4", model_type="deepseek_v4",
             quantization_config=dict(quant_method="fp8", fmt="e4m3", scale_fmt="ue8m0",
                                      weight_block_size=[128, 128], activation_scheme="dynamic"))
    runtime = {k: over.pop(k) for k in RUNTIME_KEYS if k in over}  # not config.json keys
    d.update(over)
    return from_hf_config(d, **runtime)


def write_random_checkpoint(path: Path, cfg: ModelConfig, *, seed: int = 0, shards: int = 2) -> dict:
    """A checkpoint of ``cfg`` in the released layout (SPEC §4) with random weights.

    Returns ``{name: array}`` of what was written (quantised tensors as stored).
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    table = expected_tensors(cfg)
    for name, (dtype, shape) in table.items():
        if dtype == "F8_E8M0":
            continue  # written with their weight
        if dtype == "F8_E4M3":
            fan_in = shape[1]
            w, s = quant.quant_fp8(rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in))
            tensors[name], tensors[name[:-7] + ".scale"] = w, s
        elif dtype == "I8":
            out_dim, in_dim = shape[0], shape[1] * 2
            w, s = quant.quant_fp4(rng.standard_normal((out_dim, in_dim)).astype(np.float32) / np.sqrt(in_dim))
            tensors[name], tensors[name[:-7] + ".scale"] = w, s
        elif dtype == "I64":
            tensors[name] = rng.integers(0, cfg.n_routed_experts, size=shape).astype(np.int64)
        elif dtype == "BF16":
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name in ("embed.weight", "head.weight"):
                v = rng.standard_normal(shape)
            else:
                v = rng.standard_normal(shape) / np.sqrt(shape[-1])
            tensors[name] = v.astype(np.float32).astype(ml_dtypes.bfloat16)
        else:  # F32: mHC, sinks, ape, gate bias
            scale = {"fn": 1.0 / np.sqrt(shape[-1])}.get(name.rsplit("_", 1)[-1], 0.5)
            v = rng.standard_normal(shape) * scale
            if name.endswith("_scale"):
                v = 1.0 + 0.1 * rng.standard_normal(shape)
            tensors[name] = v.astype(np.float32)
    assert set(tensors) == set(table), set(table) ^ set(tensors)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        write_safetensors(path / fname, {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    return tensors


def attention_sum(mode: str, **kw):
    """``(q, kv, ckv, topk_idx, sink) -> sum of the output`` (float32) of the ``mode`` attention entry
    point (``window``; ``hca`` with ratio 128; ``csa``), with the keyword arguments ``kw``."""
    import jax.numpy as jnp

    import pallas_kernels as pk

    def f(q, kv, ckv, idx, sink):
        if mode == "csa":
            o = pk.sparse_attention(q, kv, ckv, idx, sink, **kw)
        elif mode == "hca":
            o = pk.compressed_attention(q, kv, ckv, sink, ratio=128, **kw)
        else:
            o = pk.window_attention(q, kv, sink, **kw)
        return jnp.sum(o.astype(jnp.float32))
    return f


def kernel_kw(backend: str = "triton") -> dict:
    """How a kernel test runs the Pallas kernel family ``backend``: compiled on its own platform
    (``triton`` on a GPU, ``mosaic`` on a TPU), in interpret mode everywhere else (CPU CI)."""
    import jax

    native = {"triton": "gpu", "mosaic": "tpu"}[backend]
    return dict(backend=backend, interpret=jax.default_backend() != native)
