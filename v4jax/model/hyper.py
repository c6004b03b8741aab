"""Manifold-constrained hyper-connections (mHC, SPEC §2), all in fp32.

The residual state is ``X [..., hc, D]``: ``hc`` copies of the hidden vector. Around each sub-layer:
  1. ``m = (flatten(X) @ fnᵀ) · rsqrt(mean(flatten(X)²) + eps)``            ``[..., (2+hc)·hc]``
  2. ``pre = σ(m[:hc]·s0 + b) + hc_eps``, ``post = 2σ(m[hc:2hc]·s1 + b)``,
     ``C = Sinkhorn(softmax(m[2hc:]·s2 + b))``  — ``C[i, j]``: source copy i -> target copy j
  3. ``u = Σᵢ preᵢ Xᵢ`` feeds the sub-layer ``y = f(norm(u))``
  4. ``X'ⱼ = postⱼ · y + Σᵢ C[i, j] · Xᵢ``
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.model.layers import dot_f32


def _normalised_mixes(X, fn, norm_eps: float):
    x = X.reshape(*X.shape[:-2], -1).astype(jnp.float32)
    return dot_f32(x, fn) * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + norm_eps)


def sinkhorn(logits, iters: int, eps: float):
    """Row softmax, then alternate column / row normalisation -> (nearly) doubly stochastic ``[..., hc, hc]``."""
    C = jax.nn.softmax(logits, axis=-1) + eps
    C = C / (jnp.sum(C, axis=-2, keepdims=True) + eps)
    # Unrolled on purpose: XLA fuses the iterations (and recomputes them in the backward) into a few
    # elementwise kernels. As a lax.fori_loop the training step compiles ~30% faster, but V4-Flash
    # training took 10.5 GiB more per v5p chip (65.6 instead of 55.1 GiB).
    for _ in range(iters - 1):
        C = C / (jnp.sum(C, axis=-1, keepdims=True) + eps)
        C = C / (jnp.sum(C, axis=-2, keepdims=True) + eps)
    return C


def hc_mixes(X, fn, base, scale, *, iters: int, hc_eps: float, norm_eps: float):
    """X ``[..., hc, D]`` -> (pre ``[..., hc]``, post ``[..., hc]``, C ``[..., hc, hc]``), fp32."""
    hc = X.shape[-2]
    m = _normalised_mixes(X, fn, norm_eps)
    pre = jax.nn.sigmoid(m[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (m[..., 2 * hc:] * scale[2] + base[2 * hc:]).reshape(*m.shape[:-1], hc, hc)
    return pre, post, sinkhorn(comb, iters, hc_eps)


def hc_pre(X, pre, dtype):
    """Sub-layer input ``u = Σᵢ preᵢ Xᵢ`` (fp32 sum) in ``dtype``: ``[..., D]``."""
    return jnp.sum(pre[..., None] * X.astype(jnp.float32), axis=-2).astype(dtype)


def hc_post(y, X, post, C):
    """``X'ⱼ = postⱼ y + Σᵢ C[i,j] Xᵢ`` in fp32, returned in X's dtype: ``[..., hc, D]``."""
    mixed = jnp.einsum("...ij,...id->...jd", C, X.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (post[..., None] * y[..., None, :].astype(jnp.float32) + mixed).astype(X.dtype)


def hc_head(X, fn, base, scale, *, hc_eps: float, norm_eps: float, dtype):
    """Final reduction of the copies: ``pre = σ(m·s + b) + hc_eps``, ``u = Σ preᵢ Xᵢ`` -> ``[..., D]``."""
    m = _normalised_mixes(X, fn, norm_eps)
    pre = jax.nn.sigmoid(m * scale[0] + base) + hc_eps
    return hc_pre(X, pre, dtype)
