#!/usr/bin/env python3
"""v4jax evaluation CLI. Subcommands:

  logits   dump prefill / decode / MTP logits of a checkpoint (or a random model from a preset)

Run ``python eval.py SUBCOMMAND --help`` for the flags of each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def _load_model(args):
    """The model named by --checkpoint (HF layout) or --config (random init from a YAML preset)."""
    from flax import nnx

    from v4jax.config import load_model_config
    from v4jax.hf.checkpoint import load_model
    from v4jax.model.transformer import Transformer

    if (args.checkpoint is None) == (args.config is None):
        raise SystemExit("error: give exactly one of --checkpoint DIR or --config PRESET.yaml")
    if args.checkpoint is not None:
        return load_model(args.checkpoint, mode=args.mode, layout=args.layout, attention_impl=args.attention_impl,
                          progress=not args.quiet)
    overrides = [] if args.attention_impl is None else [f"model.attention_impl={args.attention_impl}"]
    cfg = load_model_config(args.config, overrides)
    return Transformer(cfg, mode=args.mode, rngs=nnx.Rngs(args.seed))


def _tokens(args, vocab: int) -> np.ndarray:
    need = args.prefill + max(args.decode, 1)
    if args.tokens is None:
        rng = np.random.default_rng(args.seed)
        return rng.integers(0, vocab, size=(args.batch, need + 1), dtype=np.int32)
    p = Path(args.tokens)
    if not p.is_file():
        raise SystemExit(f"error: --tokens file not found: {p}")
    try:
        t = np.load(p)
    except ValueError as e:
        raise SystemExit(f"error: --tokens {p} is not a .npy array ({e})")
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise SystemExit(f"error: --tokens must be an integer array [B, T], got {t.dtype}{list(t.shape)}")
    if t.size and (t.min() < 0 or t.max() >= vocab):
        raise SystemExit(f"error: --tokens has ids in [{t.min()}, {t.max()}], the vocabulary is [0, {vocab})")
    return t.astype(np.int32)


def cmd_logits(args):
    from v4jax.generate import Engine, dump_logits

    t0 = time.time()
    model = _load_model(args)
    tokens = _tokens(args, model.cfg.vocab_size)
    print(f"model: {model.cfg.num_hidden_layers} layers, hidden {model.cfg.hidden_size}, "
          f"ratios {list(model.cfg.compress_ratios)}, mode {args.mode} ({time.time() - t0:.1f}s to load)")
    engine = Engine(model, max_len=args.prefill + args.decode)
    try:
        out = dump_logits(engine, tokens, args.prefill, args.decode, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.npz")
    np.savez(tmp, tokens=tokens, **out)
    os.replace(tmp, out_path)
    for k, v in out.items():
        print(f"{k}: {list(v.shape)} float32")
    print(f"wrote {out_path} ({time.time() - t0:.1f}s)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("logits", help="dump prefill / decode / MTP logits to an .npz")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="released-layout checkpoint directory (config.json + safetensors)")
    src.add_argument("--config", help="YAML preset: random-initialised model (e.g. configs/tiny.yaml)")
    p.add_argument("--tokens", help="int .npy [B, >=N+M+1]; default: random tokens (--batch, --seed)")
    p.add_argument("--prefill", type=int, required=True, help="N: prefill length")
    p.add_argument("--decode", type=int, default=0, help="M: decode steps after the prefill (default 0)")
    p.add_argument("--mode", choices=["exact", "qat", "production"], default="exact", help="numerics (SPEC §5)")
    p.add_argument("--layout", choices=["float", "released"], default="float",
                   help="float: dequantise weights to fp32; released: keep FP8/FP4 and dequantise on use")
    p.add_argument("--attention-impl", choices=["xla", "pallas"], default=None,
                   help="attention math: plain-JAX reference or Pallas kernels (default: the config's)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--batch", type=int, default=2, help="rows of random tokens when --tokens is not given")
    p.add_argument("--seed", type=int, default=0, help="seed for random tokens / random init")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_logits)

    args = ap.parse_args(argv)
    from v4jax.config import ConfigError
    from v4jax.hf.safetensors import CheckpointError
    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
