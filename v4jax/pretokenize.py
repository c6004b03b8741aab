"""Tokenise a text / JSONL corpus once, into memory-mapped shards that ``data.source=tokens`` reads.

  python -m v4jax.pretokenize --format jsonl --tokenizer tokenizer.json --out DIR 'corpus/*.jsonl'

A run with ``data.source=text|jsonl`` tokenises its whole corpus in every process at start-up; the
shards make that a memory map. ``DIR/tokens-NNNNN.npy`` holds the int32 tokens of whole documents
(``[bos] + ids + [eos]``, exactly as the text sources encode them, ``data.document_encoder``) and
``DIR/tokens-NNNNN.doc_lengths`` their lengths, so ``data.source=tokens data.paths=[DIR/*.npy]`` gives
the same documents in the same order, and with the same ``seq_len`` / ``seed`` / ``global_batch`` the
same batches as the text source. Input is read in a stream (a tokenizer call takes at most 1024
documents or about 4 MiB of text); a shard is written when it holds ``--shard-tokens`` tokens. The
output appears only when complete (it is written beside ``--out`` and renamed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from v4jax.data import (DOC_LENGTHS, DataConfig, document_encoder, expand_paths, iter_jsonl, read_text,
                         text_batches)


def pretokenize(cfg: DataConfig, out_dir, *, shard_tokens: int = 1 << 28, force: bool = False,
                progress: bool = True) -> list[Path]:
    """Write ``cfg``'s text / JSONL documents (``source``, ``paths``, ``text_field``, ``tokenizer``,
    ``bos_id``, ``eos_id``, ``add_bos``) as token shards in ``out_dir``; returns the shard paths."""
    from v4jax.hf.convert import staging_dir  # the same atomic-output rules as checkpoint conversion

    if cfg.source not in ("text", "jsonl"):
        raise ValueError(f"pretokenize reads text or jsonl sources, got source={cfg.source!r}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    files = expand_paths(cfg.paths)
    encode = document_encoder(cfg)
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="tokenising",
               disable=not progress)
    names = []
    with staging_dir(Path(out_dir), force=force, sources=files) as tmp:
        pieces, n_tokens = [], 0

        def flush():
            nonlocal pieces, n_tokens
            name = f"tokens-{len(names):05d}"
            np.save(tmp / f"{name}.npy", np.concatenate(pieces))
            with open(tmp / f"{name}{DOC_LENGTHS}", "wb") as f:
                np.save(f, np.array([p.size for p in pieces], np.int64))
            names.append(name + ".npy")
            pieces, n_tokens = [], 0

        def add(texts):
            nonlocal n_tokens
            for p in encode(texts):
                pieces.append(p)
                n_tokens += p.size
                if n_tokens >= shard_tokens:
                    flush()

        for f in files:
            docs = [read_text(f)] if cfg.source == "text" else iter_jsonl(f, cfg.text_field)
            seen = 0
            for batch, size in text_batches(docs):
                add(batch)
                bar.update(size)  # <= their JSON lines' bytes
                seen += size
            bar.update(os.path.getsize(f) - seen)
        if pieces:
            flush()
        bar.close()
        if not names:
            raise ValueError(f"no documents in {list(cfg.paths)}")
    return [Path(out_dir) / n for n in names]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m v4jax.pretokenize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="files or globs (quote globs), read in the given order")
    ap.add_argument("--format", choices=["text", "jsonl"], required=True,
                    help="one document per file / per JSONL line")
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the shipped tiny tokenizer)")
    ap.add_argument("--bos-id", type=int, default=None, help="default: from the tokenizer")
    ap.add_argument("--eos-id", type=int, default=None, help="default: from the tokenizer")
    ap.add_argument("--add-bos", action="store_true", help="start every document with bos")
    ap.add_argument("--shard-tokens", type=int, default=1 << 28,
                    help="start a new shard after this many tokens (default 2^28: 1 GiB of int32)")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    t0 = time.time()
    try:
        cfg = DataConfig(source=args.format, paths=tuple(args.paths), text_field=args.text_field,
                         tokenizer=args.tokenizer, bos_id=args.bos_id, eos_id=args.eos_id, add_bos=args.add_bos)
        shards = pretokenize(cfg, args.out, shard_tokens=args.shard_tokens, force=args.force,
                             progress=not args.quiet)
    except (FileNotFoundError, ValueError) as e:  # named by the flags, not by DataConfig's fields
        raise SystemExit("error: " + str(e).replace("DataConfig.paths", "PATHS").replace(
            "DataConfig.text_field", "--text-field").replace("DataConfig.tokenizer", "--tokenizer"))
    tokens = sum(np.load(s, mmap_mode="r").size for s in shards)
    print(f"wrote {len(shards)} shard(s), {tokens} tokens, to {args.out} ({time.time() - t0:.1f}s); "
          f"train with data.source=tokens data.paths=[{args.out}/*.npy]")


if __name__ == "__main__":
    sys.exit(main())
