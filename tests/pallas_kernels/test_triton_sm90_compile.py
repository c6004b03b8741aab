"""Optional: compile every GPU kernel for sm_90 (H100) on a machine without a GPU.

Pallas lowers each kernel to Triton IR in Python; XLA compiles that IR to a cubin only on a GPU.
This test takes the emitted IR and runs the Triton compiler (TTIR -> TTGIR -> LLVM -> PTX ->
ptxas) for sm_90 itself, then reads registers / spills from the cubin with cuobjdump. It runs
only where the ``triton`` package with its bundled NVIDIA tools is importable (``pip install
triton``; it is not a project dependency) and is skipped otherwise. It relies on a private JAX
hook (``pallas_call_registration.lowering.lower_jaxpr_to_triton_module``), so it may need
updating with JAX.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from conftest import attention_sum
from pallas_kernels import _triton

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _capture_triton_ir():
    from jax._src.pallas.triton import pallas_call_registration as reg
    modules, original = [], reg.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        modules.append((jaxpr.debug_info.func_name,
                        result.module.operation.get_asm(enable_debug_info=False)))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original


def _lower(mode, H, D, decode, fp8=False):
    """Lower forward+backward (prefill) or forward (decode, split-K; ``fp8``: FP8 entries) for cuda."""
    sd = jax.ShapeDtypeStruct
    B, S, T = (2, 1, 128) if decode else (1, 256, 256)
    ctx = 1 << 20 if decode else T
    N = ctx // (4 if mode == "csa" else 128)
    ckv = sd((B, N, D), jnp.bfloat16)
    if fp8:
        rd = D // 8
        ckv = pk.reference.Fp8Entries(sd((B, N, D - rd), jnp.float8_e4m3fn),
                                      sd((B, N, -(-(D - rd) // 64)), jnp.int8), sd((B, N, rd), jnp.bfloat16))
    args = (sd((B, S, H, D), jnp.bfloat16), sd((B, T, D), jnp.bfloat16), ckv,
            sd((B, S, 512), jnp.int32), sd((H,), jnp.float32))
    kw = dict(window=128, scale=D ** -0.5, backend="triton")
    if decode:
        kw.update(q_start=ctx - 1, kv_start=ctx - T)
    loss = attention_sum(mode, **kw)

    f = loss if decode else jax.grad(loss, argnums=(0, 1, 2, 4))
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


_PASSES = {"prefill_fwd_bwd": (False, False), "decode_fwd": (True, False), "decode_fwd_fp8": (True, True)}


@pytest.mark.parametrize("mode,passes", [(m, p) for m in ("window", "hca", "csa") for p in _PASSES
                                         if not (m == "window" and p.endswith("fp8"))])
@pytest.mark.parametrize("H,D", [(64, 512), (16, 128)])
def test_compiles_for_sm90_without_spills(H, D, mode, passes, tmp_path):
    decode, fp8 = _PASSES[passes]
    from triton.backends.compiler import GPUTarget
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    blk = _triton.choose_blocks(mode, H, D)
    with _capture_triton_ir() as modules:
        _lower(mode, H, D, decode, fp8)
    assert modules
    for name, asm in modules:
        path = tmp_path / f"{name}.ttir"
        path.write_text(asm)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=blk.num_warps, num_stages=blk.num_stages))
        (tmp_path / f"{name}.cubin").write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(tmp_path / f"{name}.cubin")],
                               capture_output=True, text=True, check=True).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        assert match, usage
        print(f"{name} H={H} D={D} {passes}: {match.group(0)}")
        assert int(match.group(2)) == 0, f"{name}: register spills ({match.group(0)})"
        assert kernel.metadata.shared <= 227 * 1024, f"{name}: shared memory {kernel.metadata.shared}"


def _compile_sm90(name, asm, tmp_path, *, num_warps, num_stages):
    """Compile one Triton IR module for sm_90; return (registers, stack bytes, shared bytes, PTX)."""
    from triton.backends.compiler import GPUTarget
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = tmp_path / f"{name}.ttir"
    path.write_text(asm)
    kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    (tmp_path / f"{name}.cubin").write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(tmp_path / f"{name}.cubin")],
                           capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert match, usage
    return int(match.group(1)), int(match.group(2)), kernel.metadata.shared, kernel.asm["ptx"]


@pytest.mark.parametrize("keys", ["float", "fp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("S", [4096, 1], ids=["prefill", "decode"])
def test_indexer_compiles_for_sm90_without_spills(S, dtype, keys, tmp_path):
    from pallas_kernels import _indexer

    sd = jax.ShapeDtypeStruct
    N = 16384
    k = (pk.Fp4Keys(sd((1, N, 64), jnp.uint8), sd((1, N, 4), jnp.int8)) if keys == "fp4"
         else sd((1, N, 128), dtype))
    args = (sd((1, S, 64, 128), dtype), sd((1, S, 64), jnp.float32), k)
    with _capture_triton_ir() as modules:
        jax.jit(lambda q, w, k: pk.indexer_topk(q, w, k, 512, q_start=65535 if S == 1 else 0,
                                                backend="triton")).trace(*args).lower(lowering_platforms=("cuda",))
    assert len(modules) == 1
    tiles = _indexer.choose_tiles("triton", S, 64, 128, dtype, fp4=keys == "fp4",
                                   decode=_indexer.use_decode_kernel("triton", S, dtype))
    regs, stack, shared, _ = _compile_sm90(*modules[0], tmp_path, num_warps=tiles.num_warps, num_stages=2)
    print(f"indexer S={S} {jnp.dtype(dtype).name} {keys} keys: REG:{regs} STACK:{stack} shared={shared}")
    assert stack == 0, f"indexer: register spills (REG:{regs} STACK:{stack})"
    assert shared <= 227 * 1024


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("M", [4096 * 6, 6], ids=["prefill", "decode"])
def test_grouped_matmul_compiles_for_sm90_without_spills(M, dtype, tmp_path):
    """Forward, dx and dw kernels at V4-Flash expert shapes (hidden 4096, width 2048, 256 experts)."""
    from pallas_kernels.grouped_matmul import grouped_matmul

    sd = jax.ShapeDtypeStruct
    args = (sd((M, 4096), dtype), sd((256, 2048, 4096), dtype), sd((256,), jnp.int32))
    loss = lambda x, w, s: jnp.sum(grouped_matmul(x, w, s, backend="triton"))
    with _capture_triton_ir() as modules:
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",))
    assert len(modules) == 3
    for name, asm in modules:
        regs, stack, shared, _ = _compile_sm90(name, asm, tmp_path, num_warps=4, num_stages=3)
        print(f"{name} M={M} {jnp.dtype(dtype).name}: REG:{regs} STACK:{stack} shared={shared}")
        assert stack == 0, f"{name}: register spills (REG:{regs} STACK:{stack})"
        assert shared <= 227 * 1024


# a forward tiling for V4-Flash shapes (H=64, D=512) with all heads of a position in one program
ALL_HEADS = dict(bh=64, bk=16, bcol=128, num_warps=8)


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_all_heads_forward_tiles_use_wgmma(mode, tmp_path):
    """With 64 query rows per program (``ALL_HEADS``: every head of a position, q / keys /
    accumulator in 128-wide column blocks) the forward's matmuls compile to Hopper ``wgmma``; the
    default 32 rows give ``mma.sync`` only. Window and HCA need no spills; CSA (which also holds its
    top-k row indices) spills a few bytes with this Triton. On a GPU, XLA compiles the same IR with
    its own Triton, so this is evidence, not the build that runs there; ``benchmarks/attention.py
    --tiles`` times it."""
    from pallas_kernels import _triton

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for tiles, expect in ((ALL_HEADS, "wgmma.mma_async"), ({}, "mma.sync")):
        with _triton.tiles(mode, "fwd", **tiles), _capture_triton_ir() as modules:
            _lower(mode, 64, 512, decode=False)
        name, asm = next(m for m in modules if m[0].endswith("_fwd"))
        warps = tiles.get("num_warps", _triton.choose_blocks(mode, 64, 512).num_warps)
        regs, stack, _, ptx = _compile_sm90(name, asm, tmp_path, num_warps=warps, num_stages=2)
        print(f"{name} {tiles or 'default'}: REG:{regs} STACK:{stack}, wgmma {ptx.count('wgmma.mma_async')}, "
              f"mma.sync {ptx.count('mma.sync')}")
        assert expect in ptx and (expect == "mma.sync") == ("wgmma.mma_async" not in ptx)
        assert stack <= (64 if mode == "csa" and tiles else 0), f"{name}: spills (REG:{regs} STACK:{stack})"
