"""Load a released-layout checkpoint (HF safetensors + ``config.json``) into a ``Transformer``.

    model = load_model("path/to/DeepSeek-V4-Flash", mode="exact")            # dequantised fp32
    model = load_model(path, mode="production", layout="released")         # FP8 / FP4 kept, served as is

The checkpoint is validated against the tensor set the spec gives for its config before anything is
loaded (missing, unexpected, wrong dtype, wrong shape: every problem named). Tensors are read one at
a time from memory maps and moved to the device as they are converted.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax import quant
from v4jax.config import ModelConfig, from_hf_config
from v4jax.hf.names import expected_tensors, expert_stack, path_to_name, tensor_names
from v4jax.hf.safetensors import CheckpointError, SafetensorsReader
from v4jax.model.layers import WeightLayout
from v4jax.model.transformer import Transformer

_MAX_LISTED = 20


def validate(reader: SafetensorsReader, cfg: ModelConfig) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected, mistyped or misshapen tensor (and
    hash-routing tables naming experts that do not exist)."""
    expected = expected_tensors(cfg)
    problems = []
    for name, (dtype, shape) in expected.items():
        if name not in reader:
            problems.append(f"missing tensor {name!r} ({dtype}{list(shape)})")
            continue
        info = reader.info(name)
        if info.dtype != dtype:
            problems.append(f"tensor {name!r} has dtype {info.dtype}, expected {dtype}")
        if tuple(info.shape) != tuple(shape):
            problems.append(f"tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        elif name.endswith(".tid2eid") and info.dtype == dtype:
            ids = reader[name]
            if ids.size and (ids.min() < 0 or ids.max() >= cfg.n_routed_experts):
                problems.append(f"tensor {name!r} has expert ids in [{ids.min()}, {ids.max()}], outside "
                                f"[0, {cfg.n_routed_experts})")
    for name in sorted(set(reader.keys()) - set(expected)):
        problems.append(f"unexpected tensor {name!r} ({reader.info(name).dtype}{list(reader.info(name).shape)})")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"checkpoint at {reader.path} does not match its config.json "
                              f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)


def read_leaf(reader: SafetensorsReader, name: str, target, n_experts: int) -> np.ndarray:
    """Build one model leaf (abstract ``target`` with shape / dtype) from its checkpoint tensor(s).

    A stack of experts is filled expert by expert, so host memory holds the leaf plus one expert."""
    tdtype = np.dtype(target.dtype)
    names = tensor_names(name, n_experts)
    out = None
    for i, tname in enumerate(names):
        a = reader[tname]
        if tname.endswith(".weight") and a.dtype != tdtype and tname[:-7] + ".scale" in reader:
            scale = reader[tname[:-7] + ".scale"]
            if reader.info(tname).dtype == "I8":
                a = quant.dequant_fp4(a, scale, np.float32)
            else:
                a = quant.dequant_fp8(a, scale, np.float32)
        if expert_stack(name) is None:
            out = np.array(a, dtype=tdtype)  # a copy: never a view of the memory map
            break
        if out is None:
            out = np.empty((len(names), *a.shape), tdtype)
        out[i] = a
    if out.shape != tuple(target.shape):
        if out.size == int(np.prod(target.shape)) and name.endswith("wo_a.weight"):
            out = out.reshape(target.shape)  # float layout: [G*r, in] -> [G, r, in]
        else:
            raise CheckpointError(f"tensor {name!r}: checkpoint gives shape {list(out.shape)}, the model "
                                  f"expects {list(target.shape)}")
    return out


def load_params(model: Transformer, path: str | os.PathLike, *, progress: bool = True, mesh=None) -> None:
    """Fill ``model`` (built for the checkpoint's config, possibly abstract) in place from ``path``;
    with ``mesh``, each tensor goes straight to its shards (``sharding.placer``)."""
    cfg = model.cfg
    with SafetensorsReader(path) as reader:
        validate(reader, cfg)
        fill_leaves(model, lambda name, t: read_leaf(reader, name, t, cfg.n_routed_experts), mesh=mesh,
                    progress=progress)


def fill_leaves(model, read, *, mesh=None, progress: bool = True) -> None:
    """Set ``model``'s leaves (possibly abstract) to ``read(name, abstract leaf) -> host array``, in order,
    each placed on the default device or, with ``mesh``, on its shards (``sharding.placer``) as soon as
    it is read, so host memory holds one leaf at a time."""
    from v4jax.sharding import placer

    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    place = placer(model, mesh)
    new = {}
    for kp, t in tqdm(jax.tree_util.tree_leaves_with_path(pure), desc="loading", unit="leaf", disable=not progress):
        name = path_to_name(tuple(k.key for k in kp))
        new[name] = place(kp, read(name, t))
    pure = jax.tree_util.tree_map_with_path(lambda kp, _: new[path_to_name(tuple(k.key for k in kp))], pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def load_model(path: str | os.PathLike, *, mode: str = "exact", layout: str = "float",
               dtype=jnp.float32, attention_impl: str | None = None, moe_impl: str | None = None,
               progress: bool = True, mesh=None, kv_cache: str = "auto") -> Transformer:
    """Build a ``Transformer`` for the checkpoint at ``path`` and load its weights.

    ``layout="float"``: dequantise every weight to ``dtype``; ``layout="released"``: keep the release's
    FP8 / FP4 / BF16 tensors and dequantise on use. ``attention_impl`` / ``moe_impl`` override the
    config's ``xla`` / ``pallas`` choice. ``mesh``: split the weights over this device mesh (run the
    model under ``jax.set_mesh(mesh)``: routed experts then run expert-parallel). ``kv_cache``: the
    decoding cache's format (``Numerics.kv_cache``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    overrides = {k: v for k, v in (("attention_impl", attention_impl), ("moe_impl", moe_impl)) if v is not None}
    cfg = from_hf_config(path, **overrides)
    if layout == "float":
        wl = WeightLayout.float(dtype)
    elif layout == "released":
        wl = WeightLayout.released(cfg)
    else:
        raise ValueError(f"layout must be 'float' or 'released', got {layout!r}")
    model = nnx.eval_shape(lambda: Transformer(cfg, mode=mode, layout=wl, rngs=nnx.Rngs(0), kv_cache=kv_cache))
    load_params(model, path, progress=progress, mesh=mesh)
    return model
