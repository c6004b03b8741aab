#!/usr/bin/env python3
"""Train a DeepSeek-V4 model.

  python train.py --config configs/tiny.yaml --workdir runs/tiny [dotted.key=value ...]

Overrides address the config's sections: model.*, train.* (steps, log_every, mode, loss weights),
data.*, optimizer.*, mesh.* (data, fsdp, expert, tensor), checkpoint.* (every, keep, async_save).
Re-running with the same workdir resumes from its newest checkpoint. SIGTERM / Ctrl-C save a
checkpoint and exit.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (e.g. configs/tiny.yaml)")
    ap.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tb/")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    args = ap.parse_args(argv)

    from v4jax.config import ConfigError, load_config
    from v4jax.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, args.workdir, progress=not args.quiet)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if metrics:
        m = metrics[-1]
        print(f"step {m['step']}: loss {m['loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s -> {args.workdir}")


if __name__ == "__main__":
    sys.exit(main())
