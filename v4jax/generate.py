"""Jit-compiled prefill / decode over a fixed-size cache, and the logits dump used by ``eval.py logits``.

    engine = Engine(model, max_len=4096)
    logits, cache, state = engine.prefill(tokens)        # tokens [B, S]
    logits, cache = engine.decode(token, cache)          # token [B], at position cache.pos
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax.model.transformer import Transformer


class Engine:
    """Holds a model split into (graph, state) and its compiled prefill / decode / MTP functions."""

    def __init__(self, model: Transformer, max_len: int):
        self.cfg = model.cfg
        self.max_len = max_len
        self.graphdef, self.state = nnx.split(model)
        gd = self.graphdef

        @jax.jit
        def prefill(state, tokens):
            return nnx.merge(gd, state).prefill(tokens, max_len)

        @functools.partial(jax.jit, donate_argnums=(2,))
        def decode(state, token, cache):
            return nnx.merge(gd, state).decode(token, cache)

        @jax.jit
        def mtp(state, X, next_tokens):
            return nnx.merge(gd, state).mtp_logits(X, next_tokens)[0]

        self._prefill, self._decode, self._mtp = prefill, decode, mtp

    def prefill(self, tokens):
        """tokens int ``[B, S]`` -> (logits fp32 ``[B, S, V]``, Cache at position S, final state ``[B, S, hc, D]``)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds the engine's max_len {self.max_len}")
        return self._prefill(self.state, tokens)

    def decode(self, token, cache):
        """token int ``[B]`` -> (logits fp32 ``[B, V]``, next cache). The cache passed in is consumed."""
        return self._decode(self.state, jnp.asarray(token, jnp.int32), cache)

    def mtp_logits(self, X, next_tokens):
        """MTP heads on final state X with ``next_tokens [B, S]`` -> list of fp32 ``[B, S, V]``."""
        return self._mtp(self.state, X, jnp.asarray(next_tokens, jnp.int32))


def dump_logits(engine: Engine, tokens: np.ndarray, n_prefill: int, n_decode: int, *, progress: bool = True):
    """What ``eval.py logits`` writes (float32 arrays):

    * ``prefill_logits [B, N, V]``: every position of a prefill of ``tokens[:, :N]``;
    * ``decode_logits [B, M, V]``: then ``tokens[:, t]`` fed alone at position t = N … N+M-1;
    * ``mtp_logits [B, N, V]`` (and ``mtp{j}_logits`` for further blocks): the MTP block on the
      prefill's final state with input tokens ``tokens[:, 1:N+1]``.
    """
    B, T = tokens.shape
    if n_prefill < 1:
        raise ValueError(f"--prefill must be >= 1, got {n_prefill}")
    if n_decode < 0:
        raise ValueError(f"--decode must be >= 0, got {n_decode}")
    need = max(n_prefill + n_decode, n_prefill + 1 if engine.cfg.num_nextn_predict_layers else n_prefill)
    if T < need:
        raise ValueError(f"tokens have {T} columns; prefill {n_prefill} + decode {n_decode} needs {need}")
    if n_prefill + n_decode > engine.max_len:
        raise ValueError(f"prefill + decode = {n_prefill + n_decode} exceeds max_len {engine.max_len}")
    out = {}
    logits, cache, X = engine.prefill(tokens[:, :n_prefill])
    out["prefill_logits"] = np.asarray(logits, np.float32)
    if engine.cfg.num_nextn_predict_layers:
        for j, ml in enumerate(engine.mtp_logits(X, tokens[:, 1:n_prefill + 1])):
            out["mtp_logits" if j == 0 else f"mtp{j}_logits"] = np.asarray(ml, np.float32)
    steps = []
    for t in tqdm(range(n_prefill, n_prefill + n_decode), desc="decode", disable=not progress):
        logits, cache = engine.decode(tokens[:, t], cache)
        steps.append(np.asarray(logits, np.float32))
    V = out["prefill_logits"].shape[-1]
    out["decode_logits"] = np.stack(steps, 1) if steps else np.zeros((B, 0, V), np.float32)
    return out


def cache_bytes(cfg, context: int, *, mode: str = "production", batch: int = 1) -> dict:
    """Decoding-cache bytes for ``context`` positions: the shapes each layer's ``Attention.empty_cache``
    allocates (what ``Transformer.init_cache`` holds), traced abstractly — nothing is allocated.

    Returns ``{"total": bytes, "per_token": bytes / context, "parts": {cache field: bytes}}`` for one sequence.
    """
    from v4jax.model.attention import Attention
    from v4jax.model.cache import nbytes
    from v4jax.model.layers import Numerics, WeightLayout

    numerics, layout = Numerics(mode), WeightLayout.float()
    parts = {}
    for i in range(cfg.num_hidden_layers):
        attn = nnx.eval_shape(lambda: Attention(cfg, cfg.compress_ratios[i], numerics=numerics, layout=layout,
                                                rngs=nnx.Rngs(0)))
        c = jax.eval_shape(lambda: attn.empty_cache(batch, context, numerics.dtype))
        for name in ("win_kv", "ckv", "comp_k", "comp_s", "ikv", "icomp_k", "icomp_s"):
            a = getattr(c, name)
            if a is not None:
                parts[name] = parts.get(name, 0) + nbytes(a) // batch
    total = sum(parts.values())
    return {"total": total, "per_token": total / context, "parts": parts}
