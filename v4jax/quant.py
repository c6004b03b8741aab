"""FP8 / FP4 / E8M0 formats of the released checkpoints, and the QAT fake-quantisers (SPEC §4, §5).

Weights (SPEC §4):
  * FP8 block: ``weight`` float8_e4m3fn ``[out, in]``, ``scale`` float8_e8m0fnu
    ``[ceil(out/128), ceil(in/128)]``;  ``w = q * s[o // 128, i // 128]``.
  * FP4 (routed experts): ``weight`` int8 ``[out, in/2]`` holding two e2m1 codes per byte (low nibble =
    even column; bit 3 sign, bits 0-2 index ``[0, .5, 1, 1.5, 2, 3, 4, 6]``), ``scale`` float8_e8m0fnu
    ``[out, in/32]``.
  * E8M0 byte b means ``2^(b - 127)``.

Every function here works on numpy arrays (host: loader, converter) and on jax arrays (device:
on-the-fly dequantisation, QAT) alike; the array namespace is taken from the input.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_BLOCK = 128          # weight block (both axes) of FP8 tensors
FP4_BLOCK = 32           # weight block (input axis) of FP4 tensors
FP8_MAX = 448.0          # largest finite e4m3fn value
FP4_MAX = 6.0            # largest e2m1 value
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)  # indexed by the 4-bit code


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def e8m0_to_float(s):
    """float8_e8m0fnu (or its raw uint8 bytes) -> float32 powers of two."""
    xp = _xp(s)
    if s.dtype == np.uint8:
        s = s.view(ml_dtypes.float8_e8m0fnu) if xp is np else jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)
    return s.astype(xp.float32)


def expand_block_scale(scale, shape, block=(FP8_BLOCK, FP8_BLOCK)):
    """Block scale [ceil(out/bo), ceil(in/bi)] -> per-element float32 [out, in] (leading dims kept)."""
    xp = _xp(scale)
    s = e8m0_to_float(scale)
    s = xp.repeat(xp.repeat(s, block[0], axis=-2), block[1], axis=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequant_fp8(weight, scale, dtype=np.float32):
    """FP8 e4m3 weight [..., out, in] with E8M0 128x128 block scales -> dtype."""
    xp = _xp(weight)
    w = weight.astype(xp.float32) * expand_block_scale(scale, weight.shape)
    return w.astype(dtype)


def unpack_fp4(packed):
    """int8 [..., out, in/2] of packed e2m1 codes -> float32 [..., out, in] code values (unscaled)."""
    xp = _xp(packed)
    b = packed.view(xp.uint8) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.uint8)
    lo, hi = b & 0x0F, b >> 4
    codes = xp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    table = FP4_VALUES if xp is np else jnp.asarray(FP4_VALUES)
    return table[codes.astype(xp.int32)]


def dequant_fp4(weight, scale, dtype=np.float32):
    """Packed FP4 weight [..., out, in/2] with E8M0 1x32 scales [..., out, in/32] -> dtype [..., out, in]."""
    xp = _xp(weight)
    v = unpack_fp4(weight)
    s = xp.repeat(e8m0_to_float(scale), FP4_BLOCK, axis=-1)
    return (v * s).astype(dtype)


# ----------------------------------------------------------------------------- quantisation (export)

def _pow2_scale_exponent(amax, fmax, tiny):
    """Smallest e with amax / 2^e <= fmax, i.e. e = ceil(log2(max(amax, tiny) / fmax)), computed exactly."""
    xp = _xp(amax)
    m, e = xp.frexp(xp.maximum(amax, tiny) / fmax)  # v = m * 2^e, m in [0.5, 1)
    return xp.where(m == 0.5, e - 1, e)


def _to_e8m0(exponent):
    xp = _xp(exponent)
    b = xp.clip(exponent + 127, 0, 254).astype(xp.uint8)
    return b.view(ml_dtypes.float8_e8m0fnu) if xp is np else jax.lax.bitcast_convert_type(b, jnp.float8_e8m0fnu)


def quant_fp8(w):
    """float weight [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/128), ceil(in/128)])."""
    xp = _xp(w)
    w = w.astype(xp.float32)
    out_dim, in_dim = w.shape[-2:]
    po, pi = _ceil_div(out_dim, FP8_BLOCK) * FP8_BLOCK, _ceil_div(in_dim, FP8_BLOCK) * FP8_BLOCK
    pad = [(0, 0)] * (w.ndim - 2) + [(0, po - out_dim), (0, pi - in_dim)]
    blocks = xp.pad(w, pad).reshape(*w.shape[:-2], po // FP8_BLOCK, FP8_BLOCK, pi // FP8_BLOCK, FP8_BLOCK)
    amax = xp.abs(blocks).max(axis=(-3, -1))
    e = _pow2_scale_exponent(amax, FP8_MAX, 1e-30)
    scale = _to_e8m0(e)
    q = xp.clip(w / expand_block_scale(scale, w.shape), -FP8_MAX, FP8_MAX)
    q = q.astype(ml_dtypes.float8_e4m3fn if xp is np else jnp.float8_e4m3fn)
    return q, scale


def _fp4_codes(v):
    """float32 values already in [-6, 6] -> 4-bit e2m1 codes (round to nearest, ties to even code)."""
    xp = _xp(v)
    q = v.astype(ml_dtypes.float4_e2m1fn if xp is np else jnp.float4_e2m1fn).astype(xp.float32)
    mag = xp.abs(q)
    table = FP4_VALUES[:8] if xp is np else jnp.asarray(FP4_VALUES[:8])
    idx = xp.argmax(mag[..., None] == table, axis=-1)
    sign = xp.signbit(q) & (mag > 0)
    return (idx + 8 * sign).astype(xp.uint8)


def quant_fp4(w):
    """float weight [..., out, in] (in % 32 == 0) -> (int8 [..., out, in/2] packed, float8_e8m0fnu [..., out, in/32])."""
    xp = _xp(w)
    w = w.astype(xp.float32)
    if w.shape[-1] % FP4_BLOCK:
        raise ValueError(f"FP4 quantisation needs the input dim to be a multiple of {FP4_BLOCK}, got {w.shape}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // FP4_BLOCK, FP4_BLOCK)
    e = _pow2_scale_exponent(xp.abs(blocks).max(-1), FP4_MAX, 6.0 * 2.0 ** -126)
    scale = _to_e8m0(e)
    s = xp.repeat(e8m0_to_float(scale), FP4_BLOCK, axis=-1)
    codes = _fp4_codes(xp.clip(w / s, -FP4_MAX, FP4_MAX))
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(xp.uint8)
    packed = packed.view(np.int8) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.int8)
    return packed, scale


# ----------------------------------------------------------------------------- QAT fake quantisation

_ROUNDING_HOOK = contextvars.ContextVar("v4jax_rounding_hook", default=None)


@contextlib.contextmanager
def rounding_hook(fn):
    """Intercept the activation quantisers' rounding in functions traced inside this context.

    Every activation quantiser (``quant_fp8_act`` and so ``fake_quant_fp8``, ``fake_quant_fp4``,
    ``quant_fp4_act``) then calls ``fn(grid, v, q, rows)`` and rounds to what it returns: ``grid`` is
    ``"e4m3"`` or ``"e2m1"``, ``v`` the scaled and clipped fp32 values ``[..., blocks, block]``, ``q``
    their rounding (fp32 grid values, same shape), ``rows`` None or, where the leading rows are not
    the tokens in order (the routed experts' hidden rows: one per token and expert slot, grouped by
    expert), the token index of each row. ``fn`` must return grid values of ``q``'s shape. A
    debugging aid, not used by the model itself: it lets a comparison with another implementation
    of QAT find values next to a rounding midpoint and round them the other's way
    (``v4jax/qat_ties.py``, ``eval.py qat-ties``).
    """
    token = _ROUNDING_HOOK.set(fn)
    try:
        yield fn
    finally:
        _ROUNDING_HOOK.reset(token)


def _round(v, grid: str, rows=None):
    """fp32 values on the grid's range -> the grid's dtype (round to nearest even), through the hook."""
    dtype = jnp.float8_e4m3fn if grid == "e4m3" else jnp.float4_e2m1fn
    q = v.astype(dtype)
    hook = _ROUNDING_HOOK.get()
    if hook is not None:
        q = hook(grid, v, q.astype(jnp.float32), rows).astype(dtype)
    return q


def _blocked(x, block: int):
    """[..., d] -> fp32 [..., ceil(d/block), block] (a partial last block is zero-padded) and a restore fn."""
    d = x.shape[-1]
    n = -(-d // block)
    xf = x.astype(jnp.float32)
    if n * block != d:
        xf = jnp.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, n * block - d)])
    return xf.reshape(*x.shape[:-1], n, block), lambda q: q.reshape(*x.shape[:-1], n * block)[..., :d].astype(x.dtype)


def quant_fp8_act(x, block: int = 128, rows=None):
    """Per-token blockwise FP8 e4m3 quantisation along the last axis (SPEC §5a/b), stored form.

    ``x [..., d]`` -> (codes float8_e4m3fn ``[..., d]``, exponents int8 ``[..., ceil(d/block)]``) with
    ``s = 2^e = 2^ceil(log2(max(amax, 1e-4) / 448))`` per block and codes ``e4m3(clip(x / s, ±448))``.
    ``rows``: only for ``rounding_hook``.
    """
    xf, _ = _blocked(x, block)
    amax = jnp.abs(xf).max(-1, keepdims=True)
    e = _pow2_scale_exponent(amax, FP8_MAX, 1e-4)  # in [-22, 120] for finite x: fits an int8
    codes = _round(jnp.clip(xf / jnp.ldexp(jnp.float32(1.0), e), -FP8_MAX, FP8_MAX), "e4m3", rows)
    d = x.shape[-1]
    return codes.reshape(*x.shape[:-1], codes.shape[-2] * block)[..., :d], e[..., 0].astype(jnp.int8)


def dequant_fp8_act(codes, exponents, block: int = 128, dtype=jnp.float32):
    """Inverse of ``quant_fp8_act`` (exact: every value is a power-of-two multiple of an e4m3 value)."""
    d = codes.shape[-1]
    s = jnp.repeat(jnp.ldexp(jnp.float32(1.0), exponents.astype(jnp.int32)), block, axis=-1)[..., :d]
    return (codes.astype(jnp.float32) * s).astype(dtype)


@jax.custom_jvp
def _straight_through_act(x, q):
    """``q`` (x's quantised values) in the forward pass, bit for bit; the derivative is x's (the
    straight-through estimator of QAT training: the rounding has a zero derivative almost everywhere,
    and JAX's derivative of a cast to float8 / float4 is zero)."""
    return q


@_straight_through_act.defjvp
def _straight_through_act_jvp(primals, tangents):
    return primals[1], tangents[0]


def fake_quant_fp8(x, block: int = 128, rows=None):
    """Per-token blockwise FP8 e4m3 fake quantisation along the last axis (SPEC §5a/b).

    s = 2^ceil(log2(max(amax, 1e-4) / 448)),  x̂ = e4m3(clip(x / s, ±448)) · s.  Returns x's dtype;
    the gradient passes straight through. ``rows``: only for ``rounding_hook``.
    """
    return _straight_through_act(x, dequant_fp8_act(*quant_fp8_act(x, block, rows), block, x.dtype))


def quant_fp4_act(x, block: int = 32):
    """Per-token blockwise FP4 e2m1 quantisation along the last axis (SPEC §5c), stored form.

    ``x [..., d]`` -> (packed uint8 ``[..., n·block/2]`` with n = ceil(d/block): two codes per byte,
    low nibble first, as ``unpack_fp4`` reads them; a partial last block is zero-padded; exponents
    int8 ``[..., n]``, ``s = 2^e``). The sign bit is kept for zeros, so decoding
    (``pallas_kernels.reference.dequant_fp4_keys``) gives exactly ``fake_quant_fp4``'s values,
    signed zeros included.
    """
    xf, _ = _blocked(x, block)
    amax = jnp.abs(xf).max(-1, keepdims=True)
    e = _pow2_scale_exponent(amax, FP4_MAX, FP4_MAX * 2.0 ** -126)  # in [-126, 126]: fits an int8
    v = _round(jnp.clip(xf / jnp.ldexp(jnp.float32(1.0), e), -FP4_MAX, FP4_MAX), "e2m1").astype(jnp.float32)
    idx = jnp.argmax(jnp.abs(v)[..., None] == jnp.asarray(FP4_VALUES[:8]), axis=-1)
    codes = (idx + 8 * jnp.signbit(v)).astype(jnp.uint8).reshape(*x.shape[:-1], v.shape[-2] * block // 2, 2)
    return codes[..., 0] | (codes[..., 1] << 4), e[..., 0].astype(jnp.int8)


def fake_quant_fp4(x, block: int = 32):
    """Per-token blockwise FP4 e2m1 fake quantisation along the last axis (SPEC §5c).

    s = 2^ceil(log2(max(amax, 6·2^-126) / 6)),  x̂ = e2m1(clip(x / s, ±6)) · s  (round to nearest even).
    The gradient passes straight through.
    """
    xf, restore = _blocked(x, block)
    amax = jnp.abs(xf).max(-1, keepdims=True)
    s = jnp.ldexp(jnp.float32(1.0), _pow2_scale_exponent(amax, FP4_MAX, FP4_MAX * 2.0 ** -126))
    return _straight_through_act(x, restore(_round(jnp.clip(xf / s, -FP4_MAX, FP4_MAX), "e2m1").astype(jnp.float32) * s))


def straight_through(w, quantize):
    """Forward ``quantize(w)``, backward identity (the straight-through estimator of weight QAT)."""
    return w + jax.lax.stop_gradient(quantize(w) - w)


def fake_quant_fp8_weight(w):
    """A float weight ``[out, in]`` rounded to the release's 128x128 E8M0-scaled FP8 grid."""
    return dequant_fp8(*quant_fp8(w), jnp.float32).astype(w.dtype)
