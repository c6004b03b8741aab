"""What one decoding step moves between devices on a mesh, with and without ``weights_in_place``.

Compiles ``Transformer.decode`` ahead of time for a TPU slice (libtpu describes it; no TPU needed) in the
released layout and counts the bytes each kind of collective produces per device in the compiled HLO
(``sharding.collective_bytes``), once as XLA's partitioner chooses by itself and once as
``Engine.decode`` traces it (inside ``sharding.weights_in_place``). These are compiled programs, not
timings: divide by the interconnect's bandwidth for a lower bound on the time they take.

Usage:  python benchmarks/decode_collectives.py [--config configs/v4_flash.yaml] [--layers 4]
            [--topology v5p:2x2x2] [--batch 8] [--mesh expert=8 fsdp=8 ...] [--layout released|float]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pallas_kernels  # noqa: E402
from v4jax.config import MeshConfig, load_config  # noqa: E402
from v4jax.model.layers import WeightLayout  # noqa: E402
from v4jax.model.transformer import Transformer  # noqa: E402
from v4jax.sharding import collective_bytes, make_mesh, param_shardings, weights_in_place  # noqa: E402
from v4jax.trainer import tpu_devices  # noqa: E402

MESHES = ["expert=8", "fsdp=8", "data=2,expert=4", "tensor=8", "data=2,tensor=4", "expert=4,tensor=2"]
KINDS = ["all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute"]


def step_collectives(cfg, layout: str, mesh, batch: int, max_len: int, *, in_place: bool) -> dict[str, int]:
    wl = WeightLayout.released(cfg) if layout == "released" else WeightLayout.float(jnp.bfloat16)
    model = nnx.eval_shape(lambda: Transformer(cfg, mode="production", layout=wl, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
        param_shardings(state, mesh)))
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))

    def decode(state, token, cache):
        if not in_place:
            return nnx.merge(graphdef, state).decode(token, cache)
        with weights_in_place():
            return nnx.merge(graphdef, state).decode(token, cache)

    with pallas_kernels.target_platform("tpu"), jax.set_mesh(mesh):
        compiled = jax.jit(decode).lower(state, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile()
    return collective_bytes(compiled.as_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/v4_flash.yaml")
    ap.add_argument("--layers", type=int, default=4,
                    help="the first decoder layers kept (default 4: window-only, CSA and HCA; compile time grows with them)")
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--layout", choices=["released", "float"], default="released")
    ap.add_argument("--mesh", nargs="+", default=MESHES, help="axis=size[,axis=size] per mesh")
    args = ap.parse_args(argv)

    base = load_config(args.config).model
    ratios = list(base.compress_ratios[:args.layers]) + [0] * base.num_nextn_predict_layers
    cfg = load_config(args.config, [f"model.num_hidden_layers={args.layers}",
                                    f"model.num_hash_layers={min(base.num_hash_layers, args.layers)}",
                                    f"model.compress_ratios={ratios}"]).model
    devices = tpu_devices(args.topology)
    print(f"{args.config}, {args.layers} layers, {args.layout} layout, batch {args.batch}, cache {args.max_len}, "
          f"compiled for {args.topology}: MiB per decoding step per device")
    print(f"| mesh | weights | {' | '.join(KINDS)} | total |")
    print("|---|---|" + "---|" * (len(KINDS) + 1))
    for spec in args.mesh:
        mesh = make_mesh(MeshConfig(**{k: int(v) for k, v in (a.split("=") for a in spec.split(","))}), devices)
        for in_place in (False, True):
            t = time.perf_counter()
            got = step_collectives(cfg, args.layout, mesh, args.batch, args.max_len, in_place=in_place)
            cells = " | ".join(f"{got.get(k, 0) / 2**20:.1f}" for k in KINDS)
            print(f"| {spec} | {'in place' if in_place else 'XLA free'} | {cells} | "
                  f"{sum(got.values()) / 2**20:.1f} |", flush=True)
            print(f"  (compiled in {time.perf_counter() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
