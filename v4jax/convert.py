"""Checkpoint conversion CLI (the logic lives in ``v4jax.hf.convert``; see docs/conversion.md).

  python -m v4jax.convert hf-to-orbax --hf DIR --out DIR [--dtype bfloat16|float32] [--part-size 2GB] [--force]
  python -m v4jax.convert orbax-to-hf --orbax DIR --out DIR [--shard-size 5GB] [--force]

``hf-to-orbax`` without ``--dtype`` keeps the released tensors as they are (byte-exact round trip);
with it, weights are dequantised to that dtype (the ``float`` layout, for training). ``orbax-to-hf``
accepts the orbax form or a ``train.py`` checkpoint (workdir, its ``checkpoints`` dir or a step dir)
and quantises float weights back to the release's FP8 / FP4 formats.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m v4jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hf-to-orbax", help="released HF safetensors -> orbax form")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors + index)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="write the float layout (dequantised) in this dtype; default: the released layout")
    p.add_argument("--part-size", default="2GB",
                   help="bytes per orbax checkpoint under params/, e.g. 2GB (default), 500MB: host memory holds "
                        "one part plus the leaf being converted")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("orbax-to-hf", help="orbax form or train.py checkpoint -> released HF safetensors")
    p.add_argument("--orbax", required=True, help="orbax-form directory, or a train.py workdir / checkpoints "
                                                  "dir / step dir")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from v4jax.config import ConfigError
    from v4jax.hf import convert
    from v4jax.hf.safetensors import CheckpointError

    convert.ignore_closed_loop_callbacks()
    t0 = time.time()
    try:
        if args.cmd == "hf-to-orbax":
            out = convert.hf_to_orbax(args.hf, args.out, dtype=args.dtype, force=args.force,
                                      progress=not args.quiet, part_size=args.part_size)
        else:
            out = convert.orbax_to_hf(args.orbax, args.out, shard_size=args.shard_size, force=args.force,
                                      progress=not args.quiet)
    except (ConfigError, CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}")
    except ValueError as e:  # orbax / tensorstore: an unreadable or corrupted stored array
        raise SystemExit(f"error: cannot read {args.hf if args.cmd == 'hf-to-orbax' else args.orbax}: {e}")
    print(f"wrote {out} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
