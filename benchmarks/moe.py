"""Benchmark the experts' grouped matmul (``pallas_kernels.grouped_matmul``) against ``jax.lax.ragged_dot``.

Shapes: V4-Flash routed experts (hidden 4096, expert width 2048, 256 experts, top-6) for the
up-projection ``w1``/``w3`` (``[T*6, 4096] x [256, 2048, 4096]``) and the down-projection ``w2``
(``[T*6, 2048] x [256, 4096, 2048]``), and configs/small.yaml's (hidden 1024, width 512, 64
experts, top-6); bfloat16, float32 output. Token-expert pairs are routed uniformly at random and
sorted by expert, as the model does. Rows: T tokens of a training / prefill step (forward and
backward) and decode batches (forward).

Columns: median time after warm-up, useful TFLOP/s (``2·rows·K·N`` forward, twice that backward),
the fraction of the compute floor and of the memory floor (x, the weights of the experts that
received rows and the output, each moved once; backward: also dx and dw) that the time achieves,
``ragged_dot``'s time (what ``moe_impl: xla`` runs) and the kernel's speed-up.
Backward = (forward+backward) - forward.

On a TPU the kernel is the TPU path (``ragged_dot`` forward, Pallas weight gradient); give the
chip's floors (v5p: ``--peak-tflops 459 --peak-tbps 2.76``) and ``--no-reference``: XLA's
``ragged_dot`` backward there is a dense product for every one of the 256 experts.

Usage:  python benchmarks/moe.py            # on a GPU (full table)
        python benchmarks/moe.py --smoke    # tiny shapes, Pallas interpret mode, any CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import H100_BF16_FLOPS, H100_HBM_BYTES, _row, _try  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402


def _case(T, K, N, E, topk, seed=0):
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(E, topk, replace=False) for _ in range(T)]).reshape(-1)
    sizes = jnp.asarray(np.bincount(experts, minlength=E), jnp.int32)
    M = T * topk
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, N, K), np.float32) * K ** -0.5, jnp.bfloat16)
    hit = int((np.asarray(sizes) > 0).sum())
    return (x, w, sizes), hit


def _fns(f):
    fwd = jax.jit(f)
    both = jax.jit(jax.grad(lambda x, w, s: jnp.sum(f(x, w, s)), argnums=(0, 1)))
    return fwd, both


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Pallas interpret mode (CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, smoke 2)")
    ap.add_argument("--no-reference", action="store_true", help="skip the ragged_dot timings")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_FLOPS / 1e12)
    ap.add_argument("--peak-tbps", type=float, default=H100_HBM_BYTES / 1e12)
    args = ap.parse_args()

    if args.smoke:
        shapes = [("tiny", "w1", 64, 32, 8, 2)]
        train, decode = [32], [1, 4]
        extra, reps = dict(interpret=True, backend="triton"), args.reps or 2
    else:
        shapes = [("flash", "w1", 4096, 2048, 256, 6), ("flash", "w2", 2048, 4096, 256, 6),
                  ("small", "w1", 1024, 512, 64, 6)]
        train, decode = [4096, 16384], [1, 8, 64]
        extra, reps = dict(), args.reps or 10
    peak_f, peak_b = args.peak_tflops * 1e12, args.peak_tbps * 1e12
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"bf16 in, f32 out; floors: {args.peak_tflops:.0f} TFLOP/s, {args.peak_tbps:.2f} TB/s")
    if args.smoke:
        print("smoke run: interpret mode on tiny shapes; times and floor fractions are meaningless")
    print(f"{'kind':6} {'shape':22} {'pass':4} {'kernel ms':>10} {'TFLOP/s':>8} {'%compute':>8} "
          f"{'%memory':>8} {'ragged ms':>10} {'speedup':>8}")
    kernel = lambda x, w, s: pk.grouped_matmul(x, w, s, **extra)
    for model, name, K, N, E, topk in shapes:
        k_fwd, k_all = _fns(kernel)
        r_fwd, r_all = _fns(ref.grouped_matmul)
        for T in train + decode:
            inputs, hit = _case(T, K, N, E, topk)
            M = T * topk
            flops = 2 * M * K * N
            nbytes = 2 * M * K + 2 * hit * N * K + 4 * M * N
            t_f, e1 = _try(k_fwd, *inputs, reps=reps)
            x_f, e2 = (None, "reference skipped") if args.no_reference else _try(r_fwd, *inputs, reps=reps)
            label = f"{model} {'T' if T in train else 'decode B'}={T}"
            _row(name, label, "fwd", t_f, x_f, flops, nbytes, peak_f, peak_b, e1 or e2)
            if T not in train:
                continue
            t_a, e3 = _try(k_all, *inputs, reps=reps)
            x_a, e4 = (None, "reference skipped") if args.no_reference else _try(r_all, *inputs, reps=reps)
            diff = lambda a, b: a - b if (a and b and a > b) else None
            _row(name, label, "bwd", diff(t_a, t_f), diff(x_a, x_f), 2 * flops,
                 2 * nbytes + 2 * hit * N * K, peak_f, peak_b, e3 or e4)


if __name__ == "__main__":
    main()
