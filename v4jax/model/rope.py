"""Rotary embeddings on the last ``rd`` dims of a vector, interleaved pairs, with YaRN (SPEC §2 RoPE).

Window-only layers use ``rope_theta`` without YaRN; compressed layers (their attention, compressor
and indexer) use ``compress_rope_theta`` with YaRN frequency interpolation. There is no mscale term.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig, RopeScaling


def rope_frequencies(rd: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Per-pair angular frequencies ``f_i``, i < rd/2, float32 ``[rd/2]``."""
    f = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    if scaling is not None and scaling.factor != 1.0:
        L0 = scaling.original_max_position_embeddings

        def corr_dim(n_rot):
            return rd * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        lo = max(math.floor(corr_dim(scaling.beta_fast)), 0)
        hi = min(math.ceil(corr_dim(scaling.beta_slow)), rd - 1)
        if hi == lo:
            hi += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(rd // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        f = f / scaling.factor * ramp + f * (1.0 - ramp)
    return f.astype(np.float32)


def layer_frequencies(cfg: ModelConfig, compress_ratio: int) -> np.ndarray:
    """Frequencies of a layer: plain ``rope_theta`` for ratio 0, YaRN on ``compress_rope_theta`` otherwise."""
    if compress_ratio == 0:
        return rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)
    return rope_frequencies(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)


def rope_tables(pos, freqs):
    """pos int ``[...]`` -> (cos, sin) float32 ``[..., rd/2]``."""
    ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin, *, inverse: bool = False):
    """Rotate the last ``rd = 2 * cos.shape[-1]`` dims of ``x`` (pairs 2i, 2i+1), computed in fp32.

    ``cos``/``sin`` broadcast against ``x[..., :rd/2]`` (add head axes at the call site).
    ``inverse=True`` applies the conjugate rotation (de-rotation of attention outputs).
    """
    rd = 2 * cos.shape[-1]
    d = x.shape[-1]
    xr = x[..., d - rd:].astype(jnp.float32).reshape(*x.shape[:-1], rd // 2, 2)
    a, b = xr[..., 0], xr[..., 1]
    if inverse:
        sin = -sin
    rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(*x.shape[:-1], rd)
    return jnp.concatenate([x[..., : d - rd], rot.astype(x.dtype)], axis=-1)
