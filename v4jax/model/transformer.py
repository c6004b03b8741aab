"""Block, MTP block and the full Transformer (SPEC §2), with prefill / decode over explicit caches.

Data flow of one token: ``embed`` -> copy ``hc`` times -> for each Block: mHC(attention), mHC(MoE)
-> ``hc_head`` reduction -> ``norm`` -> ``head`` (fp32 logits). The MTP block takes the final state
and the embedding of the next token and predicts the token after it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model.attention import Attention
from v4jax.model.cache import Cache
from v4jax.model.hyper import hc_head, hc_mixes, hc_post, hc_pre
from v4jax.model.layers import Embed, Linear, Numerics, RMSNorm, WeightLayout, dot_f32, param
from v4jax.model.moe import MoE
from v4jax.sharding import for_compute, input_for


def _hc_params(rngs: nnx.Rngs, hc: int, dim: int, rows: int, scales: int):
    fn = jax.random.normal(rngs.params(), (rows, hc * dim), jnp.float32) * (0.1 / (hc * dim) ** 0.5)
    return (param(fn, ("hc_mix", "hc_embed")), param(jnp.zeros((rows,), jnp.float32), ("hc_mix",)),
            param(jnp.ones((scales,), jnp.float32), ("hc_scale",)))


class Block(nnx.Module):
    """Attention and MoE sub-layers, each wrapped in mHC (``hc_attn_*`` / ``hc_ffn_*``)."""

    def __init__(self, cfg: ModelConfig, ratio: int, *, hashed: bool, numerics: Numerics, layout: WeightLayout,
                 rngs: nnx.Rngs):
        hc, D = cfg.hc_mult, cfg.hidden_size
        self.cfg, self.numerics = cfg, numerics
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=layout.bf16)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=layout.bf16)
        self.attn = Attention(cfg, ratio, numerics=numerics, layout=layout, rngs=rngs)
        self.ffn = MoE(cfg, hashed=hashed, numerics=numerics, layout=layout, rngs=rngs)
        rows = (2 + hc) * hc
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _hc_params(rngs, hc, D, rows, 3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _hc_params(rngs, hc, D, rows, 3)

    def _mixes(self, X, fn, base, scale):
        c = self.cfg
        return hc_mixes(X, fn[...], base[...], scale[...], iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps,
                        norm_eps=c.rms_norm_eps)

    def __call__(self, X, tokens, *, max_len: int | None = None, train: bool = False):
        """X ``[B, S, hc, D]``, tokens ``[B, S]`` -> (X', AttnCache | None, info).

        info: routing (``experts``, ``scores``) and, with ``train``, attention losses (``indexer_kl``).
        """
        pre, post, C = self._mixes(X, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        y, cache, aux = self.attn(self.attn_norm(hc_pre(X, pre, self.numerics.dtype)), max_len=max_len, train=train)
        X = hc_post(y, X, post, C)
        pre, post, C = self._mixes(X, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        y, route = self.ffn(self.ffn_norm(hc_pre(X, pre, self.numerics.dtype)), tokens)
        return hc_post(y, X, post, C), cache, {**route, **aux}

    def decode(self, X, tokens, t, cache):
        """X ``[B, S, hc, D]`` at positions t … t+S-1 after those in the cache -> (X', new AttnCache).
        S = 1: one decode step, any t; S > 1: a chunk (``Attention.extend``'s rule on t)."""
        pre, post, C = self._mixes(X, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        attn = self.attn.decode if X.shape[1] == 1 else self.attn.extend
        y, cache = attn(self.attn_norm(hc_pre(X, pre, self.numerics.dtype)), t, cache)
        X = hc_post(y, X, post, C)
        pre, post, C = self._mixes(X, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        y, _ = self.ffn(self.ffn_norm(hc_pre(X, pre, self.numerics.dtype)), tokens)
        return hc_post(y, X, post, C), cache


class MTPBlock(Block):
    """Multi-token prediction: ``X_in = e_proj(enorm(embed(tok[t+1]))) + h_proj(hnorm(X))``, one Block,
    then its own ``norm`` and ``hc_head_*`` (embedding and head are the main model's)."""

    def __init__(self, cfg: ModelConfig, ratio: int, *, numerics: Numerics, layout: WeightLayout, rngs: nnx.Rngs):
        super().__init__(cfg, ratio, hashed=False, numerics=numerics, layout=layout, rngs=rngs)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        fp8 = dict(numerics=numerics, rngs=rngs, fmt=layout.fp8, qat_input=True, param_dtype=layout.dtype,
                   axes=("embed", "embed_in"))
        self.e_proj = Linear(D, D, **fp8)
        self.h_proj = Linear(D, D, **fp8)
        self.enorm = RMSNorm(D, eps, param_dtype=layout.bf16)
        self.hnorm = RMSNorm(D, eps, param_dtype=layout.bf16)
        self.norm = RMSNorm(D, eps, param_dtype=layout.bf16)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(rngs, cfg.hc_mult, D, cfg.hc_mult, 1)

    def inputs(self, X, e):
        """X ``[B, S, hc, D]`` main final state, e ``[B, S, D]`` next-token embeddings -> ``[B, S, hc, D]``."""
        return self.e_proj(self.enorm(e))[..., None, :] + self.h_proj(self.hnorm(X))


def _run_block(block: Block, X, tokens, max_len, train: bool, remat: bool):
    if remat and max_len is None:
        return nnx.remat(lambda b, x, t: b(x, t, train=train))(block, X, tokens)
    return block(X, tokens, max_len=max_len, train=train)


def repeated_run(kinds: list, max_period: int = 4) -> tuple[int, int, int] | None:
    """(start, period, reps) of the longest run of ``reps >= 2`` repetitions of ``period`` consecutive
    layer kinds (anything comparable, e.g. graphdefs), or None. V4-Flash: hash / window layers, then
    (CSA, HCA) pairs."""
    best = None
    for p in range(1, max_period + 1):
        for s in range(len(kinds) - 2 * p + 1):
            r = 1
            while kinds[s + r * p: s + (r + 1) * p] == kinds[s: s + p]:
                r += 1
            if r >= 2 and (best is None or p * r > best[1] * best[2]):
                best = (s, p, r)
    return best


def _scan_layers(layers, X, tokens, train: bool, remat: bool):
    """The blocks of ``layers`` in order, as ``_run_block`` would run them, with the longest repeated
    run of identical block structures (``repeated_run`` of their graphdefs) as one ``lax.scan`` over
    their stacked states: XLA compiles the run's body once instead of once per layer (small.yaml:
    10 of 12 layers are 5 (CSA, HCA) pairs). Parameters stay per layer; the stacking is inside the
    traced step, and its transpose hands each layer its gradient. -> (X', infos per layer)."""
    graphs, states = zip(*(nnx.split(layer) for layer in layers))
    s, p, r = repeated_run(list(graphs)) or (len(layers), 1, 0)
    infos = [None] * len(layers)

    def single(i, X):
        X, _, infos[i] = _run_block(layers[i], X, tokens, None, train, remat)
        return X

    for i in range(s):
        X = single(i, X)
    if r:
        stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *(states[s + k * p + j] for k in range(r)))
                   for j in range(p)]

        def body(X, period_states):
            out = []
            for g, st in zip(graphs[s: s + p], period_states):
                X, _, info = _run_block(nnx.merge(g, st), X, tokens, None, train, remat)
                out.append(info)
            return X, out

        X, run_infos = jax.lax.scan(body, X, stacked)
        for k in range(r):
            for j in range(p):
                infos[s + k * p + j] = jax.tree.map(lambda a: a[k], run_infos[j])
    for i in range(s + p * r, len(layers)):
        X = single(i, X)
    return X, infos


class Transformer(nnx.Module):
    """DeepSeek-V4. ``mode``: numerics (SPEC §5); ``layout``: how weights are stored (see WeightLayout)."""

    def __init__(self, cfg: ModelConfig, *, mode: str = "exact", layout: WeightLayout | None = None,
                 rngs: nnx.Rngs | None = None, fp4_expert_qat: bool = False, fp8_weight_qat: bool = False,
                 kv_cache: str = "auto"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        layout = layout or WeightLayout.float()
        quantized = cfg.quantization_config is not None
        numerics = Numerics(mode, fp4_experts=fp4_expert_qat, fp8_weights=fp8_weight_qat, kv_cache=kv_cache,
                            fp8_linears=quantized, quantized_experts=quantized and cfg.expert_dtype in ("fp4", "fp8"))
        self.cfg, self.numerics, self.layout = cfg, numerics, layout
        L, D, hc = cfg.num_hidden_layers, cfg.hidden_size, cfg.hc_mult
        kw = dict(numerics=numerics, layout=layout, rngs=rngs)
        self.embed = Embed(cfg.vocab_size, D, numerics=numerics, rngs=rngs, param_dtype=layout.bf16)
        self.layers = nnx.List([Block(cfg, cfg.compress_ratios[i], hashed=i < cfg.num_hash_layers, **kw)
                                for i in range(L)])
        self.mtp = nnx.List([MTPBlock(cfg, cfg.compress_ratios[L + j], **kw)
                             for j in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=layout.bf16)
        self.head = Linear(D, cfg.vocab_size, numerics=numerics, rngs=rngs, axes=("vocab", "embed"),
                           param_dtype=layout.bf16)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(rngs, hc, D, hc, 1)

    # ------------------------------------------------------------------ pieces
    def _embed(self, tokens):
        h = self.embed(tokens)
        return jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], self.cfg.hc_mult, h.shape[-1]))

    def head_inputs(self, X, owner=None):
        """Final state ``[..., hc, D]`` -> the head's input ``[..., D]`` through ``owner``'s hc_head and norm."""
        owner = owner or self
        u = hc_head(X, owner.hc_head_fn[...], owner.hc_head_base[...], owner.hc_head_scale[...],
                    hc_eps=self.cfg.hc_eps, norm_eps=self.cfg.rms_norm_eps, dtype=self.numerics.dtype)
        return owner.norm(u)

    def logits_from_state(self, X, owner=None):
        """Final state ``[..., hc, D]`` -> fp32 logits ``[..., V]`` (``head_inputs`` @ headᵀ)."""
        return dot_f32(input_for(self.head_inputs(X, owner), self.head.weight),
                       for_compute(self.head.weight[...], self.head.weight))

    # ------------------------------------------------------------------ full sequences
    def __call__(self, tokens, *, max_len: int | None = None, train: bool = False, remat: bool = False,
                 logits: bool = True, scan: bool = False):
        """tokens ``[B, S]`` (positions 0 … S-1) -> (logits fp32 ``[B, S, V]`` (None without ``logits``),
        final state ``[B, S, hc, D]``, per-layer caches (``max_len`` given) or None, per-layer info).

        ``train``: also compute training-only losses (indexer KL); ``remat``: recompute each block's
        activations in the backward pass instead of storing them; ``scan`` (no caches): run repeated
        layers as one ``lax.scan`` (``_scan_layers``; same values, shorter compilation).
        """
        X = self._embed(tokens)
        if scan and max_len is None:
            X, infos = _scan_layers(list(self.layers), X, tokens, train, remat)
            return (self.logits_from_state(X) if logits else None), X, None, infos
        caches, infos = [], []
        for layer in self.layers:
            X, c, info = _run_block(layer, X, tokens, max_len, train, remat)
            caches.append(c)
            infos.append(info)
        return (self.logits_from_state(X) if logits else None), X, (caches if max_len is not None else None), infos

    def mtp_states(self, X, next_tokens, *, train: bool = False, remat: bool = False):
        """MTP blocks on the main final state X ``[B, S, hc, D]`` with ``next_tokens = tokens[:, 1:]``.

        Block j (from 0) feeds on block j-1's output state and, at position t, on token t+1+j
        (``next_tokens[:, t+j]``): it predicts token t+2+j (DeepSeek-V3's sequential MTP; V4 has one
        block). Positions whose token is past ``next_tokens``' end embed token 0: causal, they change
        no earlier position. Returns (list of (block, its final state), infos).
        """
        S = X.shape[1]
        out, infos = [], []
        for j, blk in enumerate(self.mtp):
            tok = next_tokens[:, j: j + S]
            tok = jnp.pad(tok, ((0, 0), (0, S - tok.shape[1])))
            X, _, info = _run_block(blk, blk.inputs(X, self.embed(tok)), tok, None, train, remat)
            out.append((blk, X))
            infos.append(info)
        return out, infos

    def mtp_logits(self, X, next_tokens, *, train: bool = False, remat: bool = False):
        """``mtp_states``' states through each block's hc_head / norm and the shared head: (list of fp32
        logits ``[B, S, V]``, infos)."""
        states, infos = self.mtp_states(X, next_tokens, train=train, remat=remat)
        return [self.logits_from_state(Xj, owner=blk) for blk, Xj in states], infos

    # ------------------------------------------------------------------ decoding
    def prefill(self, tokens, max_len: int, *, last_only: bool = False):
        """tokens ``[B, S]`` -> (logits ``[B, S, V]``, Cache ready for position S, final state); with
        ``last_only`` logits and state of the last position only (``[B, 1, ...]``)."""
        if tokens.shape[1] > max_len:
            raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds max_len {max_len}")
        logits, X, caches, _ = self(tokens, max_len=max_len, logits=not last_only)
        if last_only:
            X = X[:, -1:]
            logits = self.logits_from_state(X)
        return logits, Cache(pos=jnp.asarray(tokens.shape[1], jnp.int32), layers=caches), X

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return Cache(pos=jnp.asarray(0, jnp.int32),
                     layers=[l.attn.empty_cache(batch, max_len, self.numerics.dtype) for l in self.layers])

    def chunk_alignment(self) -> int:
        """Chunked prefill (``extend``) may start only at positions that are multiples of this: the
        least common multiple of the compress ratios and the window, so every compressed block starts
        inside a chunk and the window's keys are all cached."""
        return math.lcm(self.cfg.sliding_window, *(m for m in self.cfg.compress_ratios[:len(self.layers)] if m))

    def extend(self, tokens, cache: Cache, *, last_only: bool = False):
        """Chunked prefill: tokens ``[B, C]`` at positions ``cache.pos`` … ``cache.pos+C-1`` -> (logits
        fp32 ``[B, C, V]`` (``[B, 1, V]`` for the last position with ``last_only``), cache for the next
        position, final state of those positions). ``cache.pos`` must be a positive multiple of
        ``chunk_alignment()`` (not checked here: it may be traced; ``Engine.prefill`` checks it)."""
        t0 = cache.pos
        X = self._embed(tokens)
        new = []
        for layer, c in zip(self.layers, cache.layers):
            X, c = layer.decode(X, tokens, t0, c)
            new.append(c)
        if last_only:
            X = X[:, -1:]
        return self.logits_from_state(X), Cache(pos=t0 + tokens.shape[1], layers=new), X

    def decode(self, token, cache: Cache):
        """token int ``[B]`` at position ``cache.pos`` -> (logits fp32 ``[B, V]``, cache for the next position)."""
        t = cache.pos
        X = self._embed(token[:, None])
        new = []
        for layer, c in zip(self.layers, cache.layers):
            X, c = layer.decode(X, token[:, None], t, c)
            new.append(c)
        return self.logits_from_state(X)[:, 0], Cache(pos=t + 1, layers=new)
