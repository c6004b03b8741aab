"""Numerics, RMSNorm, Linear (float / FP8-block / FP4 weights) and Embed.

Weight formats (``fmt``):
  * ``"float"``   — a dense float weight ``[out, in]`` (training, dequantised loading);
  * ``"fp8"``     — the released FP8 e4m3 weight with E8M0 128x128 block scales, dequantised on use;
  * ``"fp4"``     — packed e2m1 codes with E8M0 1x32 scales (routed experts), dequantised on use.
Parameters carry logical axis names (``sharding_names``) that ``v4jax.sharding`` maps onto a mesh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pallas_kernels._core import platform
from v4jax import quant
from v4jax.config import MODES
from v4jax.sharding import for_compute, input_for, output_for


KV_CACHES = ("auto", "fp8")


@dataclass(frozen=True)
class Numerics:
    """How a forward pass computes (SPEC §5): ``exact`` | ``qat`` | ``production``.

    ``fp4_experts`` / ``fp8_weights``: training-side weight QAT (straight-through estimator) of the
    routed experts (FP4, 1x32 blocks) / of the layers the release stores in FP8 (128x128 blocks), so
    the trained weights are exactly what an export to the released formats stores.
    ``kv_cache``: ``"auto"`` keeps the decoding cache's compressed entries and indexer keys in the
    activation dtype; ``"fp8"`` stores the entries' non-RoPE dims as FP8 with a power-of-two scale per
    64 dims (SPEC §5b) and the indexer keys as FP4 with one per 32 (§5c). Both grids are then applied
    in every pass (indexer queries included), as in ``qat``, so prefill and decode agree; lossless
    in ``qat``. Not in ``exact`` mode, which quantises no activation.
    ``fp8_linears`` / ``quantized_experts``: whether the checkpoint format stores the FP8 layers (it
    has a ``quantization_config``) / the routed experts (FP4 or FP8 ``expert_dtype``) quantised; ``qat``
    fake-quantises the inputs of those linears only (SPEC §5a: "every FP8/FP4 linear"), not of BF16 ones.
    """
    mode: str = "exact"
    fp4_experts: bool = False
    fp8_weights: bool = False
    kv_cache: str = "auto"
    fp8_linears: bool = True
    quantized_experts: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"numerics mode must be one of {MODES}, got {self.mode!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.kv_cache == "fp8" and self.mode == "exact":
            raise ValueError("kv_cache='fp8' quantises the KV, which mode 'exact' never does: "
                             "use mode 'qat' or 'production' with it")

    @property
    def dtype(self):
        """Activation dtype."""
        return jnp.bfloat16 if self.mode == "production" else jnp.float32

    @property
    def qat(self) -> bool:
        return self.mode == "qat"

    @property
    def quant_kv(self) -> bool:
        """Whether the main KV's non-RoPE dims go through FP8 (SPEC §5b) and the indexer's queries
        and keys through FP4 (§5c)."""
        return self.mode == "qat" or self.kv_cache == "fp8"

    @property
    def precision(self):
        # exact / qat: true fp32 products everywhere (no TF32 or bf16 passes on accelerators)
        return jax.lax.Precision.DEFAULT if self.mode == "production" else jax.lax.Precision.HIGHEST


HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class WeightLayout:
    """How parameters are stored.

    ``fp8``: format of the layers the release stores in FP8 (``"fp8"`` keeps them so, ``"float"``
    dequantises); ``experts``: format of routed experts (``"fp4"`` | ``"fp8"`` | ``"float"``);
    ``dtype``: dtype of float weights of those layers; ``bf16``: dtype of the tensors the release
    stores in BF16 (embedding, head, norms, compressor, gate, indexer weights_proj).
    """
    fp8: str = "float"
    experts: str = "float"
    dtype: object = jnp.float32
    bf16: object = jnp.float32

    @staticmethod
    def float(dtype=jnp.float32) -> "WeightLayout":
        """Every weight a dense float array of ``dtype`` (training, dequantised loading)."""
        return WeightLayout("float", "float", dtype, dtype)

    @staticmethod
    def released(cfg) -> "WeightLayout":
        """The dtypes of the released checkpoint (SPEC §4), served as they are."""
        if cfg.quantization_config is None:
            return WeightLayout("float", "float", jnp.bfloat16, jnp.bfloat16)
        experts = {"fp4": "fp4", "fp8": "fp8"}.get(cfg.expert_dtype, "float")
        return WeightLayout("fp8", experts, jnp.bfloat16, jnp.bfloat16)


def param(value, axes: tuple) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dim)."""
    assert len(axes) == np.ndim(value), (axes, np.shape(value))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def kernel_kw() -> dict:
    """Keyword arguments for the Pallas kernels of the ``pallas`` impls: compiled for the default
    backend on a GPU / TPU (Triton / Mosaic), Pallas interpret mode on a CPU; ``pallas_kernels.
    target_platform`` names another platform to compile for."""
    return dict(interpret=platform() == "cpu")


def dot(x, w, numerics: Numerics, out_dtype=None):
    """``x @ w.T`` with ``w [out, in]``; fp32 accumulation, output in ``out_dtype`` (default: x's dtype).

    The output is the matmul's own result type (XLA accumulates bf16 products in fp32 on every
    backend), not an fp32 result cast afterwards: so the backward pass's matmuls get a cotangent in
    x's dtype and run in it too, rather than in fp32.
    """
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), precision=numerics.precision,
                      preferred_element_type=out_dtype or x.dtype)


def bf16_passes() -> bool:
    """Whether ``dot_f32`` applies a weight stored in bf16 as bf16 matmuls (GPU / TPU tensor cores) or
    upcasts it (CPU, where bf16 matmuls are no faster)."""
    return platform() != "cpu"


def split_bf16(x):
    """float32 x -> three bfloat16 arrays whose float32 sum is exactly x (for normal-range values): x's 24
    significant bits in three runs of 8. The runs are cut with bit masks, not float conversions, so no
    compiler pass can fold the split away as excess precision."""
    parts = []
    for _ in range(2):
        lead = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
        parts.append(lead.astype(jnp.bfloat16))   # exact: 8 significant bits
        x = x - lead                               # exact: the bits below
    return parts + [x.astype(jnp.bfloat16)]


def dot_f32(x, w):
    """An fp32 island: ``x @ w.T`` with fp32-accurate products and fp32 accumulation.

    A weight stored in bf16 (the release's head, gate) on a GPU / TPU is not upcast: a bf16 x (the
    production activations) is multiplied by it in bf16 with fp32 accumulation; an fp32 x is split
    into three bf16 parts that sum to it exactly, each multiplied so. Every product is exact, as in
    fp32, but runs on tensor cores and reads w in bf16. Otherwise both operands are upcast
    (``Precision.HIGHEST``).
    """
    if w.dtype == jnp.bfloat16 and bf16_passes():
        parts = [x] if x.dtype == jnp.bfloat16 else split_bf16(x.astype(jnp.float32))
        y = [jnp.einsum("...i,oi->...o", p, w, preferred_element_type=jnp.float32) for p in parts]
        return y[0] if len(y) == 1 else y[0] + (y[1] + y[2])
    return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w.astype(jnp.float32), precision=HIGHEST)


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in fp32 (reduction precision), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def init_normal(rngs: nnx.Rngs, shape, fan_in: int, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * (1.0 / math.sqrt(fan_in))).astype(dtype)


def placeholder(shape, dtype):
    """Zero bytes of a quantised dtype (filled by the checkpoint loader)."""
    return jnp.asarray(np.zeros(shape, dtype=np.dtype(dtype)))


def fp8_scale_shape(out_dim: int, in_dim: int) -> tuple[int, int]:
    return (-(-out_dim // quant.FP8_BLOCK), -(-in_dim // quant.FP8_BLOCK))


class Linear(nnx.Module):
    """``y = x @ W.T`` with ``W [out, in]`` in one of the weight formats.

    ``qat_input``: in ``qat`` mode, fake-quantise the input per token in blocks of 128 (SPEC §5a) —
    true for the layers the release stores in FP8/FP4.
    """

    def __init__(self, in_dim: int, out_dim: int, *, numerics: Numerics, rngs: nnx.Rngs, fmt: str = "float",
                 axes=("mlp", "embed"), qat_input: bool = False, param_dtype=jnp.float32):
        self.in_dim, self.out_dim, self.fmt = in_dim, out_dim, fmt
        self.numerics, self.qat_input = numerics, qat_input
        if fmt == "float":
            self.weight = param(init_normal(rngs, (out_dim, in_dim), in_dim, param_dtype), axes)
        elif fmt == "fp8":
            self.weight = param(placeholder((out_dim, in_dim), ml_dtypes.float8_e4m3fn), axes)
            self.scale = param(placeholder(fp8_scale_shape(out_dim, in_dim), ml_dtypes.float8_e8m0fnu), axes)
        else:
            raise ValueError(f"Linear: unknown weight format {fmt!r}")

    def dequantized(self, dtype=jnp.float32):
        """The weight ``[out, in]`` as ``dtype``."""
        if self.fmt == "fp8":
            w = quant.dequant_fp8(self.weight[...], self.scale[...], dtype)
        else:
            w = self.weight[...]
            if self.qat_input and self.numerics.fp8_weights:  # an FP8 layer of the release
                w = quant.straight_through(w, quant.fake_quant_fp8_weight)
        return for_compute(w.astype(dtype), self.weight)

    def __call__(self, x):
        if self.numerics.qat and self.qat_input and self.numerics.fp8_linears:
            x = quant.fake_quant_fp8(x, 128)
        return output_for(dot(input_for(x, self.weight), self.dequantized(x.dtype), self.numerics), self.weight)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, numerics: Numerics, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.numerics = numerics
        self.weight = param((jax.random.normal(rngs.params(), (vocab, dim)) * 0.02).astype(param_dtype),
                            ("vocab", "embed"))

    def __call__(self, tokens):
        w, dt = self.weight[...], self.numerics.dtype
        if jnp.dtype(dt).itemsize < w.dtype.itemsize:  # a mesh then gathers the narrower table
            w = w.astype(dt)
        return jnp.take(for_compute(w, self.weight), tokens, axis=0).astype(dt)
