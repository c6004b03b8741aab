"""Benchmark the training loss's head (``train_step.chunked_cross_entropy``) per ``train.head_precision``.

Shape: configs/small.yaml's head (vocabulary 129280, hidden 1024) on one training step's tokens
(global batch 8 x 4096), bf16 head inputs, fp32 head weight, as ``compute_loss`` calls it. Rows:
``fp32`` (the SPEC's head; on a GPU fp32 arithmetic without tensor cores) and the bf16 tensor-core
algorithms. Columns: median time of the loss and of loss + gradients (u and the head), TFLOP/s
of the forward+backward (8·T·V·D: the forward twice, as the chunks are recomputed, and two
backward matmuls), and the error against ``fp32`` of the loss and of each gradient (relative L2).

Usage:  python benchmarks/head.py            # on a GPU
        python benchmarks/head.py --smoke    # tiny shapes, any CPU (XLA:CPU computes every row in fp32)
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import _try  # noqa: E402

from v4jax.train_step import HEAD_PRECISION, chunked_cross_entropy  # noqa: E402


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, smoke 2)")
    args = ap.parse_args()
    B, S, V, D = (2, 64, 1000, 64) if args.smoke else (8, 4096, 129280, 1024)
    reps = args.reps or (2 if args.smoke else 10)

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    u = jax.random.normal(k1, (B, S, D), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(k2, (V, D), jnp.float32) * D ** -0.5
    targets = jax.random.randint(k3, (B, S), 0, V)
    flops = 8 * B * S * V * D
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"tokens {B}x{S}, vocab {V}, hidden {D}")
    if args.smoke:
        print("smoke run: tiny shapes; on a CPU every algorithm computes in fp32")
    print(f"{'precision':10} {'loss ms':>9} {'loss+grad ms':>13} {'TFLOP/s':>8} {'loss err':>9} "
          f"{'du err':>9} {'dw err':>9}")
    base = None
    for name in HEAD_PRECISION:
        loss = jax.jit(lambda u, w, name=name: chunked_cross_entropy(u, w, targets, precision=name))
        both = jax.jit(jax.value_and_grad(lambda u, w, name=name: chunked_cross_entropy(u, w, targets,
                                                                                     precision=name),
                                          argnums=(0, 1)))
        t_f, e1 = _try(loss, u, w, reps=reps)
        t_a, e2 = _try(both, u, w, reps=reps)
        err = e1 or e2
        if err:
            print(f"{name:10} {err}")
            continue
        val, (du, dw) = both(u, w)
        if base is None:
            base = (val, du, dw)
        errs = (_rel(val, base[0]), _rel(du.astype(jnp.float32), base[1].astype(jnp.float32)), _rel(dw, base[2]))
        print(f"{name:10} {t_f * 1e3:9.3f} {t_a * 1e3:13.3f} {flops / t_a / 1e12:8.1f} "
              + " ".join(f"{e:9.1e}" for e in errs))


if __name__ == "__main__":
    main()
