"""lm-evaluation-harness model ``v4jax`` (optional extra: ``pip install -e '.[lm-eval]'``).

    python -c "import v4jax.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" --model v4jax \\
        --model_args checkpoint=PATH,mode=production,layout=released,max_length=4096 --tasks hellaswag
    (the import registers the name ``v4jax`` with lm-eval)

Requests (lm-eval's ``Instance``; only ``.args`` is used):
  * ``loglikelihood``          ``(context, continuation)`` -> ``(Σ log p(continuation | context), greedy?)``
  * ``loglikelihood_rolling``  ``(text,)`` -> ``Σ log p(text)`` over windows of ``max_length`` tokens
  * ``generate_until``         ``(context, {"until": [...], "max_gen_toks": n, "do_sample", "temperature",
                               "top_p", "top_k"})`` -> the continuation, cut before the first stop string

Every sequence starts with BOS (when the tokenizer has one). Without lm_eval installed the class
is still importable (on a plain base) so its logic can be used and tested directly.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from v4jax import chat as chat_lib
from v4jax.evaluate import Scorer, load_any, load_tokenizer_for, score_documents, stop_token_ids
from v4jax.generate import Engine, generate

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval not installed: same class, no registry
    _Base = object

    def register_model(*names):
        return lambda cls: cls


def _bucket(n: int, cap: int) -> int:
    """Padded length for ``n`` tokens: the next power of two >= 16, at most ``cap`` (few compiled shapes)."""
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


@register_model("v4jax")
class V4JaxLM(_Base):
    """lm-eval LM over a v4jax ``Engine``.

    Build from ``checkpoint=`` (HF or orbax form) or ``config=`` (random model from a preset), or pass a
    ready ``engine=`` and ``tokenizer=`` (a ``tokenizers.Tokenizer`` or a path). ``max_length``: the
    longest sequence scored or generated (default: the engine's ``max_len``, else 2048). ``kv_cache``:
    ``auto`` | ``fp8`` (as ``eval.py --kv-cache``); ``prefill_chunk``: as ``eval.py --prefill-chunk``.
    """

    def __init__(self, checkpoint=None, config=None, *, engine: Engine | None = None, tokenizer=None,
                 mode: str = "exact", layout: str = "float", attention_impl: str | None = None,
                 moe_impl: str | None = None, kv_cache: str = "auto", prefill_chunk: int | None = None,
                 max_length: int | None = None, batch_size=1, max_batch_size=None,
                 max_gen_toks: int = 256, seed: int = 0, device=None, progress: bool = True):
        if _Base is not object:
            super().__init__()
        if engine is None:
            model = load_any(checkpoint, config, mode=mode, layout=layout, attention_impl=attention_impl,
                             moe_impl=moe_impl, seed=int(seed), progress=progress, kv_cache=kv_cache)
            engine = Engine(model, max_len=int(max_length or 2048),
                            prefill_chunk=int(prefill_chunk) if prefill_chunk is not None else None)
        if tokenizer is None or isinstance(tokenizer, str):
            self.tok, path = load_tokenizer_for(checkpoint, tokenizer)
        else:
            self.tok, path = tokenizer, None
        self.engine, self.cfg = engine, engine.cfg
        self.max_length = int(max_length or engine.max_len)
        if self.max_length > engine.max_len:
            raise ValueError(f"max_length {self.max_length} exceeds the engine's max_len {engine.max_len}")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            batch_size = 1  # "auto": no memory probing here; one row at a time
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks, self.seed, self.progress = int(max_gen_toks), int(seed), progress
        if path is not None:
            self.bos, self.stops = stop_token_ids(self.tok, path, self.cfg)
        else:
            from v4jax.tokenizer import BOS_TOKENS
            self.bos = next((i for i in map(self.tok.token_to_id, BOS_TOKENS) if i is not None), None)
            self.stops = {i for i in (self.tok.token_to_id(chat_lib.EOS), self.cfg.eos_token_id) if i is not None}
        self.scorer = Scorer(engine)

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _head(self) -> list[int]:
        return [self.bos] if self.bos is not None else []

    def _hook(self, kind, args, result):
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Σ log p of each continuation's tokens after its context, and whether greedy decoding would
        produce exactly them. The tokens are split as lm-eval's own backends (HF, vLLM) split them
        (``TemplateLM._encode_pair``): trailing whitespace of a context is moved to the continuation (it
        belongs to the next word for BPE), and the continuation's tokens are those of the encoded
        ``context + continuation`` past the context's token count, so a word cut between the two is
        tokenised as in the whole text (a continuation merged entirely into the context's last token has
        no tokens left: ``(0.0, True)``, as there). Sequences longer than ``max_length + 1`` lose their
        oldest tokens."""
        rows = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            ctx = self._encode(context) if context else []
            cont = self._encode(context + continuation)[len(ctx):]
            whole = (self._head() + ctx + cont)[-(self.max_length + 1):]
            if len(whole) < 2:
                raise ValueError("loglikelihood: need a context token (empty context and no BOS)")
            rows.append((whole, min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            S = _bucket(max(len(rows[i][0]) - 1 for i in idx), self.max_length)
            tokens = np.zeros((self.batch_size, S), np.int32)
            targets = np.zeros((self.batch_size, S), np.int32)
            for r, i in enumerate(idx):
                whole = rows[i][0]
                tokens[r, :len(whole) - 1], targets[r, :len(whole) - 1] = whole[:-1], whole[1:]
            logp, greedy = self.scorer(tokens, targets)
            for r, i in enumerate(idx):
                whole, m = rows[i]
                sl = slice(len(whole) - 1 - m, len(whole) - 1)
                results[i] = (float(logp[r, sl].sum()), bool(greedy[r, sl].all()))
                self._hook("loglikelihood", requests[i].args, results[i])
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of every token of each text (BOS as the first context), scored in disjoint windows of
        ``max_length`` tokens (``evaluate.score_windows``: a window's first target sees one token; the
        windows of lm-eval's ``get_rolling_token_windows`` with ``context_len=1``). A text of no tokens: 0."""
        docs = [np.asarray(self._head() + self._encode(req.args[0]), np.int32) for req in requests]
        if any(len(d) == 1 and self.bos is None for d in docs):
            raise ValueError("loglikelihood_rolling: a one-token text has no context to score it from (no BOS)")
        scored = [i for i, d in enumerate(docs) if len(d) >= 2]  # a text of no tokens: log p = 0 (as lm-eval)
        totals = [0.0] * len(docs)
        sums = score_documents(self.scorer, [docs[i] for i in scored], seq_len=self.max_length,
                               batch=self.batch_size, progress=not disable_tqdm and self.progress)
        for i, t in zip(scored, sums):
            totals[i] = t
        for req, t in zip(requests, totals):
            self._hook("loglikelihood_rolling", req.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``: ``temperature``, ``top_p``, ``top_k``) continuation of
        each context, stopped at EOS, at ``max_gen_toks`` or when a string of ``until`` appears, and cut
        before it. A sampled request draws with its own keys (``generate``'s ``row_ids``: its index in
        ``requests``), so its text does not depend on ``batch_size`` or on the other requests."""
        groups: dict = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)),
                   float(kw.get("temperature", 1.0)) if sample else 0.0, float(kw.get("top_p", 1.0)) if sample else 1.0,
                   max(int(kw.get("top_k") or 0), 0) if sample else 0)  # top_k None / 0 / -1: off
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for (until, max_new, temperature, top_p, top_k), idx in groups.items():
            max_new = min(max_new, self.max_length - 1)
            encoded = {i: (self._head() + self._encode(requests[i].args[0]))[-(self.max_length - max_new):]
                       for i in idx}
            # longest first, so a batch's prompts have similar lengths: generate() prefills up to the
            # shortest and feeds the rest of the others one token per step
            idx = sorted(idx, key=lambda i: -len(encoded[i]))
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                prompts = [encoded[i] for i in chunk]

                def hit(row, toks, _until=until):
                    return bool(_until) and any(u in self.tok.decode(toks) for u in _until)

                gens = generate(self.engine, prompts, max_new_tokens=max_new, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=self.seed, row_ids=chunk, stop_ids=self.stops,
                                should_stop=hit)
                for i, g in zip(chunk, gens):
                    text = self.tok.decode(g.tokens)
                    for u in until:
                        text = text.split(u, 1)[0]
                    results[i] = text
                    self._hook("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    # ------------------------------------------------------------------ chat (lm-eval --apply_chat_template)
    @property
    def tokenizer_name(self) -> str:
        return "v4jax-deepseek-chat"

    def chat_template(self, chat_template=False) -> str:
        return "deepseek-v4 (v4jax.chat.encode_chat, non-thinking)"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The DeepSeek chat encoding of ``chat_history`` without BOS (added at tokenisation); with
        ``add_generation_prompt=False`` a final assistant message is left open for continuation."""
        history = list(chat_history)
        if not add_generation_prompt and history and history[-1]["role"] == "assistant":
            prefix = chat_lib.encode_chat(history[:-1], bos=False)
            return prefix + history[-1]["content"]
        return chat_lib.encode_chat(history, bos=False, add_generation_prompt=add_generation_prompt)
