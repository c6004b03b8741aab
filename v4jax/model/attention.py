"""V4 attention: one shared KV head, sliding window + compressed entries (CSA / HCA), sink, grouped output.

Per layer, ``compress_ratio`` decides the keys a query at position t sees (SPEC §2):
  * 0   — the window ``max(0, t-win+1) … t`` only;
  * 4   — CSA: the window plus the lightning indexer's top-k compressed entries;
  * m   — HCA: the window plus every compressed entry ``j < (t+1)//m``.
The attention math is ``pallas_kernels`` (``attention_impl: pallas``) or its plain-JAX reference
(``attention_impl: xla``) behind the same call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels._core import dequant_for
from pallas_kernels.reference import Fp8Entries
from v4jax import quant
from v4jax.config import ModelConfig
from v4jax.model.cache import (AttnCache, encode_fp8_entries, ring_from_rows, ring_from_sequence, ring_positions,
                               rows_array)
from v4jax.model.compressor import Compressor
from v4jax.model.indexer import Indexer
from v4jax.model import layers
from v4jax.model.layers import (Linear, Numerics, RMSNorm, WeightLayout, init_normal, placeholder,
                                fp8_scale_shape, param, rms_norm)
from v4jax.model.rope import apply_rope, layer_frequencies, rope_tables
from v4jax.sharding import for_compute, local_call


class GroupedLinear(nnx.Module):
    """``wo_a``: G independent maps ``[H·hd/G] -> [o_lora_rank]``.

    Float layout stores ``weight [G, r, H·hd/G]``; the released FP8 layout stores the checkpoint's
    group-major ``[G·r, H·hd/G]`` with its block scales. Applied without activation quantisation
    (the reference dequantises this weight to bf16 at load).
    """

    def __init__(self, groups: int, in_dim: int, rank: int, *, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        self.groups, self.in_dim, self.rank, self.fmt = groups, in_dim, rank, layout.fp8
        self.numerics = numerics
        if self.fmt == "fp8":
            self.weight = param(placeholder((groups * rank, in_dim), ml_dtypes.float8_e4m3fn),
                                ("o_group_rows", "heads"))
            self.scale = param(placeholder(fp8_scale_shape(groups * rank, in_dim), ml_dtypes.float8_e8m0fnu),
                               ("o_group_rows", "heads"))
        else:
            self.weight = param(init_normal(rngs, (groups, rank, in_dim), in_dim, layout.dtype),
                                ("o_groups", "o_lora", "heads"))

    def dequantized(self, dtype=jnp.float32):
        if self.fmt == "fp8":
            w = for_compute(quant.dequant_fp8(self.weight[...], self.scale[...], jnp.float32).astype(dtype),
                            self.weight)
            return w.reshape(self.groups, self.rank, self.in_dim)
        w = self.weight[...]
        if self.numerics.fp8_weights:  # QAT on the release's [G·r, in] FP8 layout
            flat = quant.straight_through(w.reshape(-1, self.in_dim), quant.fake_quant_fp8_weight)
            w = flat.reshape(w.shape)
        return for_compute(w.astype(dtype), self.weight)

    def __call__(self, o):
        """o ``[..., G, H·hd/G]`` -> ``[..., G·r]``."""
        w = self.dequantized(o.dtype)
        y = jnp.einsum("...gi,gri->...gr", o, w, precision=self.numerics.precision)  # fp32 accumulation, as dot
        return y.reshape(*y.shape[:-2], -1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, *, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        D, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, hd, cfg.qk_rope_head_dim
        self.window, self.ratio, self.eps = cfg.sliding_window, ratio, cfg.rms_norm_eps
        self.impl, self.numerics = cfg.attention_impl, numerics
        self.rope_freqs = tuple(float(f) for f in layer_frequencies(cfg, ratio))
        fp8 = dict(numerics=numerics, rngs=rngs, fmt=layout.fp8, param_dtype=layout.dtype)
        self.wq_a = Linear(D, cfg.q_lora_rank, axes=("q_lora", "embed"), qat_input=True, **fp8)
        self.q_norm = RMSNorm(cfg.q_lora_rank, self.eps, param_dtype=layout.bf16)
        self.wq_b = Linear(cfg.q_lora_rank, H * hd, axes=("heads", "q_lora"), qat_input=True, **fp8)
        self.wkv = Linear(D, hd, axes=("head_dim", "embed"), qat_input=True, **fp8)
        self.kv_norm = RMSNorm(hd, self.eps, param_dtype=layout.bf16)
        self.wo_a = GroupedLinear(cfg.o_groups, H * hd // cfg.o_groups, cfg.o_lora_rank, numerics=numerics,
                                  layout=layout, rngs=rngs)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D, axes=("embed", "o_lora"), qat_input=True, **fp8)
        self.attn_sink = param(jnp.zeros((H,), jnp.float32), ("heads",))
        self.compressor = (Compressor(D, hd, ratio, rope_freqs=self.rope_freqs, rotate=False, eps=self.eps,
                                      numerics=numerics, rngs=rngs, param_dtype=layout.bf16) if ratio else None)
        self.indexer = (Indexer(cfg, rope_freqs=self.rope_freqs, numerics=numerics, layout=layout, rngs=rngs)
                        if ratio == 4 else None)

    # ------------------------------------------------------------------ pieces shared by prefill and decode
    def _rope(self, pos):
        return rope_tables(pos, np.asarray(self.rope_freqs, np.float32))

    def _quant_kv(self, kv):
        """qat or an FP8 cache: FP8 fake quantisation of the non-RoPE dims in blocks of 64 (SPEC §5b)."""
        if not self.numerics.quant_kv:
            return kv
        n = self.head_dim - self.rope_dim
        return jnp.concatenate([quant.fake_quant_fp8(kv[..., :n], 64), kv[..., n:]], axis=-1)

    def _store(self, rows):
        """Compressed entries ``[B, N, hd]`` as the cache holds them (``Fp8Entries`` for an FP8 cache)."""
        return encode_fp8_entries(rows, self.rope_dim) if self.numerics.kv_cache == "fp8" else rows

    def _qkv(self, x, pos):
        """x ``[B, S, D]`` -> (qr, q ``[B, S, H, hd]``, kv ``[B, S, hd]``), RoPE applied."""
        B, S, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).reshape(B, S, self.n_heads, self.head_dim), None, self.eps)
        kv = self.kv_norm(self.wkv(x))
        cos, sin = self._rope(pos)
        q = apply_rope(q, cos[..., None, :], sin[..., None, :])
        kv = self._quant_kv(apply_rope(kv, cos, sin))
        return qr, q, kv

    def _output(self, o, pos):
        """o ``[B, S, H, hd]`` -> de-rotated, grouped low-rank output ``[B, S, D]``."""
        cos, sin = self._rope(pos)
        o = apply_rope(o, cos[..., None, :], sin[..., None, :], inverse=True)
        B, S = o.shape[:2]
        return self.wo_b(self.wo_a(o.reshape(B, S, self.wo_a.groups, -1)))

    def _kernels(self):
        if self.impl == "pallas":
            return _Kernels, layers.kernel_kw()
        return reference, {}

    # ------------------------------------------------------------------ prefill / training
    def __call__(self, x, *, max_len: int | None = None, train: bool = False):
        """Full sequence from position 0. x ``[B, S, D]`` -> (out ``[B, S, D]``, AttnCache | None, aux).

        With ``max_len`` the decoding cache for that many positions is returned too. With ``train``
        CSA layers put the lightning-indexer KL loss in ``aux["indexer_kl"]``.
        """
        B, S, _ = x.shape
        pos = jnp.arange(S)
        qr, q, kv = self._qkv(x, pos)
        scale = self.head_dim ** -0.5
        sink = self.attn_sink[...]
        fns, kw = self._kernels()
        cache, aux = {}, {}
        if self.ratio == 0:
            o = fns.window_attention(q, kv, sink, window=self.window, scale=scale, **kw)
        else:
            entries, ck, cs = self.compressor(x)
            ckv = self._quant_kv(entries.astype(x.dtype))
            if max_len is not None:
                cache.update(ckv=_fill(self._store(ckv), max_len // self.ratio), comp_k=None, comp_s=None)
                cache["comp_k"], cache["comp_s"] = self.compressor.state_from_prefill(ck, cs)
            if self.ratio == 4:
                # the indexer learns only from its KL loss: its inputs are cut from the main graph
                xi, qri = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
                ientries, ik, is_ = self.indexer.compressor(xi)
                ikeys = self.indexer.keys(ientries)
                qi, w = self.indexer.queries(xi, qri, pos)
                if train:
                    topk, aux["indexer_kl"] = indexer_train(qi, w, ikeys, q, kv, ckv, sink, topk=self.indexer.topk,
                                                            window=self.window, scale=scale)
                else:
                    topk = self.indexer.select(qi, w, ikeys, pos)
                o = fns.sparse_attention(q, kv, ckv, topk, sink, window=self.window, scale=scale, **kw)
                if max_len is not None:
                    cache["ikv"] = _fill(self.indexer.store(ikeys), max_len // 4)
                    cache["icomp_k"], cache["icomp_s"] = self.indexer.compressor.state_from_prefill(ik, is_)
            else:
                o = fns.compressed_attention(q, kv, ckv, sink, window=self.window, ratio=self.ratio,
                                             scale=scale, **kw)
        out = self._output(o, pos)
        if max_len is None:
            return out, None, aux
        return out, AttnCache(win_kv=ring_from_sequence(kv, self.window), **cache), aux

    def empty_cache(self, batch: int, max_len: int, dtype) -> AttnCache:
        c = AttnCache(win_kv=jnp.zeros((batch, self.window, self.head_dim), dtype))
        if self.ratio:
            ck, cs = self.compressor.empty_state(batch)
            c = c.replace(ckv=self._store(jnp.zeros((batch, max_len // self.ratio, self.head_dim), dtype)),
                          comp_k=ck, comp_s=cs)
        if self.ratio == 4:
            ik, is_ = self.indexer.compressor.empty_state(batch)
            c = c.replace(ikv=self.indexer.store(jnp.zeros((batch, max_len // 4, self.indexer.head_dim), dtype)),
                          icomp_k=ik, icomp_s=is_)
        return c

    # ------------------------------------------------------------------ decode
    def decode(self, x, t, cache: AttnCache):
        """One token x ``[B, 1, D]`` at position t (int32 scalar) -> (out ``[B, 1, D]``, new cache)."""
        pos = t[None]
        qr, q, kv = self._qkv(x, pos)
        win_kv = jax.lax.dynamic_update_slice_in_dim(cache.win_kv, kv.astype(cache.win_kv.dtype),
                                                     t % self.window, axis=1)
        new = dict(win_kv=win_kv)
        ckv = idx = None
        if self.ratio:
            entry, done, (ck, cs) = self.compressor.decode(x, t, (cache.comp_k, cache.comp_s))
            ckv = _write_entry(cache.ckv, self._store(self._quant_kv(entry.astype(x.dtype))), done, t, self.ratio)
            new.update(ckv=ckv, comp_k=ck, comp_s=cs)
            if self.ratio == 4:
                ientry, _, (ik, is_) = self.indexer.compressor.decode(x, t, (cache.icomp_k, cache.icomp_s))
                ikv = _write_entry(cache.ikv, self.indexer.store(self.indexer.keys(ientry)), done, t, 4)
                qi, w = self.indexer.queries(x, qr, pos)
                idx = self.indexer.select(qi, w, ikv, pos)
                new.update(ikv=ikv, icomp_k=ik, icomp_s=is_)
        o = self._decode_attention(q, win_kv, ckv, idx, t)
        return self._output(o, pos), cache.replace(**new)

    def extend(self, x, t0, cache: AttnCache):
        """A chunk x ``[B, C, D]`` at positions t0 … t0+C-1 after the positions in ``cache`` (chunked
        prefill). t0 (int32 scalar, may be traced) must be >= the window and a multiple of the
        compress ratio (``Transformer.extend`` states the rule). -> (out ``[B, C, D]``, new cache)."""
        B, C, _ = x.shape
        W, pos = self.window, t0 + jnp.arange(C)
        qr, q, kv = self._qkv(x, pos)
        sink = self.attn_sink[...]
        fns, kw = self._kernels()
        kw = dict(kw, window=W, scale=self.head_dim ** -0.5, q_start=t0, kv_start=t0 - W)
        ring = jnp.take(cache.win_kv, (t0 - W + jnp.arange(W)) % W, axis=1)    # positions t0-W … t0-1
        kv = jnp.concatenate([ring.astype(kv.dtype), kv], axis=1)
        new = dict(win_kv=ring_from_rows(kv, t0 + C, W).astype(cache.win_kv.dtype))
        if self.ratio == 0:
            return self._output(fns.window_attention(q, kv, sink, **kw), pos), cache.replace(**new)
        entries, (ck, cs) = self.compressor.extend(x, t0, (cache.comp_k, cache.comp_s))
        ckv = _write_rows(cache.ckv, self._store(self._quant_kv(entries.astype(x.dtype))), t0 // self.ratio)
        new.update(ckv=ckv, comp_k=ck, comp_s=cs)
        if self.impl != "pallas":            # the kernels take (and decode) FP8 entries themselves
            ckv = rows_array(ckv, x.dtype)   # every entry; the kernels mask those after a query
        if self.ratio == 4:
            ientries, (ik, is_) = self.indexer.compressor.extend(x, t0, (cache.icomp_k, cache.icomp_s))
            ikv = _write_rows(cache.ikv, self.indexer.store(self.indexer.keys(ientries)), t0 // 4)
            new.update(ikv=ikv, icomp_k=ik, icomp_s=is_)
            qi, w = self.indexer.queries(x, qr, pos)
            topk = self.indexer.select(qi, w, ikv, pos)
            o = fns.sparse_attention(q, kv, ckv, topk, sink, **kw)
        else:
            o = fns.compressed_attention(q, kv, ckv, sink, ratio=self.ratio, **kw)
        return self._output(o, pos), cache.replace(**new)

    def _decode_attention(self, q, win_kv, ckv, idx, t):
        """q ``[B, 1, H, hd]`` at position t against the window ring and the compressed entries."""
        B, W = q.shape[0], self.window
        scale, sink = self.head_dim ** -0.5, self.attn_sink[...]
        if self.impl == "pallas":  # the prefill kernels with one query: ring rows put in position order
            # positions start … start+W-1 (the kernels need start >= 0; before the ring is full the rows
            # past t are empty slots that causality masks). FP8 entries go to the kernels as they are.
            start = jnp.maximum(t - W + 1, 0)
            kv = jnp.take(win_kv, (start + jnp.arange(W)) % W, axis=1).astype(q.dtype)
            kw = dict(window=W, scale=scale, q_start=t, kv_start=start, **layers.kernel_kw())
            if self.ratio == 0:
                return _Kernels.window_attention(q, kv, sink, **kw)
            if self.ratio == 4:
                return _Kernels.sparse_attention(q, kv, ckv, idx, sink, **kw)
            return _Kernels.compressed_attention(q, kv, ckv, sink, ratio=self.ratio, **kw)
        if self.ratio == 4 and isinstance(ckv, Fp8Entries):  # FP8 cache: decode only the selected rows
            ckv, idx = dequant_for("csa", ckv, idx, q.dtype)
        keys = [win_kv]
        valid = [jnp.broadcast_to(ring_positions(t, W) >= 0, (B, W))]
        if self.ratio == 4:
            keys.append(jnp.take_along_axis(ckv, jnp.maximum(idx[:, 0], 0)[..., None], axis=1))
            valid.append(idx[:, 0] >= 0)
        elif self.ratio:
            keys.append(rows_array(ckv, q.dtype))
            N = keys[-1].shape[1]
            valid.append(jnp.broadcast_to(jnp.arange(N) < (t + 1) // self.ratio, (B, N)))
        o = reference.decode_attention(q[:, 0], jnp.concatenate(keys, 1).astype(q.dtype),
                                       jnp.concatenate(valid, 1), sink, scale=scale)
        return o[:, None]


class _Kernels:
    """``pallas_kernels``' attention entry points, each run on every device's rows and heads under a
    mesh (``sharding.local_call``)."""

    @staticmethod
    def window_attention(q, kv, sink, **kw):
        return local_call(pallas_kernels.window_attention, (q, kv, sink), ("rows_heads", "rows", "heads"),
                          "rows_heads", **kw)

    @staticmethod
    def sparse_attention(q, kv, ckv, topk_idx, sink, **kw):
        return local_call(pallas_kernels.sparse_attention, (q, kv, ckv, topk_idx, sink),
                          ("rows_heads", "rows", "rows", "rows", "heads"), "rows_heads", **kw)

    @staticmethod
    def compressed_attention(q, kv, ckv, sink, **kw):
        return local_call(pallas_kernels.compressed_attention, (q, kv, ckv, sink),
                          ("rows_heads", "rows", "rows", "heads"), "rows_heads", **kw)


def indexer_kl(scores, q, kv, ckv, sink, *, window: int, scale: float):
    """KL(main || indexer) over the compressed entries a query may select, averaged over queries.

    The target is the main attention's distribution over the valid compressed entries as in
    DeepSeek's DSA: each head's attention probabilities (its softmax over the window keys, the
    compressed entries and its sink) summed over heads and L1-normalised over the entries, detached;
    the indexer's is ``softmax(scores)`` (SPEC §6). scores ``[B, S, N]`` (-inf = not selectable),
    q ``[B, S, H, hd]``, kv ``[B, S, hd]`` (positions 0 … S-1), ckv ``[B, N, hd]``, sink ``[H]``.
    """
    total, count = _indexer_kl_sum(scores, q, _window_rows(kv, 0, q.shape[1], window), ckv, sink, 0,
                                   window=window, scale=scale)
    return total / jnp.maximum(count, 1)


# queries per step of indexer_train: memory ~ B·chunk·max(H, IH)·(N + chunk + window) floats
INDEXER_TRAIN_CHUNK = 256


def indexer_train(qi, w, ik, q, kv, ckv, sink, *, topk: int, window: int, scale: float,
                  chunk: int = INDEXER_TRAIN_CHUNK):
    """The lightning indexer in training: its top-k choice and its KL loss, over query chunks.

    qi ``[B, S, IH, ID]``, w ``[B, S, IH]``, ik ``[B, N, ID]`` (indexer queries, head weights, keys;
    positions 0 … S-1); q ``[B, S, H, hd]``, kv ``[B, S, hd]``, ckv ``[B, N, hd]``, sink ``[H]`` the
    main attention's queries, window keys, compressed entries and sinks (the KL target, detached).
    Returns (top-k ``[B, S, topk]`` int32, ``indexer_kl``): the same as ``reference.indexer_topk`` and
    ``indexer_kl`` on the full score matrix, but ``chunk`` queries at a time under ``jax.checkpoint``,
    so neither pass holds more than one chunk's ``[B, chunk, heads, N]`` products (not ``[B, S, heads, N]``)
    and its window scores ``[B, chunk, H, chunk + window - 1]``.
    """
    B, S = q.shape[:2]
    C = min(chunk, S)
    n = -(-S // C)
    pad = n * C - S

    def split(x):  # [B, S, ...] -> [n, B, C, ...] (queries past S are zero padding)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(B, n, C, *x.shape[2:]), 0, 1)

    kv = jnp.pad(kv, ((0, 0), (0, pad), (0, 0)))

    @jax.checkpoint
    def one(args):
        c, qi_c, w_c, q_c = args
        scores = reference.indexer_scores(qi_c, w_c, ik, ratio=4, q_start=c * C)
        real = (c * C + jnp.arange(C)) < S                          # padding queries select nothing
        scores = jnp.where(real[None, :, None], scores, -jnp.inf)
        # each device's rows (under a mesh, the partitioner would gather the top-k's input over the batch)
        idx = local_call(reference.topk_indices, (jax.lax.stop_gradient(scores),), ("rows",), "rows", k=topk)
        rows = _window_rows(kv, c * C, C, window)
        return idx, _indexer_kl_sum(scores, q_c, rows, ckv, sink, c * C, window=window, scale=scale)

    idx, (total, count) = jax.lax.map(one, (jnp.arange(n), split(qi), split(w), split(q)))
    idx = jnp.swapaxes(idx, 0, 1).reshape(B, n * C, -1)[:, :S]
    return idx, jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)


def _window_rows(kv, first, C: int, window: int):
    """The rows of ``kv [B, T, hd]`` that queries ``first … first+C-1`` reach in their window: positions
    ``first-window+1 … first+C-1`` (those before 0 are zeros; the caller masks them) -> ``[B, C+window-1, hd]``."""
    kv = jnp.pad(kv, ((0, 0), (window - 1, 0), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(kv, first, C + window - 1, axis=1)


def _indexer_kl_sum(scores, q, rows, ckv, sink, first, *, window: int, scale: float):
    """(Σ over queries with a selectable entry of KL(main || indexer), how many such queries), for
    queries at ``first …`` with their window ``rows`` (from ``_window_rows``)."""
    valid = jnp.isfinite(scores)
    q, rows, ckv, sink = (jax.lax.stop_gradient(a) for a in (q, rows, ckv, sink))
    C = q.shape[1]
    comp = jnp.einsum("bshd,bnd->bshn", q, ckv, preferred_element_type=jnp.float32) * scale
    comp = jnp.where(valid[:, :, None, :], comp, -jnp.inf)
    win = jnp.einsum("bshd,bld->bshl", q, rows, preferred_element_type=jnp.float32) * scale
    t = first + jnp.arange(C)[:, None]                              # query positions
    p = first - window + 1 + jnp.arange(C + window - 1)[None, :]     # row positions
    win = jnp.where(((p > t - window) & (p <= t) & (p >= 0))[None, :, None, :], win, -jnp.inf)
    lse = jnp.logaddexp(jnp.logaddexp(jax.nn.logsumexp(comp, axis=-1), jax.nn.logsumexp(win, axis=-1)),
                        sink.astype(jnp.float32))                    # each head's softmax denominator
    mass = jax.nn.logsumexp(comp - lse[..., None], axis=2)           # log Σ_h P_h(entry) [B, S, N]
    log_p = mass - jax.nn.logsumexp(mass, axis=-1, keepdims=True)    # L1-normalised over the entries
    log_p = jnp.where(valid, log_p, -jnp.inf)
    log_q = jax.nn.log_softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    terms = jnp.where(valid, jnp.exp(log_p) * (log_p - log_q), 0.0)
    has = jnp.any(valid, axis=-1)
    return jnp.sum(jnp.where(has, terms.sum(-1), 0.0)), jnp.sum(has)


def _fill(entries, n: int):
    """Entries ``[B, N, d]`` of a prefill (an array, ``Fp8Entries`` or ``Fp4Keys``) placed at the start
    of a ``[B, n, d]`` buffer."""
    N = jax.tree.leaves(entries)[0].shape[1]
    if N > n:
        raise ValueError(f"prefill produced {N} compressed entries, the cache holds {n}")
    return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, n - N), (0, 0))), entries)


def _write_rows(buf, rows, j0):
    """Rows ``[B, n, d]`` written as entries j0 … j0+n-1 of ``buf [B, N, d]`` (both arrays, or both
    ``Fp8Entries`` / ``Fp4Keys``)."""
    return jax.tree.map(lambda b, r: jax.lax.dynamic_update_slice_in_dim(b, r.astype(b.dtype), j0, axis=1), buf, rows)


def _write_entry(buf, entry, done, t, ratio: int):
    """Write ``entry [B, d]`` as entry ``(t+1)//ratio - 1`` of ``buf [B, N, d]`` when ``done``
    (both arrays, or both ``Fp8Entries`` / ``Fp4Keys``)."""
    if jax.tree.leaves(buf)[0].shape[1] == 0:  # max_len < ratio: no entry ever completes
        return buf
    j = jnp.maximum((t + 1) // ratio - 1, 0)

    def write(b, e):
        old = jax.lax.dynamic_slice_in_dim(b, j, 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(b, jnp.where(done, e[:, None].astype(b.dtype), old), j, axis=1)

    return jax.tree.map(write, buf, entry)
