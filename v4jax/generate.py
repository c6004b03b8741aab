"""Jit-compiled prefill / decode over a fixed-size cache, and the logits dump used by ``eval.py logits``.

    engine = Engine(model, max_len=4096, prefill_chunk=None)   # or e.g. 1024: prefill in chunks
    logits, cache, state = engine.prefill(tokens)        # tokens [B, S]
    logits, cache = engine.decode(token, cache)          # token [B], at position cache.pos

    results = generate(engine, [prompt_ids, ...], max_new_tokens=64, temperature=0.7, top_p=0.9)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax.model.transformer import Transformer
from v4jax.sharding import weights_in_place


class Engine:
    """Holds a model split into (graph, state) and its compiled prefill / decode / MTP functions.

    ``prefill_chunk``: prefill longer inputs in chunks of this many tokens (a multiple of
    ``model.chunk_alignment()``), each chunk attending to the cache of the ones before: activation
    memory then grows with the chunk, not with the prompt. Same results as one prefill up to
    float rounding. ``progress``: a progress bar over the chunks.
    """

    def __init__(self, model: Transformer, max_len: int, *, prefill_chunk: int | None = None,
                 progress: bool = False):
        self.cfg, self.numerics = model.cfg, model.numerics
        self.max_len = max_len
        if prefill_chunk is not None:
            a = model.chunk_alignment()
            if prefill_chunk < 1 or prefill_chunk % a:
                raise ValueError(
                    f"prefill_chunk must be a positive multiple of {a} (the least common multiple of the window "
                    f"{model.cfg.sliding_window} and the compress ratios), got {prefill_chunk}")
        self.prefill_chunk, self.progress = prefill_chunk, progress
        self.graphdef, self.state = nnx.split(model)
        gd = self.graphdef

        @functools.partial(jax.jit, static_argnames=("last_only",))
        def prefill(state, tokens, last_only=False):
            return nnx.merge(gd, state).prefill(tokens, max_len, last_only=last_only)

        @functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("last_only",))
        def extend(state, tokens, cache, last_only=False):
            return nnx.merge(gd, state).extend(tokens, cache, last_only=last_only)

        @functools.partial(jax.jit, donate_argnums=(2,))
        def decode(state, token, cache):
            with weights_in_place():  # under a mesh: partial products, not gathered weights
                return nnx.merge(gd, state).decode(token, cache)

        @jax.jit
        def mtp(state, X, next_tokens):
            return nnx.merge(gd, state).mtp_logits(X, next_tokens)[0]

        self._prefill, self._extend, self._decode, self._mtp = prefill, extend, decode, mtp

    def prefill(self, tokens, *, last_only: bool = False):
        """tokens int ``[B, S]`` -> (logits fp32 ``[B, S, V]``, Cache at position S, final state
        ``[B, S, hc, D]``); with ``last_only`` logits and state of the last position (``[B, 1, ...]``)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        S, c = tokens.shape[1], self.prefill_chunk
        if S > self.max_len:
            raise ValueError(f"prefill of {S} tokens exceeds the engine's max_len {self.max_len}")
        if c is None or S <= c:
            return self._prefill(self.state, tokens, last_only=last_only)
        logits, cache, X = self._prefill(self.state, tokens[:, :c], last_only=last_only)
        parts = [(logits, X)]
        for start in tqdm(range(c, S, c), desc="prefill chunks", unit="chunk", disable=not self.progress):
            logits, cache, X = self._extend(self.state, tokens[:, start:start + c], cache, last_only=last_only)
            parts.append((logits, X))
        if last_only:
            return logits, cache, X
        return jnp.concatenate([p[0] for p in parts], 1), cache, jnp.concatenate([p[1] for p in parts], 1)

    def decode(self, token, cache):
        """token int ``[B]`` -> (logits fp32 ``[B, V]``, next cache). The cache passed in is consumed."""
        return self._decode(self.state, jnp.asarray(token, jnp.int32), cache)

    def mtp_logits(self, X, next_tokens):
        """MTP heads on final state X ``[B, S, ...]`` with ``next_tokens = tokens[:, 1:]`` (at least S columns;
        block j reads column t+j at position t, see ``Transformer.mtp_states``) -> list of fp32 ``[B, S, V]``."""
        return self._mtp(self.state, X, jnp.asarray(next_tokens, jnp.int32))


def dump_logits(engine: Engine, tokens: np.ndarray, n_prefill: int, n_decode: int, *, progress: bool = True):
    """What ``eval.py logits`` writes (float32 arrays):

    * ``prefill_logits [B, N, V]``: every position of a prefill of ``tokens[:, :N]``;
    * ``decode_logits [B, M, V]``: then ``tokens[:, t]`` fed alone at position t = N … N+M-1;
    * ``mtp_logits [B, N, V]`` (and ``mtp{j}_logits`` for further blocks): the MTP block on the
      prefill's final state with input tokens ``tokens[:, 1:N+1]`` (block j: ``tokens[:, 1+j:N+1+j]``, as
      far as ``tokens`` reaches; positions past its end embed token 0).
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
        for j, ml in enumerate(engine.mtp_logits(X, tokens[:, 1:n_prefill + engine.cfg.num_nextn_predict_layers])):
            out["mtp_logits" if j == 0 else f"mtp{j}_logits"] = np.asarray(ml, np.float32)
    steps = []
    for t in tqdm(range(n_prefill, n_prefill + n_decode), desc="decode", disable=not progress):
        logits, cache = engine.decode(tokens[:, t], cache)
        steps.append(np.asarray(logits, np.float32))
    V = out["prefill_logits"].shape[-1]
    out["decode_logits"] = np.stack(steps, 1) if steps else np.zeros((B, 0, V), np.float32)
    return out


def cache_bytes(cfg, context: int, *, mode: str = "production", batch: int = 1, kv_cache: str = "auto") -> dict:
    """Decoding-cache bytes for ``context`` positions: the shapes each layer's ``Attention.empty_cache``
    allocates (what ``Transformer.init_cache`` holds), traced abstractly — nothing is allocated.
    ``kv_cache``: ``"auto"`` or ``"fp8"`` (``Numerics.kv_cache``).

    Returns ``{"total": bytes, "per_token": bytes / context, "parts": {cache field: bytes}}`` for one sequence.
    """
    from v4jax.model.attention import Attention
    from v4jax.model.cache import nbytes
    from v4jax.model.layers import Numerics, WeightLayout

    numerics, layout = Numerics(mode, kv_cache=kv_cache), WeightLayout.float()
    parts = {}
    for i in range(cfg.num_hidden_layers):
        # outside any mesh the caller runs under: shapes only, and logical axis names are no mesh axes
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            attn = nnx.eval_shape(lambda: Attention(cfg, cfg.compress_ratios[i], numerics=numerics,
                                                    layout=layout, rngs=nnx.Rngs(0)))
            c = jax.eval_shape(lambda: attn.empty_cache(batch, context, numerics.dtype))
        for name in ("win_kv", "ckv", "comp_k", "comp_s", "ikv", "icomp_k", "icomp_s"):
            a = getattr(c, name)
            if a is not None:
                parts[name] = parts.get(name, 0) + nbytes(a) // batch
    total = sum(parts.values())
    return {"total": total, "per_token": total / context, "parts": parts}


# ------------------------------------------------------------------------------------------- sampling

@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample(logits, keys, temperature, top_p, top_k, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)                        # most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    ranked = jnp.where(jnp.arange(ranked.shape[-1]) < top_k, ranked, -jnp.inf)  # the top_k most likely
    probs = jax.nn.softmax(ranked, axis=-1)                      # renormalised over them
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p         # mass before the token < top_p
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))  # row b: keys[b]
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def check_sampling(temperature, top_p, top_k):
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got {temperature}, {top_p}, {top_k}")


def sample_logits(logits, key, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0):
    """Next tokens from fp32 logits ``[B, V]`` -> int32 ``[B]``.

    ``temperature == 0``: greedy (argmax). Otherwise sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (``0``: all), renormalised, then to the nucleus of
    those: the most likely tokens whose cumulative probability first reaches ``top_p`` (the most likely
    token is always kept). ``key``: a jax PRNG key (split into one per row) or ``B`` keys, row b
    sampling with ``key[b]`` alone.
    """
    check_sampling(temperature, top_p, top_k)
    if temperature == 0:
        return _sample(logits, None, jnp.float32(1), jnp.float32(1), jnp.int32(0), True)
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
    keys = jax.random.split(key, logits.shape[0]) if key.ndim == 0 else key
    V = logits.shape[-1]
    return _sample(logits, keys, jnp.float32(temperature), jnp.float32(top_p), jnp.int32(min(top_k or V, V)), False)


@jax.jit
def _step_keys(row_keys, counts):
    """Row b's key for its ``counts[b]``-th new token."""
    return jax.vmap(jax.random.fold_in)(row_keys, counts)


# ------------------------------------------------------------------------------------------- generation

@dataclasses.dataclass
class Generation:
    """One row's result: new ``tokens`` (without the stop token) and why it ended:
    ``"eos"`` (a stop id was sampled), ``"stop"`` (``should_stop`` said so) or ``"length"``."""
    tokens: list[int]
    finish_reason: str


def prefill_length(n: int, bucket: int = 64) -> int:
    """How many of a shortest prompt's ``n`` tokens to prefill: a multiple of ``bucket`` when n >= bucket,
    else the largest power of two <= n. The rest is fed through ``decode``; prefill shapes (compiled
    programs) stay few however prompt lengths vary."""
    if n >= bucket:
        return n // bucket * bucket
    return 1 << (n.bit_length() - 1)


def generate(engine: Engine, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, row_ids=None, stop_ids=(), on_token=None, should_stop=None,
             prefill_bucket: int = 64) -> list[Generation]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens, as one batch.

    Every row starts at position 0 and sees exactly its own tokens (no padding): the batch is
    prefilled with the first P tokens of every prompt (P = ``prefill_length`` of the shortest
    prompt); from position P on, each step feeds every row either its next prompt token (teacher
    forcing, while its prompt lasts) or the token just sampled for it, so rows of different lengths
    share positions. Rows that have finished keep stepping with a dummy token (discarded) until all
    are done.

    ``on_token(row, token)`` is called for every generated token as it is decoded (streaming);
    ``should_stop(row, tokens) -> bool`` may end a row early (e.g. on a stop string).

    Sampling (``temperature``, ``top_p``, ``top_k``) as ``sample_logits``; row i draws its n-th new
    token with the key ``fold_in(fold_in(key(seed), row_ids[i]), n)`` (``row_ids``: default ``0 … B-1``),
    so a sampled row depends on the seed, its id and its own prompt only, not on the other rows of the
    batch (their number, contents or lengths).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    B, V = len(prompts), engine.cfg.vocab_size
    if B == 0:
        return []
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
        raise ValueError("every prompt needs at least one token")
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < V]
    if bad:
        raise ValueError(f"prompt {bad[0][0]} has token id {bad[0][1]} outside the model's vocabulary [0, {V})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_p, top_k)  # before the prefill, which may take long
    if max(lens) + max_new_tokens > engine.max_len:
        raise ValueError(f"longest prompt ({max(lens)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"engine's max_len {engine.max_len}")
    row_ids = list(range(B)) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != B:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {B} prompts")
    stop_ids = {int(s) for s in stop_ids if s is not None}
    out = [Generation([], "length") for _ in range(B)]
    done = [max_new_tokens == 0] * B
    P = prefill_length(min(lens), prefill_bucket)
    logits, cache, _ = engine.prefill(np.array([p[:P] for p in prompts], np.int32), last_only=True)
    last = logits[:, -1]
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(row_ids, jnp.uint32))
    t = P  # position of the token fed next
    while not all(done):
        keys = _step_keys(row_keys, jnp.asarray([len(g.tokens) for g in out], jnp.uint32)) if temperature else None
        sampled = np.asarray(sample_logits(last, keys, temperature=temperature, top_p=top_p, top_k=top_k))
        feed = np.zeros(B, np.int32)
        for i in range(B):
            if t < lens[i]:
                feed[i] = prompts[i][t]
                continue
            if done[i]:
                continue
            tok = int(sampled[i])
            feed[i] = tok
            if tok in stop_ids:
                out[i].finish_reason, done[i] = "eos", True
                continue
            out[i].tokens.append(tok)
            if on_token is not None:
                on_token(i, tok)
            if should_stop is not None and should_stop(i, out[i].tokens):
                out[i].finish_reason, done[i] = "stop", True
            elif len(out[i].tokens) >= max_new_tokens:
                done[i] = True
        if all(done):
            break
        last, cache = engine.decode(feed, cache)
        t += 1
    return out
