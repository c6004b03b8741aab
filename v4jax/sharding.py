"""Device mesh and the logical-axis -> mesh-axis table (the one place model code meets a mesh).

Parameters carry logical axis names (``out_sharding`` metadata set by ``layers.param``); ``RULES``
maps each name to mesh axes; a dimension is split over those of them that divide it (none:
replicated). Batches are split over ``("data", "fsdp", "expert")`` (the expert axis is a data axis for
everything but the routed experts, see ``moe.Experts``).
"""
from __future__ import annotations

import contextlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from v4jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes, used in order as far as they divide the dimension. The model width (and
# the low ranks, in the matrices without it) also takes the expert axis, which is a data axis for all
# but the routed experts (ZeRO-style: else each dense parameter is copied on every expert-axis
# device); the experts' tensors name "experts" first, which keeps that axis.
RULES = {
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),   # wq_b / the indexer's wq_b, whose other dim (heads) takes tensor
    "o_lora": ("fsdp", "expert"),   # wo_a (likewise)
    # wo_a's groups over tensor: the attention output's heads, split over tensor, are whole groups there
    # (its heads dimension then stays whole); the released FP8 wo_a [G·r, in] splits its group-major rows
    "o_groups": ("tensor",),
    "o_group_rows": ("tensor", "fsdp", "expert"),
    "experts": ("expert",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "index_heads": ("tensor",),
    "vocab": ("tensor",),
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data×fsdp×expert×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)}, "
                          f"but there are {n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def spec_for(shape, logical, mesh: Mesh, rules: dict = RULES) -> P:
    """PartitionSpec of one array from its logical axis names (``rules``; a mesh axis of size 1, one an
    earlier dimension uses, or one whose size with the axes before it does not divide the dimension is
    left out; unnamed dimensions are replicated)."""
    out, used = [], set()
    for dim, name in zip(shape, logical or (None,) * len(shape)):
        axes, size = [], 1
        for a in rules.get(name, ()):
            if mesh.shape[a] > 1 and a not in used and dim % (size * mesh.shape[a]) == 0:
                axes.append(a)
                size *= mesh.shape[a]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


_WEIGHTS: list[str] = []  # set by ``gathered_weights`` ("gather") / ``weights_in_place`` ("in_place")


@contextlib.contextmanager
def gathered_weights():
    """While tracing under this context (the training step), ``for_compute`` gathers the dense weights
    where they are used: FSDP. Left free, XLA's partitioner may instead keep the weight where it lies
    and compute every sequence of the global batch on every device (V4-Flash on 256 TPU chips: a
    64 GiB ``[256, 4096, 32768]`` partial product, summed over all of them)."""
    _WEIGHTS.append("gather")
    try:
        yield
    finally:
        _WEIGHTS.pop()


@contextlib.contextmanager
def weights_in_place():
    """While tracing under this context (a decoding step: a few rows), ``for_compute`` keeps each weight
    split as it lies, so a device multiplies its part of the weight and the small partial products are
    summed across devices. Left free, XLA's partitioner gathers the weights instead: V4-Flash over
    ``expert=8`` moved every dense weight and the 1 GiB output head to every device at each token."""
    _WEIGHTS.append("in_place")
    try:
        yield
    finally:
        _WEIGHTS.pop()


def for_compute(x, param: nnx.Variable):
    """``x``, the value of the parameter ``param`` (or one computed from it, of the same shape), pinned to
    the sharding it is computed with under the current mesh: inside ``gathered_weights`` split over
    ``tensor`` only, gathered over the batch axes (data, fsdp, expert) that split it at rest (FSDP's
    all-gather before use; the backward pass sums the gradient back onto the shards); inside
    ``weights_in_place`` its sharding at rest. Otherwise, without a mesh, or inside ``shard_map``: ``x``
    as it is (XLA's partitioner chooses; for prefill's many rows it gathers the weights)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not _WEIGHTS or mesh.empty or mesh.manual_axes or not set(AXES) <= set(mesh.axis_names):
        return x
    logical = param.get_metadata().get("out_sharding")
    rules = _COMPUTE_RULES if _WEIGHTS[-1] == "gather" else RULES
    spec = spec_for(x.shape, logical, mesh, rules)
    if _WEIGHTS[-1] == "in_place" and not any(spec):
        return x  # not split: nothing to keep in place (libtpu's compiler also failed on such a constraint)
    return jax.lax.with_sharding_constraint(x, spec)


def _in_place_dims(x, param: nnx.Variable, dim: int):
    """Inside ``weights_in_place`` under a mesh: ``x`` with its last dimension split as dimension ``dim``
    of ``param`` is split at rest (its other dimensions left to XLA); otherwise ``x``."""
    mesh = jax.sharding.get_abstract_mesh()
    if (not _WEIGHTS or _WEIGHTS[-1] != "in_place" or mesh.empty or mesh.manual_axes
            or not set(AXES) <= set(mesh.axis_names)):
        return x
    logical = param.get_metadata().get("out_sharding") or (None,) * param.ndim
    spec = spec_for(param.shape, logical, mesh)
    if not any(spec):
        return x  # the weight is not split: nothing to keep in place
    return jax.lax.with_sharding_constraint(x, P(*(P.UNCONSTRAINED,) * (x.ndim - 1), spec[dim]))


def input_for(x, param: nnx.Variable):
    """Inside ``weights_in_place``: ``x``, the input of a matmul with the weight ``param [out, in]``,
    split on ``in`` as the weight is, so each device contracts its part and XLA sums the small partial
    products instead of gathering the weight. Otherwise ``x``."""
    return _in_place_dims(x, param, -1)


def output_for(y, param: nnx.Variable):
    """Inside ``weights_in_place``: ``y``, the output of a matmul with ``param [out, in]``, split on
    ``out`` as the weight is, so each device computes its rows of the weight (XLA then gathers the small
    output, not the weight). Otherwise ``y``."""
    return _in_place_dims(y, param, 0)


def collective_bytes(hlo: str) -> dict[str, int]:
    """``{collective kind: bytes its ops produce}`` of a compiled HLO module's text (``all-gather``,
    ``all-reduce``, ``all-to-all``, ``reduce-scatter``, ``collective-permute``): what a step moves between
    devices, per device."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                      r"(-start)?\(", line)
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)) if m else ():
            itemsize = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2}.get(dtype, 1 if dtype.startswith("f8") else 4)
            out[m.group(2)] = out.get(m.group(2), 0) + math.prod(int(d) for d in dims.split(",") if d) * itemsize
    return out


def per_matrix(fn, x, spec: P, mesh: Mesh):
    """``fn`` applied to ``x`` ``[b..., m, n]``, a stack of matrices split over ``mesh`` as ``spec`` says, for an
    ``fn`` that needs each matrix whole and treats them independently (Muon's Newton–Schulz). The
    devices that share matrices (splitting them, or holding copies) take turns: each gets whole
    matrices, its share of the stack (``all_to_all``; zero matrices pad the stack to a multiple), applies
    ``fn`` to them, and sends the results back. Same result as ``fn(x)`` on one device.

    Left to itself, XLA's partitioner gathers whole stacks onto every device and runs ``fn`` on all of
    it there: V4-Flash on 256 v5p chips, 5.4 GiB per chip for each of the largest (``[43, 1024, 32768]``
    float32), and every chip doing all the work."""
    spec = tuple(spec) + (None,) * (x.ndim - len(spec))
    names = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    sizes = dict(mesh.shape)
    used = {a for axes in names for a in axes}
    copies = tuple(a for a in mesh.axis_names if a not in used and sizes[a] > 1)
    split_m, split_n = names[-2], names[-1]
    share = math.prod(sizes[a] for a in copies + split_m + split_n)
    if share == 1 or x.ndim < 3:
        return fn(x)

    def local(block):
        y = block.reshape(-1, *block.shape[-2:])
        b = y.shape[0]
        y = jnp.pad(y, [(0, -b % share), (0, 0), (0, 0)])
        if copies:  # replicated: each copy keeps its part of the stack
            y = y.reshape(-1, y.shape[0] // math.prod(sizes[a] for a in copies), *y.shape[1:])
            y = y[jax.lax.axis_index(copies)]
        for axes, dim in ((split_m, 1), (split_n, 2)):
            if axes:  # this dim split: gather it, split the stack instead
                y = jax.lax.all_to_all(y, axes, 0, dim, tiled=True)
        y = fn(y)
        for axes, dim in ((split_n, 2), (split_m, 1)):
            if axes:
                y = jax.lax.all_to_all(y, axes, dim, 0, tiled=True)
        if copies:
            y = jax.lax.all_gather(y, copies, axis=0, tiled=True)
        return y[:b].reshape(block.shape)

    return jax.shard_map(local, mesh=mesh, in_specs=P(*spec), out_specs=P(*spec), check_vma=False)(x)


def param_shardings(params_state: nnx.State, mesh: Mesh):
    """nnx.State of Params -> pure dict of NamedShardings with the same structure as its pure dict."""
    def one(v):
        meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
        return NamedSharding(mesh, spec_for(v.shape, meta.get("out_sharding"), mesh))
    specs = jax.tree_util.tree_map(one, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def placer(model, mesh: Mesh | None):
    """``place(key_path, host_array) -> jax.Array`` for the leaves of ``nnx.state(model)`` (``model`` may
    be abstract; key paths as in its pure dict). Without a mesh: the default device. With one: split
    by the leaf's logical axes (``RULES``), one leaf at a time, so each device receives only its part
    and no device ever holds the whole model."""
    if mesh is None:
        return lambda kp, x: jnp.asarray(x)
    by_path = {_path_key(p): s for p, s in
               jax.tree_util.tree_leaves_with_path(param_shardings(nnx.state(model), mesh))}
    return lambda kp, x: jax.device_put(x, by_path[_path_key(kp)])


def init_sharded(build, mesh: Mesh):
    """``build()`` (an nnx module constructor with random initialisers) run as one jitted function whose
    outputs carry ``param_shardings``: each device draws only its own shards, so no device ever holds
    the whole model. JAX's threefry keys are partitionable, so the values do not depend on the mesh."""
    model = nnx.eval_shape(build)
    shardings = param_shardings(nnx.state(model), mesh)
    pure = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())), out_shardings=shardings)()
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def follow_params(tree, params, param_sharding, mesh: Mesh):
    """Shardings for a tree that holds per-parameter copies (an optimizer state): a leaf whose key path
    ends with a parameter's path and has its shape gets that parameter's sharding; any other leaf
    (step counts, scalars) is replicated. ``tree`` may hold arrays or ``ShapeDtypeStruct``s."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_sharding)):
        by_path[_path_key(path)] = (p.shape, s)

    def one(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, tree)


BATCH_AXES = ("data", "fsdp", "expert")
_COMPUTE_RULES = {name: tuple(a for a in axes if a not in BATCH_AXES) for name, axes in RULES.items()}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def row_axes(n_rows: int, sizes: dict) -> tuple[str, ...]:
    """The mesh axes (``sizes``: name -> size) that ``n_rows`` rows split over evenly: all of
    ``BATCH_AXES``, else ``data`` × ``fsdp`` (decoding a few rows), else none."""
    axes = next(axes for axes in (BATCH_AXES, ("data", "fsdp"), ())
                if n_rows % math.prod(sizes.get(a, 1) for a in axes) == 0)
    return tuple(a for a in axes if a in sizes)


def local_call(fn, args: tuple, kinds: tuple[str, ...], out_kind: str, **kw):
    """``fn(*args, **kw)`` run on each device's part of its inputs when a mesh of several devices is set
    (``jax.set_mesh``), else called as is. For the Pallas kernels: XLA cannot split a kernel (a custom
    call) over devices by itself. Mosaic (TPU) refuses ("Mosaic kernels cannot be automatically
    partitioned"), and a Triton kernel would run whole, on the gathered batch, on every GPU.

    ``kinds`` (one per arg; pytrees allowed) and ``out_kind``: ``"rows"`` (leading axis split over
    ``row_axes``), ``"rows_heads"`` (also axis 2, the heads, over ``tensor`` when it divides them) or
    ``"heads"`` (axis 0 over ``tensor`` likewise). Axes a spec leaves out are gathered. Array keyword
    values (a position) become replicated inputs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args, **kw)
    sizes = dict(mesh.shape)
    shapes = [jax.tree_util.tree_leaves(a)[0].shape for a in args]
    rows = row_axes(shapes[kinds.index("rows_heads" if "rows_heads" in kinds else "rows")][0], sizes) or None
    tp = sizes.get("tensor", 1)
    heads = None
    if "rows_heads" in kinds and tp > 1 and shapes[kinds.index("rows_heads")][2] % tp == 0:
        heads = "tensor"
    spec = {"rows": P(rows), "rows_heads": P(rows, None, heads), "heads": P(heads)}
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays}

    def local(args, arrays):
        return fn(*args, **static, **arrays)

    # check_vma=False: Pallas interpret mode cannot run inside the varying-axes check
    return jax.shard_map(local, mesh=mesh, in_specs=(tuple(spec[k] for k in kinds), P()),
                         out_specs=spec[out_kind], check_vma=False)(tuple(args), arrays)


def check_batch(global_batch: int, mesh_axes, grad_accum: int = 1):
    """Rows of a batch are split over BATCH_AXES, and with ``train.grad_accum`` into microbatches: the
    global batch must be a multiple of their product. ``mesh_axes``: a mesh's ``shape`` (axis name -> size)."""
    shape = dict(mesh_axes)
    accum = grad_accum > 1
    sizes = [shape[a] for a in BATCH_AXES] + ([grad_accum] if accum else [])
    names = "mesh data×fsdp×expert" + (" × train.grad_accum" if accum else "")
    if global_batch % math.prod(sizes):
        raise ConfigError(f"data.global_batch={global_batch} must be a multiple of {names} = "
                          f"{'×'.join(map(str, sizes))} = {math.prod(sizes)} (batch rows are split over those "
                          "mesh axes" + (" and into the microbatches" if accum else "") + ")")


def check_experts(n_routed_experts: int, mesh_axes):
    """Expert parallelism keeps ``n_routed_experts / expert`` routed experts on each device of the mesh's
    ``expert`` axis: it must divide them. ``mesh_axes``: a mesh's ``shape`` (axis name -> size)."""
    n = dict(mesh_axes).get("expert", 1)
    if n_routed_experts % n:
        raise ConfigError(f"model.n_routed_experts={n_routed_experts} must be a multiple of mesh.expert={n} "
                          "(each device of the expert axis keeps n_routed_experts / expert of the routed experts)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
