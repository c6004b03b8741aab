#!/usr/bin/env python3
"""v4jax evaluation CLI. Subcommands:

  logits      dump prefill / decode / MTP logits of a checkpoint (or a random model from a preset)
  generate    text prompt(s) -> generated text (chat encoding, greedy / temperature / top-k / top-p, streaming)
  perplexity  nats/token and bits/byte of text / JSONL / token files, scored in windows
  bench       prefill / decode latency and throughput, peak memory, KV-cache bytes per token
  needle      pass-key retrieval accuracy over context lengths x needle depths
  qat-ties    explain a qat disagreement with another implementation's logits by rounding near-ties

--checkpoint accepts an HF checkpoint directory, an orbax-form one (with v4jax.json) or a train.py run.

Run ``python eval.py SUBCOMMAND --help`` for the flags of each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np


def _load_model(args):
    """The model named by --checkpoint (HF, orbax form, train.py run) or --config (random init from a YAML preset)."""
    from v4jax.evaluate import load_any

    if (args.checkpoint is None) == (args.config is None):
        raise SystemExit("error: give exactly one of --checkpoint DIR or --config PRESET.yaml")
    if args.kv_cache == "fp8" and args.mode == "exact":
        raise SystemExit("error: --kv-cache fp8 quantises the KV, which --mode exact never does: "
                         "use --mode qat or production with it")
    model = load_any(args.checkpoint, args.config, mode=args.mode, layout=args.layout,
                     attention_impl=args.attention_impl, moe_impl=args.moe_impl, seed=args.seed,
                     progress=not args.quiet, mesh=args.device_mesh, kv_cache=args.kv_cache)
    if args.device_mesh is not None:  # the rest of the command runs under the mesh (built outside it):
        import jax                    # the model reads it (expert-parallel routed experts)

        args.exit_stack.enter_context(jax.set_mesh(args.device_mesh))
    return model


def _engine(args, model, max_len: int):
    """The compiled prefill / decode functions for ``model`` (``--prefill-chunk``)."""
    from v4jax.generate import Engine

    try:
        return Engine(model, max_len=max_len, prefill_chunk=args.prefill_chunk, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: --prefill-chunk: {e}")


PREFILL_CHUNK_HELP = ("prefill prompts longer than N tokens in chunks of N, each attending to the cache of the "
                      "ones before (activation memory grows with N, not with the prompt; long contexts). N: a "
                      "multiple of the lcm of the window and the compress ratios (V4: 128). Default: one prefill")
KV_CACHE_HELP = ("decoding cache of the compressed KV entries: auto = activation dtype; fp8 = non-RoPE "
                 "dims as FP8 with a power-of-two scale per 64 (SPEC §5b, also applied in prefill; "
                 "lossless in qat; ~0.57x the bf16 bytes). Not with --mode exact")
MESH_HELP = ("split the model over the local devices: AXIS=SIZE,... over data, fsdp, expert, tensor "
             "(e.g. expert=8; unnamed data takes the remaining devices). Default: one device")


def _at_least(n: int):
    """An argparse type: an integer >= n."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < n:
            raise argparse.ArgumentTypeError(f"must be >= {n}, got {v}")
        return v
    return parse


POSITIVE, COUNT = _at_least(1), _at_least(0)


def _device_mesh(spec):
    """``--mesh expert=4,tensor=2`` -> a ``jax.sharding.Mesh`` (None without the flag)."""
    if not spec:
        return None
    from v4jax.config import ConfigError, MeshConfig
    from v4jax.sharding import AXES, make_mesh

    sizes = {}
    for part in spec.split(","):
        name, eq, value = (t.strip() for t in part.partition("="))
        if not eq or not value.lstrip("-").isdigit():
            raise ConfigError(f"--mesh: {part!r} is not AXIS=SIZE")
        if name not in AXES:
            raise ConfigError(f"--mesh: unknown axis {name!r} in {spec!r} (axes: {', '.join(AXES)})")
        sizes[name] = int(value)
    return make_mesh(MeshConfig(**sizes))


def _tokenizer(args, cfg):
    """(tokenizer, bos id, stop ids) for --tokenizer / the checkpoint / the shipped tiny tokenizer."""
    from v4jax.evaluate import load_tokenizer_for, stop_token_ids

    try:
        tok, path = load_tokenizer_for(args.checkpoint, args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        print(f"warning: the tokenizer has {n} ids, the model's vocabulary {cfg.vocab_size}; "
              f"ids beyond it are rejected", file=sys.stderr)
    bos, stops = stop_token_ids(tok, path, cfg)
    return tok, bos, stops


def _write_json(path, obj):
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, p)


def _write_npz(path, **arrays):
    """An .npz written atomically (a temporary file renamed into place)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, p)


def _read_tokens(args) -> np.ndarray | None:
    """--tokens, checked before the model is loaded (its ids against the vocabulary after)."""
    if args.tokens is None:
        return None
    p = Path(args.tokens)
    if not p.is_file():
        raise SystemExit(f"error: --tokens file not found: {p}")
    try:
        t = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --tokens {p} is not a .npy array of token ids ({e})")
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise SystemExit(f"error: --tokens must be an integer array [B, T], got {t.dtype}{list(t.shape)}")
    if t.shape[1] < args.prefill + args.decode:
        raise SystemExit(f"error: --tokens has {t.shape[1]} columns; --prefill {args.prefill} + --decode "
                         f"{args.decode} needs {args.prefill + args.decode} (one more with an MTP block)")
    return t.astype(np.int32)


def _tokens(args, tokens, vocab: int) -> np.ndarray:
    if tokens is None:
        rng = np.random.default_rng(args.seed)
        return rng.integers(0, vocab, size=(args.batch, args.prefill + max(args.decode, 1) + 1), dtype=np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise SystemExit(f"error: --tokens has ids in [{tokens.min()}, {tokens.max()}], the vocabulary is [0, {vocab})")
    return tokens


def cmd_logits(args):
    from v4jax.generate import dump_logits

    tokens = _read_tokens(args)
    t0 = time.time()
    model = _load_model(args)
    tokens = _tokens(args, tokens, model.cfg.vocab_size)
    print(f"model: {model.cfg.num_hidden_layers} layers, hidden {model.cfg.hidden_size}, "
          f"ratios {list(model.cfg.compress_ratios)}, mode {args.mode} ({time.time() - t0:.1f}s to load)")
    engine = _engine(args, model, args.prefill + args.decode)
    try:
        out = dump_logits(engine, tokens, args.prefill, args.decode, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    _write_npz(args.out, tokens=tokens, **out)
    for k, v in out.items():
        print(f"{k}: {list(v.shape)} float32")
    print(f"wrote {args.out} ({time.time() - t0:.1f}s)")


# ------------------------------------------------------------------------------------------- generate

def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            raise SystemExit(f"error: --prompts-file not found: {p}")
        prompts += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt TEXT (or --prompts-file FILE)")
    return prompts


def _history(args) -> list[dict]:
    """--history: a JSON list of {role, content} messages (checked before the model is loaded)."""
    if args.raw and (args.system or args.history or args.thinking):
        raise SystemExit("error: --raw encodes the prompt text alone: it excludes --system, --history and --thinking")
    if not args.history:
        return []
    import json
    try:
        history = json.loads(Path(args.history).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --history {args.history}: {e}")
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise SystemExit(f"error: --history {args.history}: expected a JSON list of {{role, content}} messages")
    return history


def _encode_prompt(args, tok, bos, text: str, history: list[dict]) -> list[int]:
    from v4jax import chat

    if args.raw:
        ids = tok.encode(text, add_special_tokens=False).ids
        return ([bos] if bos is not None and not args.no_bos else []) + ids
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + history
    messages.append({"role": "user", "content": text})
    try:
        s = chat.encode_chat(messages, thinking=args.thinking)
    except chat.ChatError as e:
        raise SystemExit(f"error: {e}")
    return tok.encode(s, add_special_tokens=False).ids


class _Streamer:
    """Prints one row's text as its tokens arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, row, token):
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def cmd_generate(args):
    from v4jax.generate import check_sampling, generate

    try:
        check_sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as e:
        raise SystemExit(f"error: --temperature / --top-p / --top-k: {e}")
    texts, history = _prompts(args), _history(args)
    model = _load_model(args)
    tok, bos, stops = _tokenizer(args, model.cfg)
    prompts = [_encode_prompt(args, tok, bos, t, history) for t in texts]
    max_len = args.max_len or max(len(p) for p in prompts) + args.max_new_tokens
    engine = _engine(args, model, max_len)
    streamer = _Streamer(tok) if len(prompts) == 1 and not args.no_stream else None
    t0 = time.time()
    try:
        results = generate(engine, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_ids=stops, on_token=streamer)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    dt = time.time() - t0
    out = []
    for i, (text, r) in enumerate(zip(texts, results)):
        completion = tok.decode(r.tokens, skip_special_tokens=False)
        if streamer is not None:
            print(completion[len(streamer.shown):])  # whatever was held back, then a newline
        else:
            print(f"=== [{i}] {text}\n{completion}")
        out.append({"prompt": text, "prompt_tokens": len(prompts[i]), "completion": completion,
                    "tokens": r.tokens, "finish_reason": r.finish_reason})
    n = sum(len(r.tokens) for r in results)
    print(f"[{n} tokens in {dt:.1f}s incl. compilation; finish: {', '.join(r.finish_reason for r in results)}]",
          file=sys.stderr)
    if args.json:
        _write_json(args.json, out)


# ------------------------------------------------------------------------------------------- perplexity

def _data_files(args) -> list[str]:
    from v4jax import data

    try:
        return data.expand_paths(tuple(args.data))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {str(e).replace('DataConfig.paths', '--data')}")


def _documents(args, files, tok, bos):
    """(token arrays, UTF-8 byte counts or None) of the --data files."""
    from v4jax import data

    fmt = args.format
    docs, nbytes = [], []
    for f in files:
        kind = fmt or ("jsonl" if f.endswith((".jsonl", ".json")) else "tokens" if f.endswith(".npy") else "text")
        try:
            if kind == "tokens":
                a = np.load(f, allow_pickle=False)
                if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                    raise ValueError(f"{f}: expected a 1-D integer array of token ids, found {a.dtype}{list(a.shape)}")
                docs.append(a.astype(np.int32))
                nbytes = None
                continue
            texts = [data.read_text(f)] if kind == "text" else data.read_jsonl(f, args.text_field)
        except ValueError as e:
            raise SystemExit(f"error: {str(e).replace('(DataConfig.text_field)', '(--text-field)')}")
        for t in texts:
            head = [bos] if bos is not None and not args.no_bos else []
            docs.append(np.asarray(head + tok.encode(t, add_special_tokens=False).ids, np.int32))
            if nbytes is not None:
                nbytes.append(len(t.encode("utf-8")))
    if args.max_docs is not None:
        docs = docs[:args.max_docs]
        nbytes = nbytes[:args.max_docs] if nbytes is not None else None
    return docs, nbytes


def cmd_perplexity(args):
    from v4jax.evaluate import Scorer, perplexity

    files = _data_files(args)
    model = _load_model(args)
    tok, bos, _ = _tokenizer(args, model.cfg)
    docs, nbytes = _documents(args, files, tok, bos)
    V = model.cfg.vocab_size
    for i, d in enumerate(docs):
        if d.size and (d.min() < 0 or d.max() >= V):
            raise SystemExit(f"error: document {i} has token ids in [{d.min()}, {d.max()}], the vocabulary is [0, {V})")
    scorer = Scorer(_engine(args, model, args.seq_len))
    try:
        r = perplexity(scorer, docs, nbytes, seq_len=args.seq_len, stride=args.stride, batch=args.batch,
                       progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "n/a (pre-tokenised input)"
    print(f"| documents | scored tokens | bytes | nats/token | perplexity | bits/byte |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {r.documents} | {r.tokens} | {r.bytes if r.bytes is not None else 'n/a'} | "
          f"{r.nats_per_token:.4f} | {r.perplexity:.3f} | {bpb} |")
    print(f"(windows of {args.seq_len} tokens, stride {args.stride or args.seq_len}; mode {args.mode})")
    if args.json:
        _write_json(args.json, r.__dict__)


# ------------------------------------------------------------------------------------------- bench / needle

def cmd_bench(args):
    from v4jax.evaluate import bench, bench_table

    model = _load_model(args)
    engine = _engine(args, model, args.prompt_len + args.decode_steps + 1)
    try:
        r = bench(engine, batch=args.batch, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                  iters=args.iters, context=args.context, seed=args.seed, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(bench_table(r))
    print(f"(mode {args.mode}, layout {args.layout}, kv cache {args.kv_cache}; latencies are medians after a "
          "compiling first call)")
    if args.json:
        _write_json(args.json, r)


def _floats(text, name, cast=float):
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {name} must be a comma-separated list, got {text!r}")


def cmd_needle(args):
    from v4jax.evaluate import needle, needle_table

    lengths, depths = _floats(args.lengths, "--lengths", int), _floats(args.depths, "--depths")
    if not lengths or not depths or any(not 0 <= d <= 1 for d in depths):
        raise SystemExit("error: need --lengths and --depths (each depth in [0, 1])")
    if args.digits > 18:
        raise SystemExit(f"error: --digits: at most 18, got {args.digits}")
    model = _load_model(args)
    tok, bos, stops = _tokenizer(args, model.cfg)
    engine = _engine(args, model, max(lengths) + args.digits + 8)
    try:
        r = needle(engine, tok, lengths=lengths, depths=depths, trials=args.trials, batch=args.batch,
                   digits=args.digits, seed=args.seed, bos=bos, chat=args.chat, stop_ids=stops,
                   progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(needle_table(r))
    if args.json:
        _write_json(args.json, {"lengths": r.lengths, "depths": r.depths, "accuracy": r.accuracy.tolist(),
                                "samples": r.samples})


# ------------------------------------------------------------------------------------------- qat-ties

def _reference(path, vocab: int) -> dict:
    """A reference .npz as ``eval.py logits`` writes it -> {tokens, prefill_logits[, mtp_logits]}."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --reference file not found: {p}")
    try:
        with np.load(p) as z:
            ref = {k: z[k] for k in ("tokens", "prefill_logits", "mtp_logits") if k in z.files}
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --reference {p} is not an .npz file ({e})")
    for k in ("tokens", "prefill_logits"):
        if k not in ref:
            raise SystemExit(f"error: --reference {p} has no {k!r} array (eval.py logits writes tokens, "
                             f"prefill_logits, mtp_logits)")
    t, lg = ref["tokens"], ref["prefill_logits"]
    if lg.ndim != 3 or lg.shape[-1] != vocab or t.ndim != 2 or t.shape[0] != lg.shape[0]:
        raise SystemExit(f"error: --reference: prefill_logits {list(lg.shape)} and tokens {list(t.shape)} do "
                         f"not fit the model: want [B, S, {vocab}] and [B, >=S+1]")
    if not np.issubdtype(t.dtype, np.integer) or (t.size and (t.min() < 0 or t.max() >= vocab)):
        raise SystemExit(f"error: --reference: tokens must be integer ids in [0, {vocab}), got {t.dtype} "
                         f"in [{t.min()}, {t.max()}]")
    if t.shape[1] < lg.shape[1] + ("mtp_logits" in ref):
        raise SystemExit(f"error: --reference: tokens has {t.shape[1]} columns, the prefill {lg.shape[1]} "
                         f"needs {lg.shape[1] + 1}")
    if "mtp_logits" in ref and ref["mtp_logits"].shape != lg.shape:
        raise SystemExit(f"error: --reference: mtp_logits {list(ref['mtp_logits'].shape)} != prefill_logits "
                         f"{list(lg.shape)}")
    return ref


def _agreement(name, got, ref) -> str:
    from v4jax.qat_ties import rel_errors

    e = rel_errors(got, ref)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return f"{name}: median={np.median(e):.3e} max={e.max():.3e} argmax_agree={agree:.4f}"


def cmd_qat_ties(args):
    from v4jax import qat_ties

    model = _load_model(args)
    ref = _reference(args.reference, model.cfg.vocab_size)
    ref_mtp = ref.get("mtp_logits") if len(model.mtp) else None
    if "mtp_logits" in ref and ref_mtp is None:
        print("note: the model has no MTP block; mtp_logits is not compared")
    keys = ["prefill_logits"] + (["mtp_logits"] if ref_mtp is not None else [])
    B, S = ref["prefill_logits"].shape[:2]
    print(f"reference {args.reference}: {B} rows x {S} positions ({', '.join(keys)})")

    shown = []

    def report(first, ties, prefill, mtp):
        if not shown:  # the first call: the logits as computed
            shown.append(True)
            for k, got in zip(keys, (prefill, mtp)):
                print("as computed, " + _agreement(k, got, ref[k]))
        if not args.quiet:
            print(f"first disagreement (> {args.tol:g}) per row: {first} after {len(ties)} near-ties")

    try:
        ties, prefill, mtp = qat_ties.resolve(model, ref["tokens"], ref["prefill_logits"], ref_mtp,
                                              delta=args.delta, tol=args.tol, max_ties=args.max_ties,
                                              report=report)
    except qat_ties.Unexplained as e:
        raise SystemExit(f"error: not explained by rounding near-ties: {e}")
    print(f"{len(ties)} near-ties rounded the reference's way:")
    for t in sorted(ties, key=lambda t: (t.b, t.pos)):
        print(f"  row {t.b} position {t.pos}: {t.grid} {t.value:.8g} -> {t.rounded:g} "
              f"({t.distance:.1e} from the midpoint, {len(t.calls)} quantiser input(s))")
    for k, got in zip(keys, (prefill, mtp)):
        print("with them, " + _agreement(k, got, ref[k]))
    if args.out:
        _write_npz(args.out, tokens=ref["tokens"], **dict(zip(keys, (prefill, mtp))))
        print(f"wrote {args.out}")


def _impl_flags(p, layout_default="float"):
    p.add_argument("--layout", choices=["float", "released"], default=layout_default,
                   help="float: dequantise weights; released: keep FP8/FP4 and dequantise on use")
    p.add_argument("--attention-impl", choices=["xla", "pallas"], default=None,
                   help="attention math: plain-JAX reference or Pallas kernels (default: the config's)")
    p.add_argument("--moe-impl", choices=["xla", "pallas"], default=None,
                   help="routed experts: ragged_dot or the Pallas grouped matmul (default: the config's)")


def _model_flags(p, *, layout_default="float"):
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="checkpoint directory: HF (config.json + safetensors), orbax form or a train.py run")
    src.add_argument("--config", help="YAML preset: random-initialised model (e.g. configs/tiny.yaml)")
    p.add_argument("--mode", choices=["exact", "qat", "production"], default="exact", help="numerics (SPEC §5)")
    _impl_flags(p, layout_default)
    p.add_argument("--kv-cache", choices=["auto", "fp8"], default="auto", help=KV_CACHE_HELP)
    p.add_argument("--prefill-chunk", type=POSITIVE, default=None, metavar="N", help=PREFILL_CHUNK_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed for random init / sampling / keys")
    p.add_argument("--mesh", default=None, help=MESH_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_commands(sub):
    p = sub.add_parser("generate", help="generate text from prompt(s)")
    _model_flags(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="text file, one prompt per line (added to --prompt)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's; --config: the tiny one)")
    p.add_argument("--system", help="system prompt (chat mode)")
    p.add_argument("--history", help="JSON list of earlier messages [{role, content}] before the prompt")
    p.add_argument("--thinking", action="store_true", help="thinking mode: open <think> after the assistant tag")
    p.add_argument("--raw", action="store_true", help="no chat template: BOS + the prompt text")
    p.add_argument("--no-bos", action="store_true", help="with --raw: do not prepend BOS")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="generated tokens per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=COUNT, default=0,
                   help="sample among the k most likely tokens, then the nucleus of those (default 0 = off)")
    p.add_argument("--max-len", type=POSITIVE, default=None, help="cache length (default: longest prompt + new tokens)")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of streaming")
    p.add_argument("--json", help="also write prompts, completions and token ids to this JSON file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="nats/token and bits/byte over text / JSONL / token files")
    _model_flags(p)
    p.add_argument("--data", nargs="+", required=True, help="files or globs")
    p.add_argument("--format", choices=["text", "jsonl", "tokens"], default=None,
                   help="text: one document per file; jsonl: one per line (--text-field); tokens: 1-D .npy "
                        "(default: by extension)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's; --config: the tiny one)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to text documents")
    p.add_argument("--seq-len", type=POSITIVE, default=512, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=POSITIVE, default=None,
                   help="new targets per window; < seq-len re-reads seq-len - stride tokens as context "
                        "(default seq-len: disjoint windows)")
    p.add_argument("--batch", type=POSITIVE, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-docs", type=POSITIVE, default=None, help="score only the first N documents")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="prefill / decode throughput and latency, memory, KV-cache size")
    _model_flags(p)
    p.add_argument("--batch", type=POSITIVE, default=1, help="rows (default 1)")
    p.add_argument("--prompt-len", type=POSITIVE, default=128, help="prefill length (default 128)")
    p.add_argument("--decode-steps", type=POSITIVE, default=32, help="timed decode steps (default 32)")
    p.add_argument("--iters", type=POSITIVE, default=3, help="timed prefills (default 3)")
    p.add_argument("--context", type=POSITIVE, default=None,
                   help="context length for the KV-cache figure (default prompt-len + decode-steps)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("needle", help="pass-key retrieval accuracy (depth x context length)")
    _model_flags(p)
    p.add_argument("--lengths", default="256,1024,4096", help="context lengths in tokens (default 256,1024,4096)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default 0,.25,.5,.75,1)")
    p.add_argument("--trials", type=POSITIVE, default=2, help="random keys per cell (default 2)")
    p.add_argument("--batch", type=POSITIVE, default=4, help="prompts per generation batch (default 4)")
    p.add_argument("--digits", type=POSITIVE, default=5, help="digits of the pass key (default 5)")
    p.add_argument("--chat", action="store_true", help="wrap the context in the chat encoding (non-thinking)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's; --config: the tiny one)")
    p.add_argument("--json", help="also write the table and every answer to this JSON file")
    p.set_defaults(func=cmd_needle)

    p = sub.add_parser("qat-ties", help="explain a qat disagreement with a reference by rounding near-ties",
                       description="Runs the qat prefill (and MTP) forward on the reference's tokens. At each "
                       "row's first position that disagrees with the reference it rounds a value within "
                       "--delta of an FP8 / FP4 rounding midpoint the other way (two float32 implementations "
                       "round such values differently), until every position agrees within --tol. Fails "
                       "(exit 1) when a disagreement has no such value: then it is not a rounding near-tie.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory: HF, orbax form or a train.py run")
    p.add_argument("--reference", required=True,
                   help=".npz with tokens, prefill_logits and mtp_logits, as eval.py logits --mode qat writes them")
    _impl_flags(p)
    p.add_argument("--delta", type=float, default=1e-5,
                   help="largest relative distance from a rounding midpoint counted as a near-tie (default 1e-5)")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="relative L2 error per position counted as agreement (default 1e-5)")
    p.add_argument("--max-ties", type=POSITIVE, default=40, help="give up after this many near-ties (default 40)")
    p.add_argument("--out", help="also write the logits with the near-ties rounded the reference's way")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_qat_ties, config=None, mode="qat", kv_cache="auto", seed=0, mesh=None)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("logits", help="dump prefill / decode / MTP logits to an .npz")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="checkpoint directory: HF (config.json + safetensors), orbax form or a train.py run")
    src.add_argument("--config", help="YAML preset: random-initialised model (e.g. configs/tiny.yaml)")
    p.add_argument("--tokens", help="int .npy [B, T], T >= N+M (and >= N+1 with an MTP block); default: random "
                                    "tokens (--batch, --seed)")
    p.add_argument("--prefill", type=POSITIVE, required=True, help="N: prefill length")
    p.add_argument("--decode", type=COUNT, default=0, help="M: decode steps after the prefill (default 0)")
    p.add_argument("--mode", choices=["exact", "qat", "production"], default="exact", help="numerics (SPEC §5)")
    _impl_flags(p)
    p.add_argument("--kv-cache", choices=["auto", "fp8"], default="auto", help=KV_CACHE_HELP)
    p.add_argument("--prefill-chunk", type=POSITIVE, default=None, metavar="N", help=PREFILL_CHUNK_HELP)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--batch", type=POSITIVE, default=2, help="rows of random tokens when --tokens is not given")
    p.add_argument("--seed", type=int, default=0, help="seed for random tokens / random init")
    p.add_argument("--mesh", default=None, help=MESH_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_logits)
    _add_commands(sub)

    args = ap.parse_args(argv)
    from v4jax.config import ConfigError
    from v4jax.hf.convert import ignore_closed_loop_callbacks
    from v4jax.hf.safetensors import CheckpointError
    ignore_closed_loop_callbacks()
    try:
        args.device_mesh = _device_mesh(args.mesh)
        with contextlib.ExitStack() as args.exit_stack:
            args.func(args)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
