"""Evaluation on top of ``Engine``: perplexity, needle-in-a-haystack retrieval, throughput benchmark.

* ``Scorer``       jitted log-probabilities of target tokens (full-sequence forward, no cache).
* ``perplexity``   nats/token and bits/byte of documents scored in windows of ``seq_len``.
* ``needle``       a random pass key planted at several depths of filler contexts of several lengths;
                   accuracy of greedy retrieval per (depth, length).
* ``bench``        prefill / decode latency and throughput, peak memory, KV-cache bytes per token.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax.generate import Engine, cache_bytes, generate


# ------------------------------------------------------------------------------------------- loading

def load_any(checkpoint=None, config=None, *, mode: str = "exact", layout: str = "float",
             attention_impl: str | None = None, moe_impl: str | None = None, seed: int = 0,
             progress: bool = True, mesh=None, kv_cache: str = "auto"):
    """A model from an HF checkpoint directory, an orbax-form directory (it has ``v4jax.json``), a
    ``train.py`` run (its workdir, ``checkpoints`` directory or one step directory: the newest step), or a
    YAML preset (``config``: random initialisation with ``seed``). Exactly one source must be given.
    ``mesh``: split the weights over this device mesh (``sharding.placer``). ``kv_cache``: the decoding
    cache's format (``Numerics.kv_cache``)."""
    from pathlib import Path

    from v4jax.config import ConfigError, load_model_config
    from v4jax.hf.checkpoint import load_model
    from v4jax.hf.convert import is_orbax_dir, is_train_checkpoint, load_orbax_model
    from v4jax.model.transformer import Transformer

    if (checkpoint is None) == (config is None):
        raise ValueError("give exactly one of a checkpoint directory or a config preset")
    if checkpoint is not None:
        load, source = load_model, checkpoint
        if is_orbax_dir(Path(checkpoint)):
            load = load_orbax_model
        elif is_train_checkpoint(Path(checkpoint)):
            from v4jax.checkpoint import open_train_run
            try:
                load, source = load_orbax_model, open_train_run(checkpoint)
            except FileNotFoundError as e:
                raise ConfigError(f"--checkpoint: {e}") from e
        return load(source, mode=mode, layout=layout, attention_impl=attention_impl, moe_impl=moe_impl,
                    progress=progress, mesh=mesh, kv_cache=kv_cache)
    overrides = [f"model.{k}={v}" for k, v in (("attention_impl", attention_impl), ("moe_impl", moe_impl))
                 if v is not None]
    cfg = load_model_config(config, overrides)

    def build():
        return Transformer(cfg, mode=mode, rngs=nnx.Rngs(seed), kv_cache=kv_cache)
    if mesh is not None:  # a full-size random model (benchmarks) fits only split
        from v4jax.sharding import init_sharded
        return init_sharded(build, mesh)
    return build()


def load_tokenizer_for(checkpoint=None, tokenizer=None):
    """(tokenizers.Tokenizer, path): ``tokenizer`` if given, else the checkpoint's ``tokenizer.json``
    (a ``train.py`` run's: its ``data.tokenizer``), else (no checkpoint: a random model) the shipped tiny
    tokenizer."""
    import os

    from v4jax.hf.convert import is_train_checkpoint
    from v4jax.tokenizer import TINY_TOKENIZER, load_tokenizer

    if tokenizer is None and checkpoint is not None and is_train_checkpoint(checkpoint):
        from v4jax.checkpoint import open_train_run
        tokenizer = str(open_train_run(checkpoint).tokenizer())
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"the run's tokenizer {tokenizer} is not found; pass --tokenizer PATH")
    if tokenizer is None and checkpoint is not None:
        tokenizer = os.path.join(checkpoint, "tokenizer.json")
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"{checkpoint} has no tokenizer.json; pass --tokenizer PATH")
    path = tokenizer or TINY_TOKENIZER
    return load_tokenizer(path), path


def stop_token_ids(tok, path, cfg) -> tuple[int | None, set[int]]:
    """(bos id, ids that end a reply): the tokenizer's EOS, ``<｜end▁of▁sentence｜>`` and the config's eos."""
    from v4jax.chat import EOS
    from v4jax.tokenizer import special_ids

    bos, eos = special_ids(tok, path)
    stops = {i for i in (eos, tok.token_to_id(EOS), cfg.eos_token_id) if i is not None}
    return bos, stops


class Scorer:
    """``scorer(tokens [B, S], targets [B, S]) -> (log p(targets) fp32 [B, S], targets == argmax bool [B, S])``.

    Row b position s scores ``targets[b, s]`` given ``tokens[b, :s+1]``. Uses the engine's weights
    (no copy); compiled once per input shape.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        gd = engine.graphdef

        @jax.jit
        def score(state, tokens, targets):
            logits = nnx.merge(gd, state)(tokens)[0]
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets

        self._score = score

    def __call__(self, tokens, targets):
        logp, greedy = self._score(self.engine.state, jnp.asarray(tokens, jnp.int32), jnp.asarray(targets, jnp.int32))
        return np.asarray(logp, np.float64), np.asarray(greedy)


# ------------------------------------------------------------------------------------------- windows

def score_windows(n: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """How a document of ``n`` tokens is scored: ``[(start, end, first)]``.

    Every target ``x[j]`` (j = 1 … n-1) is scored exactly once. Targets are taken in chunks of
    ``stride`` (default ``seq_len``); the chunk of targets ``[a, b)`` is scored by one forward pass
    over the inputs ``x[start:end]`` with ``end = b - 1`` and ``start = max(0, end - seq_len)``,
    keeping the predictions for targets ``first … b-1`` (``first = a``). So with ``stride == seq_len``
    windows are disjoint and a chunk's first target sees one token of context (only a final, partial
    chunk re-reads earlier tokens to fill its window); with a smaller stride each window re-reads up
    to ``seq_len - stride`` earlier tokens as context. Nothing else is carried between windows.
    """
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise ValueError(f"need 1 <= stride <= seq_len, got stride {stride}, seq_len {seq_len}")
    out = []
    for a in range(1, n, stride):
        b = min(a + stride, n)
        end = b - 1
        out.append((max(0, end - seq_len), end, a))
    return out


def score_documents(scorer: Scorer, docs: list[np.ndarray], *, seq_len: int, stride: int | None = None,
                    batch: int = 1, progress: bool = True) -> list[float]:
    """Sum of ``log p`` over the targets 1 … n-1 of each document (windows as in ``score_windows``).

    Windows are right-padded to ``seq_len`` (causal: padding never affects earlier positions) and
    run ``batch`` at a time, so one shape is compiled.
    """
    jobs = [(d, s, e, a) for d, doc in enumerate(docs) for s, e, a in score_windows(len(doc), seq_len, stride)]
    totals = [0.0] * len(docs)
    bar = tqdm(total=len(jobs), desc="scoring", unit="window", disable=not progress)
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        tokens = np.zeros((batch, seq_len), np.int32)
        targets = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), bool)
        for r, (d, s, e, a) in enumerate(chunk):
            x = docs[d]
            tokens[r, :e - s] = x[s:e]
            targets[r, :e - s] = x[s + 1:e + 1]
            mask[r, a - 1 - s:e - s] = True  # predictions at input positions a-1 … e-1
        logp, _ = scorer(tokens, targets)
        for r, (d, *_rest) in enumerate(chunk):
            totals[d] += float(logp[r][mask[r]].sum())
        bar.update(len(chunk))
    bar.close()
    return totals


@dataclass
class PerplexityResult:
    nats_per_token: float
    perplexity: float
    bits_per_byte: float | None   # None when the byte count is unknown (pre-tokenised input)
    tokens: int                   # scored tokens
    bytes: int | None
    documents: int


def perplexity(scorer: Scorer, docs: list[np.ndarray], doc_bytes: list[int] | None = None, *, seq_len: int,
               stride: int | None = None, batch: int = 1, progress: bool = True) -> PerplexityResult:
    """Score documents (token arrays; their first token is context only, e.g. BOS) and summarise.

    ``bits_per_byte = -Σ log p / ln 2 / Σ bytes`` with ``doc_bytes`` the UTF-8 size of each document's text.
    """
    docs = [np.asarray(d, np.int32) for d in docs if len(d) >= 2]
    if not docs:
        raise ValueError("no document has two or more tokens: nothing to score")
    totals = score_documents(scorer, docs, seq_len=seq_len, stride=stride, batch=batch, progress=progress)
    n = sum(len(d) - 1 for d in docs)
    nats = -sum(totals)
    nb = sum(doc_bytes) if doc_bytes is not None else None
    return PerplexityResult(nats / n, math.exp(nats / n), nats / math.log(2) / nb if nb else None, n, nb, len(docs))


# ------------------------------------------------------------------------------------------- needle

INTRO = "Find the pass key hidden in this text and remember it.\n"
FILLER = "The grass is green. The sky is blue. The sun is warm.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def needle_prompt(tok, length: int, depth: float, key: str, *, bos: int | None, chat: bool = False) -> list[int]:
    """Exactly ``length`` token ids: [BOS] intro, filler, the needle at ``depth`` (0 = just after the
    intro, 1 = just before the question; placed at a filler-sentence boundary), filler, question.

    ``chat``: the text is the user message of a non-thinking chat turn (DeepSeek chat encoding).
    """
    from v4jax import chat as chat_lib
    head = ([bos] if bos is not None else [])
    tail: list[int] = []
    if chat:
        head += _ids(tok, chat_lib.USER)
        tail = _ids(tok, chat_lib.ASSISTANT + chat_lib.THINK_CLOSE)
    head += _ids(tok, INTRO)
    needle, question, filler = _ids(tok, NEEDLE.format(key=key)), _ids(tok, QUESTION), _ids(tok, FILLER)
    room = length - len(head) - len(needle) - len(question) - len(tail)
    if room < 0:
        raise ValueError(f"needle: context length {length} is too short; the fixed text alone takes "
                         f"{length - room} tokens")
    stream = filler * (room // len(filler) + 1)
    cut = min(room, int(round(depth * room / len(filler))) * len(filler))
    ids = head + stream[:cut] + needle + stream[cut:room] + question + tail
    assert len(ids) == length
    return ids


@dataclass
class NeedleResult:
    lengths: list[int]
    depths: list[float]
    accuracy: np.ndarray      # [len(depths), len(lengths)]
    samples: list[dict]       # per trial: length, depth, key, answer text, correct


def needle(engine: Engine, tok, *, lengths, depths, trials: int = 2, batch: int = 4, digits: int = 5,
           seed: int = 0, bos: int | None = None, chat: bool = False, stop_ids=None,
           progress: bool = True) -> NeedleResult:
    """Greedy retrieval accuracy per (depth, length): a trial is correct when the generated text
    (up to ``digits + 8`` tokens, ending at a stop token) contains the planted key. ``stop_ids``: the
    ids that end an answer (default: the tokenizer's ``<｜end▁of▁sentence｜>``); nothing the model
    writes after one counts."""
    from v4jax.tokenizer import EOS_TOKENS
    if stop_ids is None:
        stop_ids = {i for i in map(tok.token_to_id, EOS_TOKENS) if i is not None}
    rng = np.random.default_rng(seed)
    acc = np.zeros((len(depths), len(lengths)))
    samples = []
    max_new = digits + 8
    for li, L in enumerate(lengths):
        jobs = [(di, d, str(rng.integers(10 ** (digits - 1), 10 ** digits)))
                for di, d in enumerate(depths) for _ in range(trials)]
        prompts = [needle_prompt(tok, L, d, k, bos=bos, chat=chat) for _, d, k in jobs]
        for i in tqdm(range(0, len(jobs), batch), desc=f"needle L={L}", disable=not progress):
            rows = prompts[i:i + batch]
            rows += [rows[-1]] * (batch - len(rows))  # keep one compiled batch shape
            res = generate(engine, rows, max_new_tokens=max_new, stop_ids=stop_ids)
            for (di, d, k), g in zip(jobs[i:i + batch], res):
                answer = tok.decode(g.tokens)
                ok = k in answer
                acc[di, li] += ok / trials
                samples.append({"length": L, "depth": d, "key": k, "answer": answer, "correct": bool(ok)})
    return NeedleResult(list(lengths), list(depths), acc, samples)


def needle_table(r: NeedleResult) -> str:
    head = "| depth \\ length | " + " | ".join(str(L) for L in r.lengths) + " |"
    sep = "|---|" + "---|" * len(r.lengths)
    rows = [f"| {d:.0%} | " + " | ".join(f"{a:.2f}" for a in r.accuracy[i]) + " |" for i, d in enumerate(r.depths)]
    return "\n".join([head, sep, *rows, f"\nmean accuracy {r.accuracy.mean():.3f}"])


# ------------------------------------------------------------------------------------------- bench

def dense_mla_bytes_per_token(cfg) -> int:
    """KV cache per token of a dense-MLA (V3.2-style) model of the same depth: per layer one latent of
    kv_lora_rank 512 + 64 RoPE values, bf16."""
    return cfg.num_hidden_layers * (512 + 64) * 2


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the device's peak bytes in use when it reports memory stats
    (GPU / TPU), else this process's peak resident set size (host RSS)."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory stats raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), f"device peak ({jax.devices()[0].device_kind})"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host peak RSS"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def bench(engine: Engine, *, batch: int, prompt_len: int, decode_steps: int, iters: int = 3, context: int | None = None,
          seed: int = 0, progress: bool = True) -> dict:
    """Prefill / decode timings (median over ``iters`` prefills and ``decode_steps`` steps, after a
    compiling first call), peak memory and KV-cache bytes per token at ``context`` positions."""
    cfg = engine.cfg
    if prompt_len + decode_steps + 1 > engine.max_len:
        raise ValueError(f"prompt_len + decode_steps + 1 = {prompt_len + decode_steps + 1} exceeds max_len {engine.max_len}")
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    (_, cache, _), prefill_compile = _timed(lambda: engine.prefill(tokens))
    times = []
    for _ in tqdm(range(iters), desc="prefill", disable=not progress):
        (_, cache, _), dt = _timed(lambda: engine.prefill(tokens))
        times.append(dt)
    prefill = float(np.median(times))
    tok = tokens[:, -1]
    (_, cache), decode_compile = _timed(lambda: engine.decode(tok, cache))
    steps = []
    for _ in tqdm(range(decode_steps), desc="decode", disable=not progress):
        (_, cache), dt = _timed(lambda: engine.decode(tok, cache))
        steps.append(dt)
    step = float(np.median(steps)) if steps else float("nan")
    mem, mem_kind = peak_memory()
    context = context or prompt_len + decode_steps
    v4 = cache_bytes(cfg, context, mode="production", kv_cache=engine.numerics.kv_cache)
    return {
        "batch": batch, "prompt_len": prompt_len, "decode_steps": decode_steps,
        "prefill_compile_s": prefill_compile, "prefill_latency_s": prefill,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_compile_s": decode_compile, "decode_step_latency_s": step,
        "decode_tokens_per_s": batch / step if steps else float("nan"),
        "peak_memory_bytes": mem, "peak_memory_kind": mem_kind, "context": context,
        "kv_bytes_per_token": v4["per_token"], "kv_parts": v4["parts"], "kv_cache": engine.numerics.kv_cache,
        "dense_mla_bytes_per_token": dense_mla_bytes_per_token(cfg),
        "device": str(jax.devices()[0].device_kind),
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.1f} B"
        n /= 1024


def bench_table(r: dict) -> str:
    ratio = r["dense_mla_bytes_per_token"] / r["kv_bytes_per_token"]
    rows = [
        ("device", r["device"]),
        (f"prefill latency (batch {r['batch']} × {r['prompt_len']} tokens)", f"{r['prefill_latency_s'] * 1e3:.2f} ms"),
        ("prefill throughput", f"{r['prefill_tokens_per_s']:,.0f} tokens/s"),
        ("prefill first call (compile)", f"{r['prefill_compile_s']:.2f} s"),
        (f"decode latency per step (batch {r['batch']})", f"{r['decode_step_latency_s'] * 1e3:.2f} ms"),
        ("decode throughput", f"{r['decode_tokens_per_s']:,.0f} tokens/s"),
        ("decode first call (compile)", f"{r['decode_compile_s']:.2f} s"),
        (f"peak memory ({r['peak_memory_kind']})", _fmt_bytes(r["peak_memory_bytes"])),
        (f"KV cache per token @ {r['context']} ctx: V4 (bf16 activations"
         + (", FP8 KV)" if r.get("kv_cache") == "fp8" else ")"), _fmt_bytes(r["kv_bytes_per_token"])),
        ("KV cache per token: dense MLA baseline (bf16, 576/layer)", _fmt_bytes(r["dense_mla_bytes_per_token"])),
        ("baseline / V4", f"{ratio:.2f}×"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"] +
                     [f"| {k.ljust(w)} | {v} |" for k, v in rows])
