#!/usr/bin/env python3
"""Train a DeepSeek-V4 model.

  python train.py --config configs/tiny.yaml --workdir runs/tiny [dotted.key=value ...]

Overrides address the config's sections: model.*, train.* (steps, log_every, mode, loss weights),
data.*, optimizer.*, mesh.* (data, fsdp, expert, tensor), checkpoint.* (every, keep, async_save).
Re-running with the same workdir resumes from its newest checkpoint. SIGTERM / Ctrl-C save a
checkpoint and exit with status 128 + the signal number (143 / 130; a finished run: 0).

  python train.py --config configs/small.yaml --compile-only v5p:2x2x1 [dotted.key=value ...]

compiles the training step for a TPU slice ahead of time on any machine with libtpu (pip install
'jax[tpu]'; no TPU, no data) and prints its memory per device: whether a config and mesh fit.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (e.g. configs/tiny.yaml)")
    ap.add_argument("--workdir", help="run directory: checkpoints, metrics.jsonl, tb/ (required unless --compile-only)")
    ap.add_argument("--compile-only", metavar="TOPOLOGY",
                    help="compile the training step for this TPU slice (e.g. v5p:2x2x1, v6e:4x4) and print its memory "
                         "per device instead of training; needs libtpu, not a TPU")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)  # overrides before and after the flags
    if not args.workdir and not args.compile_only:
        ap.error("--workdir is required (unless --compile-only)")

    from v4jax.config import ConfigError, load_config
    from v4jax.hf.convert import ignore_closed_loop_callbacks
    from v4jax.hf.safetensors import CheckpointError
    from v4jax.trainer import TrainingStopped, compile_for_tpu, train

    ignore_closed_loop_callbacks()

    try:
        cfg = load_config(args.config, args.overrides)
        if args.compile_only:
            r = compile_for_tpu(cfg, args.compile_only)
            mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
            print(f"compiled the training step for {r['topology']} ({r['devices']} x {r['device_kind']}, mesh {mesh}) "
                  f"in {r['compile_s']:.1f} s\nper device: {r['step_memory_gib']:.2f} GiB (parameters, optimizer "
                  f"state and batch {r['arguments_gib']:.2f} GiB, temporaries {r['temporaries_gib']:.2f} GiB)")
            return 0
        metrics = train(cfg, args.workdir, progress=not args.quiet)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    except TrainingStopped as e:  # a scheduler tells a stopped run (128 + signal) from a finished one (0)
        print(e)
        return 128 + e.signum
    if metrics:
        m = metrics[-1]
        print(f"step {m['step']}: loss {m['loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s -> {args.workdir}")


if __name__ == "__main__":
    sys.exit(main())
