"""Mixture of experts (SPEC §2 MoE): sqrt-softplus gate, bias-chosen or hash-routed top-k, clamped SwiGLU.

``g = sqrt(softplus(x @ gateᵀ))`` (fp32). Score layers pick the top-k of ``g + bias`` (the bias only
chooses); hash layers take ``tid2eid[token]``. Weights are ``g[experts]`` normalised to sum 1, times
``routed_scaling_factor``. Expert: ``h = silu(min(w1 x, L)) · clip(w3 x, ±L) · weight``, ``out = w2 h``;
plus the shared expert (weight 1).

Routed experts run as a grouped matmul over token-expert pairs sorted by expert: ``jax.lax.ragged_dot``
(``moe_impl: xla``) or ``pallas_kernels.grouped_matmul`` (``moe_impl: pallas``: Pallas kernels on GPU;
on TPU ragged_dot with a Pallas kernel for the weight gradient; interpret mode on CPU). Weights live
stacked as ``[E, out, in]``. With quantised (FP4 / FP8) experts and fewer token-expert pairs than
experts, as in decoding, only the picked experts' matrices are gathered and dequantised
(``Experts._picked``), not all E.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from v4jax import quant, sharding
from v4jax.config import ModelConfig
from v4jax.model import layers
from v4jax.model.layers import (Linear, Numerics, WeightLayout, init_normal, placeholder, dot_f32,
                                fp8_scale_shape, param)


class Buffer(nnx.Variable):
    """Model state that is not trained (e.g. ``tid2eid``)."""


def swiglu(a, b, limit: float):
    """Clamped SwiGLU in fp32: ``silu(min(a, L)) · clip(b, -L, L)`` (no clamp when L <= 0)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if limit > 0:
        a = jnp.minimum(a, limit)
        b = jnp.clip(b, -limit, limit)
    return jax.nn.silu(a) * b


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, hashed: bool, layout: WeightLayout, rngs: nnx.Rngs):
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.topk, self.scale, self.hashed = k, cfg.routed_scaling_factor, hashed
        self.weight = param(init_normal(rngs, (E, cfg.hidden_size), cfg.hidden_size, layout.bf16),
                            ("experts", "embed"))
        if hashed:
            ids = jax.random.randint(rngs.params(), (cfg.vocab_size, k), 0, E, jnp.int32)
            self.tid2eid = Buffer(ids)
            self.bias = None
        else:
            self.tid2eid = None
            self.bias = param(jnp.zeros((E,), jnp.float32), ("experts",))

    def __call__(self, x, tokens):
        """x ``[T, D]``, tokens int ``[T]`` -> (experts int32 ``[T, k]``, weights fp32 ``[T, k]``, g ``[T, E]``)."""
        g = jnp.sqrt(jax.nn.softplus(dot_f32(x, sharding.for_compute(self.weight[...], self.weight))))
        if self.hashed:
            idx = jnp.take(self.tid2eid[...], tokens, axis=0).astype(jnp.int32)
        else:
            _, idx = jax.lax.top_k(g + self.bias[...], self.topk)
        w = jnp.take_along_axis(g, idx, axis=-1)
        w = w / jnp.sum(w, axis=-1, keepdims=True) * self.scale
        return idx, w, g


def _as_is(products):
    """``reduce_in`` of ``Experts._routed`` / ``_picked`` where no device splits the model width."""
    return products


class ExpertWeight(nnx.Module):
    """One stacked expert matrix ``[E, out, in]`` (float), FP4 ``[E, out, in/2]`` + ``[E, out, in/32]``,
    or FP8 ``[E, out, in]`` + block scales."""

    def __init__(self, E: int, out_dim: int, in_dim: int, *, fmt: str, dtype, axes, rngs: nnx.Rngs,
                 fp4_qat: bool = False):
        self.fmt, self.fp4_qat = fmt, fp4_qat
        if fmt == "float":
            self.weight = param(init_normal(rngs, (E, out_dim, in_dim), in_dim, dtype), axes)
        elif fmt == "fp4":
            self.weight = param(placeholder((E, out_dim, in_dim // 2), "int8"), axes)
            self.scale = param(placeholder((E, out_dim, in_dim // quant.FP4_BLOCK), ml_dtypes.float8_e8m0fnu), axes)
        elif fmt == "fp8":
            self.weight = param(placeholder((E, out_dim, in_dim), ml_dtypes.float8_e4m3fn), axes)
            self.scale = param(placeholder((E, *fp8_scale_shape(out_dim, in_dim)), ml_dtypes.float8_e8m0fnu), axes)
        else:
            raise ValueError(f"unknown expert weight format {fmt!r}")

    def stored(self) -> tuple:
        """The arrays as stored, each ``[E, ...]``: (weight,) or, quantised, (weight, scale)."""
        return (self.weight[...],) if self.fmt == "float" else (self.weight[...], self.scale[...])

    def dequantize(self, stored: tuple, dtype, experts=None):
        """Quantised ``stored`` arrays -> ``[E, out, in]`` in dtype; with ``experts`` (int ``[P]``) only
        those experts' matrices, ``[P, out, in]``, and only they are dequantised."""
        if experts is not None:
            stored = tuple(jnp.take(a, experts, axis=0) for a in stored)
        return (quant.dequant_fp4 if self.fmt == "fp4" else quant.dequant_fp8)(*stored, dtype)

    def dequantized(self, dtype):
        if self.fmt != "float":
            return self.dequantize(self.stored(), dtype)
        w = self.weight[...]
        if self.fp4_qat:  # forward sees the FP4 grid, the gradient passes straight through
            w = quant.straight_through(w, lambda v: quant.fake_quant_fp4(v, quant.FP4_BLOCK))
        return w.astype(dtype)


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, numerics: Numerics, layout: WeightLayout, rngs: nnx.Rngs):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.numerics, self.limit, self.impl = numerics, cfg.swiglu_limit, cfg.moe_impl
        self.capacity = cfg.moe_capacity
        kw = dict(fmt=layout.experts, dtype=layout.dtype, rngs=rngs, fp4_qat=numerics.fp4_experts)
        self.w1 = ExpertWeight(E, I, D, axes=("experts", "mlp", "embed"), **kw)
        self.w2 = ExpertWeight(E, D, I, axes=("experts", "embed", "mlp"), **kw)
        self.w3 = ExpertWeight(E, I, D, axes=("experts", "mlp", "embed"), **kw)

    def __call__(self, x, idx, w):
        """x ``[T, D]``, idx / w ``[T, k]`` -> (Σ_k w·expert(x) ``[T, D]`` (x's dtype), the fraction of
        token-expert pairs dropped for capacity: float32, 0 without ``moe_capacity``).

        Under a mesh (``jax.set_mesh``) whose ``expert`` axis has n > 1 devices, experts are
        parallel, each device running its E/n local experts. In training the token rows are split
        over ``data``, ``fsdp`` and ``expert`` (the expert axis is also a data axis for everything but
        the routed experts): each device gathers the rows of its n expert-axis peers (``all_gather``)
        and each row's partial sums go back to the device that owns the row, summed on the way
        (``psum_scatter``): 2·T·D·(n-1)/n elements moved per device, independent of top-k. When the
        rows do not divide that way (decoding a few tokens), they are split over ``data`` × ``fsdp``
        only, or not at all, and the partial sums are added over ``expert`` (``psum``). The experts'
        hidden width is split over ``tensor`` as at rest (partial sums added over ``tensor``), and for
        a few rows their model width over ``fsdp`` too: a device multiplies only the part of its
        experts' weights it holds.

        Dropless, a device's buffers hold every pair of the gathered rows (n·T·k), whatever share of
        them its experts take: at V4-Flash scale (n = 64) hundreds of GiB. ``moe_capacity`` c > 0 bounds
        them to ceil(c·n·T·k / n) pairs, the device's fair share times c; pairs past it (in expert
        order) are dropped, and the dropped fraction is returned (the ``moe_dropped`` metric).
        """
        dt = x.dtype
        mats = (self.w1, self.w2, self.w3)
        E = self.w1.weight.shape[0]
        # Quantised experts and fewer token-expert pairs than experts (decoding): dequantise only the
        # experts the pairs pick, instead of all E every step.
        if self.w1.fmt != "float" and idx.size < E:
            ws, routed = [m.stored() for m in mats], self._picked
        else:
            ws, routed = [m.dequantized(dt) for m in mats], self._routed
        mesh = jax.sharding.get_abstract_mesh()
        n = 0 if mesh.empty else dict(mesh.shape).get("expert", 1)
        # the Pallas kernel must run per device even without expert parallelism (sharding.local_call says why)
        kernel_on_mesh = self.impl == "pallas" and routed != self._picked and not mesh.empty and mesh.size > 1
        if n <= 1 and not kernel_on_mesh:
            return routed(x, idx, w, *ws, n_experts=E).astype(dt), jnp.zeros((), jnp.float32)
        if E % n:
            raise ValueError(f"n_routed_experts ({E}) must be a multiple of the mesh's expert axis ({n})")
        # Inside the shard_map each device also keeps its part of the experts' widths as they lie at
        # rest, instead of gathering those weights at every call (at V4-Flash shapes, decoding 4 layers
        # on expert=4 × tensor=2: 3.2 GiB per step): the hidden width I over `tensor` (each device's
        # SwiGLU units; the down-projection's partial sums are added over `tensor`), and, for a few rows
        # (decoding), the model width D over `fsdp`: the rows are then gathered over `fsdp` rather than
        # split, and the first products' partial sums added over `fsdp` before the SwiGLU. A width is
        # kept split only where its parts hold whole blocks (the scales of the quantised weights passed
        # in, the QAT activation blocks).
        sizes = dict(mesh.shape)
        block = 1
        if self.numerics.qat and self.numerics.quantized_experts:
            block = 128
        if routed == self._picked:
            block = max(block, 32 if self.w1.fmt == "fp4" else 128)
        T, k = idx.shape
        I, D = self.w1.weight.shape[1], x.shape[1]
        t, f = sizes.get("tensor", 1), sizes.get("fsdp", 1)
        tp = "tensor" if t > 1 and I % (t * block) == 0 else None
        # D over fsdp where the partial sums (two [T·k, I] float32) and the rows' gather are less than
        # the device's experts' weights it saves gathering (training's many rows: they are not)
        weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(ws)) // n
        few_rows = 8 * T * k * I + 2 * T * D * x.dtype.itemsize < weight_bytes
        dp = "fsdp" if f > 1 and few_rows and D % (f * block) == 0 else None
        row_axes = sharding.row_axes(T, {a: s for a, s in sizes.items() if not (dp and a == "fsdp")})
        split = "expert" in row_axes
        row = row_axes or None
        rows = P(row)
        up, down = P("expert", tp, dp), P("expert", dp, tp)  # w1, w3 [E, I, D]; w2 [E, D, I]
        reduce_in = (lambda a: jax.lax.psum(a, "fsdp")) if dp else _as_is

        def local(x, idx, w, w1, w2, w3):
            if split:
                x, idx, w = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, idx, w))
            first = jax.lax.axis_index("expert") * (E // n)
            pairs = idx.size
            if self.capacity and routed == self._routed and n > 1:
                cap = min(pairs, math.ceil(self.capacity * pairs / n))
                y, counts = self._routed(x, idx - first, w, w1, w2, w3, n_experts=E // n, capacity=cap,
                                         reduce_in=reduce_in)
            else:
                y = routed(x, idx - first, w, w1, w2, w3, n_experts=E // n, reduce_in=reduce_in)
                counts = jnp.zeros(2)
            # (dropped, local) pairs over the mesh: each pair is some device's local pair once per
            # replica of its rows, so the ratio is the dropped fraction
            counts = jax.lax.psum(counts.astype(jnp.float32), tuple(mesh.axis_names))
            if split:
                y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
                return (jax.lax.psum(y, "tensor") if tp else y), counts
            return jax.lax.psum(y, ("expert", "tensor") if tp else "expert"), counts

        # check_vma=False: Pallas interpret mode cannot run inside the varying-axes check, and with it
        # JAX 0.10 lost the sum over `expert` of the x / w cotangents of the psum form.
        # quantised (weight, scale) pairs: the same split for both
        specs = [(s,) * len(a) if routed == self._picked else s for s, a in zip((up, down, up), ws)]
        y, counts = jax.shard_map(local, mesh=mesh, in_specs=(P(row, dp), rows, rows, *specs),
                                  out_specs=(P(row, dp), P()), check_vma=False)(x, idx, w, *ws)
        return y.astype(dt), jax.lax.stop_gradient(counts[0] / jnp.maximum(counts[1], 1.0))

    def _picked(self, x, idx, w, q1, q2, q3, *, n_experts: int, reduce_in=_as_is):
        """``_routed`` for a few pairs with quantised weights ``q1, q2, q3`` (``ExpertWeight.stored()``):
        each (token, slot) pair's expert matrices are gathered still quantised, dequantised, and
        applied to that pair's row; the same products as ``_routed``."""
        T, k = idx.shape
        dt, prec = x.dtype, self.numerics.precision
        if self.numerics.qat and self.numerics.quantized_experts:
            x = quant.fake_quant_fp8(x, 128)
        flat = idx.reshape(-1)
        here = (flat >= 0) & (flat < n_experts)
        e = jnp.where(here, flat, 0)
        w1, w2, w3 = (m.dequantize(q, dt, e) for m, q in zip((self.w1, self.w2, self.w3), (q1, q2, q3)))

        def mm(rows, mats):  # [P, in] x [P, out, in] -> [P, out] float32
            return jnp.einsum("pi,poi->po", rows, mats, precision=prec, preferred_element_type=jnp.float32)

        xs = jnp.repeat(x, k, axis=0)
        h = swiglu(*reduce_in((mm(xs, w1), mm(xs, w3))), self.limit)
        h = (h * jnp.where(here, w.reshape(-1), 0.0)[:, None]).astype(dt)
        if self.numerics.qat and self.numerics.quantized_experts:
            h = quant.fake_quant_fp8(h, 128, rows=jnp.arange(T * k) // k)
        return jnp.sum(mm(h, w2).reshape(T, k, -1), axis=1)

    def _routed(self, x, idx, w, w1, w2, w3, *, n_experts: int, capacity: int | None = None,
                reduce_in=_as_is):
        """The experts ``0 … n_experts-1`` of stacked weights ``[n_experts, out, in]``, float32 ``[T, D]``;
        pairs whose index is outside that range contribute nothing. With ``capacity``: only the first
        ``capacity`` of those pairs in expert order count, and the result is (out, int32 [dropped pairs,
        pairs of these experts]). ``reduce_in`` takes the first products (of w1, w3; float32) and
        returns them summed over the devices that split the model width (``Experts.__call__``)."""
        T, k = idx.shape
        dt, prec = x.dtype, self.numerics.precision
        if self.numerics.qat and self.numerics.quantized_experts:
            x = quant.fake_quant_fp8(x, 128)
        flat = idx.reshape(-1)
        flat = jnp.where((flat >= 0) & (flat < n_experts), flat, n_experts)  # n_experts = not here
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=n_experts + 1)[:n_experts].astype(jnp.int32)
        if capacity is not None:  # the first `capacity` pairs in expert order; groups cut at that row
            order = order[:capacity]
            kept = jnp.diff(jnp.minimum(jnp.cumsum(sizes), capacity), prepend=0).astype(jnp.int32)
            counts = jnp.stack([jnp.sum(sizes) - jnp.sum(kept), jnp.sum(sizes)])
            sizes = kept
        xs = jnp.take(x, order // k, axis=0)

        def grouped(lhs, wt):  # wt [E, out, in] -> lhs @ wt[e].T per group, float32 (rows past the groups: 0)
            if self.impl == "pallas":
                return pallas_kernels.grouped_matmul(lhs, wt, sizes, **layers.kernel_kw())
            return jax.lax.ragged_dot(lhs, jnp.swapaxes(wt, 1, 2), sizes, precision=prec,
                                      preferred_element_type=jnp.float32)

        h = swiglu(*reduce_in((grouped(xs, w1), grouped(xs, w3))), self.limit)
        h = (h * jnp.take(w.reshape(-1), order)[:, None]).astype(dt)
        if self.numerics.qat and self.numerics.quantized_experts:
            h = quant.fake_quant_fp8(h, 128, rows=order // k)
        ys = grouped(h, w2)
        if capacity is not None:  # each kept pair's row added to its token (rows past the groups are 0)
            return jnp.zeros((T, ys.shape[1]), ys.dtype).at[order // k].add(ys), counts
        # back to (token, slot) order: a gather by the inverse permutation (unique indices), whose
        # gradient is a plain scatter; differentiating a scatter instead costs index bookkeeping
        # as large as the rows
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype), unique_indices=True)
        y = ys.at[inverse].get(unique_indices=True).reshape(T, k, -1)
        return jnp.sum(y, axis=1)


class MLP(nnx.Module):
    """The shared expert: the same clamped SwiGLU with dense FP8 weights."""

    def __init__(self, dim: int, inter: int, limit: float, *, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        self.limit = limit
        kw = dict(numerics=numerics, rngs=rngs, fmt=layout.fp8, qat_input=True, param_dtype=layout.dtype)
        self.w1 = Linear(dim, inter, axes=("mlp", "embed"), **kw)
        self.w2 = Linear(inter, dim, axes=("embed", "mlp"), **kw)
        self.w3 = Linear(dim, inter, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, hashed: bool, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        self.gate = Gate(cfg, hashed=hashed, layout=layout, rngs=rngs)
        self.experts = Experts(cfg, numerics=numerics, layout=layout, rngs=rngs)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                   cfg.swiglu_limit, numerics=numerics, layout=layout, rngs=rngs)
                               if cfg.n_shared_experts else None)

    def __call__(self, x, tokens):
        """x ``[B, S, D]``, tokens ``[B, S]`` -> (y ``[B, S, D]``, routing dict for losses / statistics)."""
        B, S, D = x.shape
        xf = x.reshape(B * S, D)
        idx, w, g = self.gate(xf, tokens.reshape(-1))
        y, dropped = self.experts(xf, idx, w)
        if self.shared_experts is not None:
            y = (y.astype(jnp.float32) + self.shared_experts(xf).astype(jnp.float32)).astype(x.dtype)
        return y.reshape(B, S, D), {"experts": idx.reshape(B, S, -1), "scores": g.reshape(B, S, -1),
                                    "dropped": dropped}
