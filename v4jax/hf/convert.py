"""Conversion between the released HF checkpoint (sharded safetensors, SPEC §4) and v4jax's orbax form.

The orbax form (docs/conversion.md) is a directory::

    config.json    the HF checkpoint's config.json, copied as it is (and copied back on export)
    v4jax.json     {"format": "v4jax-params", "version": 2, "layout": "released" | "float",
                    "dtype": ..., "parts": N, "raw_dtypes": {leaf name: true dtype}}
    params/        part-00000 … part-{N-1}: orbax PyTree checkpoints, each of some of the leaves of the
                   model's parameter pure dict (version 1: params/ itself was one checkpoint)

The parts together have the structure of ``nnx.to_pure_dict(nnx.state(model))`` (nested dicts, list
indices as int keys, names mirroring the released tensor names, routed experts stacked ``[E, ...]``).
Layout ``released`` keeps every tensor as the release stores it (FP8 + E8M0 scales, packed FP4, BF16, F32,
``tid2eid`` int64), so HF -> orbax -> HF is byte-exact; layout ``float`` holds dequantised weights of
one float dtype (training). Leaves of a dtype orbax cannot store exactly are kept as their raw bytes
(uint8) with the true dtype in ``raw_dtypes``.

    hf_to_orbax(hf_dir, out_dir, dtype=None)      # None: released layout; "bfloat16"/"float32": float
    orbax_to_hf(src, out_dir, shard_size=5e9)     # src: orbax form or a train.py checkpoint
    load_orbax_model(path, mode=..., layout=...)  # a Transformer from the orbax form

Memory: HF -> orbax holds one part (``--part-size``, default 2 GB) plus the leaf being built; orbax ->
HF restores one leaf at a time and writes each tensor into its shard as it is produced. Outputs are
written to a temporary sibling directory and renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax import quant
from v4jax.config import ConfigError, ModelConfig, from_hf_config
from v4jax.hf.checkpoint import fill_leaves, read_leaf, validate
from v4jax.hf.names import expected_tensors, expert_stack, path_to_name, tensor_names
from v4jax.hf.safetensors import DTYPES, INDEX_FILE, CheckpointError, SafetensorsReader


FORMAT, VERSION = "v4jax-params", 2  # version 1: params/ was one checkpoint (still read)
META_FILE, PARAMS_DIR = "v4jax.json", "params"
PART_SIZE = "2GB"  # default bytes per orbax checkpoint under params/
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
FLOAT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_QUANTISED = ("F8_E4M3", "I8")


class ConversionError(CheckpointError):
    """A conversion input is missing or malformed, the output cannot be written, or they disagree."""


# ------------------------------------------------------------------------------------------- helpers

def parse_size(text: str | int, flag: str = "--shard-size") -> int:
    """``"5GB"`` -> 5·10⁹ bytes, ``"500MiB"`` -> 500·2²⁰; a bare number is bytes (errors name ``flag``)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"{flag}: cannot read {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if size <= 0:
        raise ConversionError(f"{flag} must be positive, got {text!r}")
    return size


def _existing_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{what} does not exist: {p}")
    if not p.is_dir():
        raise ConversionError(f"{what} is not a directory: {p}")
    return p


def _nest(flat: dict[str, object], *, int_keys: bool = True) -> dict:
    """``{"layers.0.attn.wkv.weight": a}`` -> ``{"layers": {0: {"attn": {"wkv": {"weight": a}}}}}``
    (``int_keys=False``: ``"0"``, as orbax names restored keys)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        parts = [int(p) if int_keys and p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def _flatten(tree) -> dict[str, object]:
    """Inverse of ``_nest`` (keys of any type, sorted as jax sorts them)."""
    return {path_to_name(tuple(k.key for k in kp)): v
            for kp, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)}


@functools.lru_cache(maxsize=4)
def _table(cfg: ModelConfig) -> dict:
    return expected_tensors(cfg)


def _dtype_named(name: str) -> np.dtype:
    """``"float8_e4m3fn"`` -> the ml_dtypes dtype; numpy names as numpy's."""
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def _is_float(dt) -> bool:
    return np.dtype(dt).kind == "f" or np.dtype(dt) == np.dtype(ml_dtypes.bfloat16)


def _layout_of(cfg: ModelConfig, layout: str, dtype: str | None):
    from v4jax.model.layers import WeightLayout
    if layout == "released":
        return WeightLayout.released(cfg)
    return WeightLayout.float(jnp.dtype(dtype or "float32"))


def abstract_params(cfg: ModelConfig, layout: str, dtype: str | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``{leaf name: ShapeDtypeStruct}`` of a Transformer of ``cfg`` in ``layout`` (nothing allocated).

    ``tid2eid`` is reported as int64, the dtype the release (and the orbax form) stores it in.
    """
    from v4jax.model.transformer import Transformer
    wl = _layout_of(cfg, layout, dtype)
    model = nnx.eval_shape(lambda: Transformer(cfg, layout=wl, rngs=nnx.Rngs(0)))
    out = {}
    for name, a in _flatten(nnx.to_pure_dict(nnx.state(model))).items():
        dt = np.dtype(np.int64) if name.endswith(".tid2eid") else np.dtype(a.dtype)
        out[name] = jax.ShapeDtypeStruct(tuple(a.shape), dt)
    return out


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def check_output(out, *, force: bool, sources=()) -> Path:
    """``out`` must not exist or be an empty directory; a non-empty one is accepted only with ``force``,
    and never when it is, or holds, one of the ``sources`` (the inputs it would replace)."""
    out = Path(out).resolve()
    for src in sources:
        src = Path(src).resolve()
        if src == out or out in src.parents:
            raise ConversionError(f"output directory {out} holds the input {src}: choose another output")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"output directory {out} exists and is not empty (use --force to replace it)")
    return out


class _Terminated(Exception):
    """SIGTERM while an output is being written."""


@contextlib.contextmanager
def _sigterm_raises():
    """Within the block, SIGTERM raises ``_Terminated`` (so cleanup runs) instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated("terminated by SIGTERM")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staging_dir(out: Path, *, force: bool, sources=()):
    """Yield an empty temporary directory beside ``out``; rename it to ``out`` on success.

    ``out`` is checked by ``check_output``. On any error, Ctrl-C or SIGTERM the temporary directory is
    removed, so an interrupted conversion leaves neither a complete-looking output nor a hidden partial
    one; a full disk is reported as such.
    """
    out = check_output(out, force=force, sources=sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ConversionError(f"cannot create the output directory {out}: {e}") from e
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output gets the usual permissions
    try:
        with _sigterm_raises():
            yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise ConversionError(f"disk full while writing {out} (partial output removed): {e}") from e
        if isinstance(e, _Terminated):
            raise SystemExit(f"terminated by SIGTERM while writing {out} (partial output removed)") from None
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _copy_side_files(src: Path, dst: Path, names=COPIED_FILES):
    for n in names:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- orbax I/O

_KEEPS: dict[np.dtype, bool] = {}


def orbax_keeps(dtype) -> bool:
    """Whether orbax restores arrays of ``dtype`` bit for bit (probed once per dtype with every byte
    pattern). Standard numpy dtypes are assumed exact."""
    dtype = np.dtype(dtype)
    if dtype.kind in "biuf":
        return True
    if dtype not in _KEEPS:
        import orbax.checkpoint as ocp
        if dtype.itemsize <= 2:  # every bit pattern
            x = np.arange(256 ** dtype.itemsize, dtype=np.uint32).astype(f"<u{dtype.itemsize}").view(dtype)
        else:
            x = np.random.default_rng(0).integers(0, 256, 4096 * dtype.itemsize, dtype=np.uint8).view(dtype)
        with tempfile.TemporaryDirectory() as d:
            ck = ocp.PyTreeCheckpointer()
            try:
                ck.save(Path(d) / "probe", {"x": x})
                y = np.asarray(ck.restore(Path(d) / "probe")["x"])
                _KEEPS[dtype] = y.dtype == dtype and y.tobytes() == x.tobytes()
            except Exception:  # any failure to store the dtype means: store raw bytes instead
                _KEEPS[dtype] = False
    return _KEEPS[dtype]


def part_dir(params: Path, i: int) -> Path:
    return params / f"part-{i:05d}"


def save_params(path: Path, leaves: Iterable[tuple[str, np.ndarray]], *,
                part_size: int | str = PART_SIZE) -> tuple[dict[str, str], int]:
    """Write ``(leaf name, array)`` pairs under ``path`` (which must not exist) as orbax PyTree checkpoints
    ``part-00000``, ``part-00001``, …: each holds the next leaves in order until they reach ``part_size``
    bytes. ``leaves`` may be a generator: a part is written as soon as it is full and then dropped, so
    host memory holds one part (at most ``part_size`` plus one leaf), not the whole tree.

    Returns ``(raw_dtypes, number of parts)``; ``raw_dtypes`` names the leaves stored as uint8 bytes
    because orbax cannot keep their dtype exactly.
    """
    import orbax.checkpoint as ocp
    limit = parse_size(part_size, "--part-size")
    path = Path(path).absolute()
    path.mkdir()
    raw, part, size, n = {}, {}, 0, 0

    def flush():
        nonlocal part, size, n
        ocp.PyTreeCheckpointer().save(part_dir(path, n), _nest(part))
        part, size, n = {}, 0, n + 1

    for name, a in leaves:
        a = np.asarray(a)
        if not orbax_keeps(a.dtype):
            raw[name] = a.dtype.name
            a = np.ascontiguousarray(a).view(np.uint8)
        part[name] = a
        size += a.nbytes
        if size >= limit:
            flush()
    if part or not n:
        flush()
    return raw, n


@dataclass
class OrbaxParams:
    """An opened orbax-form directory: config, layout, leaf metadata; leaves are read on demand."""
    path: Path
    cfg: ModelConfig
    layout: str                       # "released" | "float"
    dtype: str                        # float dtype of the weights ("bfloat16" in the released layout)
    raw_dtypes: dict[str, str]
    leaves: dict[str, jax.ShapeDtypeStruct]   # true shape / dtype of every leaf
    part_of: dict[str, Path]          # the orbax checkpoint holding each leaf

    def _fix(self, name: str, a) -> np.ndarray:
        a = np.asarray(a)
        return a.view(_dtype_named(self.raw_dtypes[name])) if name in self.raw_dtypes else a

    def _stored(self, name):
        s = self.leaves[name]
        if name in self.raw_dtypes:
            return jax.ShapeDtypeStruct((*s.shape[:-1], s.shape[-1] * s.dtype.itemsize), np.uint8)
        return jax.ShapeDtypeStruct(s.shape, s.dtype)

    def read(self, names) -> dict[str, np.ndarray]:
        """The named leaves only (one orbax partial restore per part they are in)."""
        by_part: dict[Path, list[str]] = {}
        for n in names:
            by_part.setdefault(self.part_of[n], []).append(n)
        out = {}
        for part, group in by_part.items():
            item = _nest({n: self._stored(n) for n in group}, int_keys=False)
            out.update((n, self._fix(n, a)) for n, a in _flatten(restore_leaves(part, item)).items())
        return out

    def leaf(self, name: str) -> np.ndarray:
        return self.read([name])[name]

    def all(self) -> dict[str, np.ndarray]:
        """Every leaf (one full read)."""
        return self.read(self.leaves)


def restore_leaves(path: Path, item: dict) -> dict:
    """The leaves of ``item`` (a nested dict of ShapeDtypeStructs) from the orbax PyTree checkpoint at
    ``path``, as numpy arrays; a leaf tensorstore cannot read (a truncated or missing data file) is a
    ``ConversionError`` naming the checkpoint and tensorstore's message."""
    import orbax.checkpoint as ocp
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        return ocp.PyTreeCheckpointer().restore(Path(path).absolute(), args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
    except ValueError as e:  # tensorstore's read errors
        raise ConversionError(f"cannot read {path}: {e}") from e


def ignore_closed_loop_callbacks() -> None:
    """After orbax gives up on an unreadable checkpoint, tensorstore's threads still complete their reads
    into orbax's closed asyncio loop; each raises ``RuntimeError('Event loop is closed')`` as an
    unraisable exception, which Python prints as a traceback after the real error. The CLIs call this
    to drop exactly those (every other unraisable exception goes to the previous hook)."""
    import sys
    previous = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)
    sys.unraisablehook = hook


def metadata_tree(path: Path) -> dict:
    """The stored tree of the orbax PyTree checkpoint at ``path``, as nested dicts of array metadata
    (nothing read). A missing or damaged ``_METADATA`` / OCDBT manifest is an error naming ``path``
    (orbax itself only logs a warning and returns no tree)."""
    import orbax.checkpoint as ocp
    try:
        md = ocp.PyTreeCheckpointer().metadata(Path(path).absolute())
    except Exception as e:  # orbax raises several types for unreadable checkpoints
        raise ConversionError(f"{path}: not a readable orbax checkpoint ({e})") from e
    tree = getattr(getattr(md, "item_metadata", md), "tree", md)
    if not isinstance(tree, dict):
        raise ConversionError(f"{path}: not a readable orbax checkpoint: its tree metadata (_METADATA, "
                              f"manifest.ocdbt) is missing or damaged")
    return tree


def is_orbax_dir(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def open_orbax(path) -> OrbaxParams:
    """Open and check an orbax-form directory: its ``v4jax.json``, ``config.json`` and that the stored
    leaves are exactly those of a model of that config in that layout (names, shapes, dtypes)."""
    p = _existing_dir(path, "orbax checkpoint directory")
    if not (p / META_FILE).is_file():
        hint = " (it looks like an HF checkpoint: use hf-to-orbax)" if (p / "config.json").is_file() else ""
        raise ConversionError(f"{p} is not a v4jax orbax directory: no {META_FILE}{hint}")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p / META_FILE}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{p / META_FILE}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in (1, VERSION):
        raise ConversionError(f"{p / META_FILE}: version {meta.get('version')!r} is not supported (1 or {VERSION})")
    layout, dtype = meta.get("layout"), meta.get("dtype")
    if layout not in ("released", "float") or (layout == "float" and dtype not in FLOAT_DTYPES):
        raise ConversionError(f"{p / META_FILE}: bad layout/dtype {layout!r}/{dtype!r}")
    if not (p / "config.json").is_file():
        raise ConversionError(f"{p}: config.json is missing")
    cfg = from_hf_config(p)
    params = p / PARAMS_DIR
    if not params.is_dir():
        raise ConversionError(f"{p}: the orbax parameter checkpoints {PARAMS_DIR}/ are missing")
    raw = dict(meta.get("raw_dtypes") or {})
    leaves, part_of = {}, {}
    for part in _parts(params, meta, where=p / META_FILE):
        for name, m in _flatten(metadata_tree(part)).items():
            if name in part_of:
                raise ConversionError(f"{params}: leaf {name!r} is stored twice ({part_of[name].name}, {part.name})")
            shape, dt = tuple(m.shape), np.dtype(m.dtype)
            if name in raw:
                dt = _dtype_named(raw[name])
                shape = (*shape[:-1], shape[-1] // dt.itemsize)
            leaves[name], part_of[name] = jax.ShapeDtypeStruct(shape, dt), part
    check_leaves(cfg, leaves, layout, dtype, where=str(p / PARAMS_DIR))
    return OrbaxParams(p, cfg, layout, dtype or "bfloat16", raw, leaves, part_of)


def _parts(params: Path, meta: dict, *, where: Path) -> list[Path]:
    """The orbax checkpoints under ``params``: version 1 wrote one (``params`` itself), version 2
    ``meta["parts"]`` numbered ones, all of which must be there and nothing else."""
    if meta["version"] == 1:
        return [params]
    n = meta.get("parts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConversionError(f"{where}: 'parts' must be a positive integer, got {n!r}")
    want = [part_dir(params, i) for i in range(n)]
    have = set(params.iterdir())
    missing, unexpected = [q.name for q in want if q not in have], sorted(q.name for q in have - set(want))
    if missing or unexpected:
        raise ConversionError(f"{params}: {where.name} records {n} part(s); missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    return want


def check_leaves(cfg: ModelConfig, leaves: dict, layout: str, dtype: str | None, *, where: str):
    """Raise ``ConversionError`` naming every leaf missing, unexpected or of the wrong shape / dtype for
    a model of ``cfg`` in ``layout`` (integer leaves may differ in width; float-layout leaves in float
    dtype)."""
    want = abstract_params(cfg, layout, dtype)
    problems = []
    for name, s in want.items():
        if name not in leaves:
            problems.append(f"missing leaf {name!r} {s.dtype.name}{list(s.shape)}")
            continue
        got = leaves[name]
        if tuple(got.shape) != tuple(s.shape):
            problems.append(f"leaf {name!r} has shape {list(got.shape)}, config.json implies {list(s.shape)}")
        kinds_ok = (np.dtype(got.dtype).kind == s.dtype.kind == "i" or
                    (layout == "float" and _is_float(got.dtype) and _is_float(s.dtype)))
        if np.dtype(got.dtype) != s.dtype and not kinds_ok:
            problems.append(f"leaf {name!r} has dtype {np.dtype(got.dtype).name}, expected {s.dtype.name}")
    for name in sorted(set(leaves) - set(want)):
        problems.append(f"unexpected leaf {name!r} {list(leaves[name].shape)}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{where}: the stored parameters do not match config.json ({layout} layout, "
                              f"{len(problems)} problem(s)):\n  " + "\n  ".join(shown))


# ------------------------------------------------------------------------------------------- HF -> orbax

def hf_to_orbax(hf_dir, out_dir, *, dtype: str | None = None, force: bool = False, progress: bool = True,
                part_size: int | str = PART_SIZE) -> Path:
    """Convert a released HF checkpoint to the orbax form.

    ``dtype=None``: layout ``released`` (every tensor kept as stored; byte-exact round trip);
    ``"bfloat16"`` / ``"float32"``: layout ``float`` (FP8 / FP4 dequantised, for training). Leaves are
    built one at a time and written in orbax checkpoints of about ``part_size`` bytes (``save_params``).
    """
    hf = _existing_dir(hf_dir, "HF checkpoint directory")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    parse_size(part_size, "--part-size")
    if not (hf / "config.json").is_file():
        raise ConversionError(f"{hf} is not an HF checkpoint: config.json is missing")
    cfg = from_hf_config(hf)
    layout = "released" if dtype is None else "float"
    E = cfg.n_routed_experts
    check_output(out_dir, force=force, sources=[hf])

    def leaves(reader):
        target = abstract_params(cfg, layout, dtype)
        for name, t in tqdm(target.items(), desc="converting", unit="leaf", disable=not progress):
            if layout == "float":
                yield name, read_leaf(reader, name, t, E)
                continue
            parts = [reader[n] for n in tensor_names(name, E)]
            a = np.stack(parts) if expert_stack(name) is not None else parts[0]
            if name.endswith("wo_a.weight") and a.ndim != len(t.shape) and a.size == int(np.prod(t.shape)):
                a = a.reshape(t.shape)  # unquantised release: the model keeps wo_a as [G, r, in]
            if a.dtype != t.dtype or a.shape != tuple(t.shape):
                raise ConversionError(f"tensor {name!r}: checkpoint gives {a.dtype.name}{list(a.shape)}, the "
                                      f"released layout needs {t.dtype.name}{list(t.shape)}")
            yield name, a

    with SafetensorsReader(hf) as reader, staging_dir(Path(out_dir), force=force, sources=[hf]) as tmp:
        validate(reader, cfg)
        raw, n_parts = save_params(tmp / PARAMS_DIR, leaves(reader), part_size=part_size)
        shutil.copyfile(hf / "config.json", tmp / "config.json")  # every key kept, also those v4jax ignores
        _write_json(tmp / META_FILE, {"format": FORMAT, "version": VERSION, "layout": layout,
                                      "dtype": dtype or "bfloat16", "parts": n_parts, "raw_dtypes": raw})
        _copy_side_files(hf, tmp)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------- export plan

@dataclass(frozen=True)
class Planned:
    name: str          # released tensor name
    dtype: str         # safetensors dtype
    shape: tuple
    leaf: str          # the parameter leaf it comes from

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def plan_tensors(cfg: ModelConfig, leaves: dict) -> list[Planned]:
    """The released tensors produced from ``leaves`` (``{name: shape/dtype}``), in writing order.

    A leaf already in the release's dtype gives its tensor(s) as they are; a float weight whose
    release dtype is FP8 / FP4 gives weight and scale, quantised. Raises if the tensor set does not
    equal ``expected_tensors(cfg)``.
    """
    table = _table(cfg)
    out = []
    for leaf, s in leaves.items():
        for tname in tensor_names(leaf, cfg.n_routed_experts):
            if tname not in table:
                raise ConversionError(f"leaf {leaf!r} gives tensor {tname!r}, which config.json does not have")
            dt, shape = table[tname]
            out.append(Planned(tname, dt, shape, leaf))
            if dt in _QUANTISED and np.dtype(s.dtype) != DTYPES[dt]:
                sname = tname[: -len(".weight")] + ".scale"
                out.append(Planned(sname, table[sname][0], table[sname][1], leaf))
    names = [p.name for p in out]
    missing, extra = set(table) - set(names), len(names) - len(set(names))
    if missing or extra:
        raise ConversionError(f"the parameters do not give the tensor set of config.json: missing "
                              f"{sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}, duplicated {extra}")
    return out


def leaf_tensors(cfg: ModelConfig, name: str, a: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """The released tensors of one leaf (see ``plan_tensors``): quantised with ``quant.quant_fp8`` (128×128
    E8M0-scaled FP8) / ``quant.quant_fp4`` (1×32 E8M0, packed) or cast to the release's dtype."""
    table = _table(cfg)
    names = tensor_names(name, cfg.n_routed_experts)
    parts = [a[e] for e in range(len(names))] if expert_stack(name) is not None else [a]
    for tname, part in zip(names, parts):
        dt, shape = table[tname]
        target = DTYPES[dt]
        if part.dtype == target:
            out = part
        elif dt in _QUANTISED:
            w = np.asarray(part, np.float32)
            if w.shape != shape and dt == "F8_E4M3" and w.size == int(np.prod(shape)):
                w = w.reshape(shape)  # float-layout wo_a [G, r, in] -> [G*r, in]
            q, s = quant.quant_fp8(w) if dt == "F8_E4M3" else quant.quant_fp4(w)
            yield tname, q
            yield tname[: -len(".weight")] + ".scale", s
            continue
        elif (_is_float(target) and _is_float(part.dtype)) or target.kind == part.dtype.kind == "i":
            out = part.astype(target)  # float -> BF16 / F32 (round to nearest even), int -> I64
        else:
            raise ConversionError(f"leaf {name!r}: cannot turn {part.dtype.name} into the release's {dt}")
        if out.shape != shape and out.size == int(np.prod(shape)) and tname.endswith("wo_a.weight"):
            out = out.reshape(shape)
        yield tname, out


# ------------------------------------------------------------------------------------------- orbax -> HF

def _write_bytes(f, data) -> None:
    """One write to a shard (a seam for tests that simulate a full disk)."""
    f.write(data)


def _header(entries: list[Planned]) -> bytes:
    header, offset = {}, 0
    for p in entries:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def split_shards(plan: list[Planned], shard_size: int) -> list[list[Planned]]:
    """Consecutive tensors grouped into shards of at most ``shard_size`` bytes (a larger tensor alone)."""
    shards, cur, size = [], [], 0
    for p in plan:
        if cur and size + p.nbytes > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.nbytes
    if cur:
        shards.append(cur)
    return shards


GROUP_BYTES = 16 * 2 ** 20  # leaves smaller than this are read together (fewer orbax calls)


def write_hf(cfg: ModelConfig, leaves: dict[str, jax.ShapeDtypeStruct], read_leaves: Callable[[list[str]], dict],
             out: Path, *, shard_size: int, progress: bool = True) -> None:
    """Stream the released tensors of ``leaves`` into sharded safetensors + index in the (empty)
    directory ``out``, plus ``config.json``. ``read_leaves(names) -> {name: array}`` is called with one
    leaf at a time (or a run of small leaves of at most ``GROUP_BYTES`` together).

    Shard contents are planned from shapes alone, so each header is written first and every tensor
    is appended as soon as it is produced; host memory holds one leaf (group) and its tensors.
    """
    plan = plan_tensors(cfg, leaves)
    shards = split_shards(plan, shard_size)
    n = len(shards)
    fname = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    where = {p.name: i for i, s in enumerate(shards) for p in s}
    total = sum(p.nbytes for p in plan)
    bar = tqdm(total=total, desc="writing", unit="B", unit_scale=True, disable=not progress)
    produced = _produce(cfg, plan, leaves, read_leaves)
    for i, shard in enumerate(shards):
        with open(out / fname[i], "wb") as f:
            blob = _header(shard)
            _write_bytes(f, struct.pack("<Q", len(blob)) + blob)
            for p in shard:
                name, a = next(produced)
                if name != p.name or a.dtype != DTYPES[p.dtype] or tuple(a.shape) != tuple(p.shape):
                    raise ConversionError(f"internal: produced {name} {a.dtype}{list(a.shape)}, planned "
                                          f"{p.name} {p.dtype}{list(p.shape)}")
                _write_bytes(f, np.ascontiguousarray(a).tobytes())
                bar.update(p.nbytes)
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": {name: fname[i] for name, i in where.items()}}
    _write_json(out / INDEX_FILE, index)
    _write_json(out / "config.json", cfg.to_hf_dict())


def _produce(cfg, plan, leaves, read_leaves):
    """(tensor name, array) in plan order, reading each leaf once, in groups of small leaves."""
    groups, size = [], GROUP_BYTES
    for p in plan:
        if groups and groups[-1][-1] == p.leaf:
            continue
        s = leaves[p.leaf]
        nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        if size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(p.leaf)
        size += nbytes
    for group in groups:
        arrays = read_leaves(group)
        for leaf in group:
            a = arrays.pop(leaf)
            if tuple(a.shape) != tuple(leaves[leaf].shape):
                raise ConversionError(f"leaf {leaf!r}: read shape {list(a.shape)}, metadata says "
                                      f"{list(leaves[leaf].shape)}")
            yield from leaf_tensors(cfg, leaf, a)
            del a


def is_train_checkpoint(path) -> bool:
    """A ``train.py`` workdir, its ``checkpoints`` directory, or one step directory."""
    p = Path(path)
    if (p / "checkpoints").is_dir() or (p / "state").is_dir():
        return True
    return p.is_dir() and any(c.is_dir() and c.name.isdigit() and (c / "state").is_dir() for c in p.iterdir())


def orbax_to_hf(src, out_dir, *, shard_size: int | str = "5GB", force: bool = False, progress: bool = True) -> Path:
    """Write a released-format HF checkpoint from an orbax-form directory or a ``train.py`` checkpoint
    (workdir, its ``checkpoints`` directory or one step directory). Float weights are quantised as the
    config's ``quantization_config`` says (BF16 without one)."""
    src = _existing_dir(src, "orbax checkpoint directory")
    size = parse_size(shard_size)
    check_output(out_dir, force=force, sources=[src])
    # (source file, name in the output); an orbax form's config.json replaces the one write_hf generates
    side = [(src / n, n) for n in ("config.json", *COPIED_FILES)]
    if is_orbax_dir(src):
        op = open_orbax(src)
        cfg, leaves, read_leaves = op.cfg, op.leaves, op.read
    elif is_train_checkpoint(src):
        from v4jax.checkpoint import open_train_run
        try:
            r = open_train_run(src)
        except (FileNotFoundError, ConfigError, KeyError) as e:
            raise ConversionError(f"{src}: cannot read the training checkpoint ({e})") from e
        cfg, leaves, read_leaves, step = r.cfg, r.leaves, r.read, r.step
        check_leaves(cfg, leaves, "float", "float32", where=f"{src} (step {step})")
        tok = r.tokenizer()
        if not tok.is_file():
            print(f"note: the run's tokenizer {tok} is not found (a path relative to where it was trained?): "
                  f"the export gets no tokenizer.json")
        side = [(tok, "tokenizer.json")] + [(tok.parent / n, n) for n in COPIED_FILES[1:]]
        if progress:
            print(f"exporting training step {step} of {src}")
    else:
        raise ConversionError(f"{src} is neither a v4jax orbax directory (no {META_FILE}) nor a train.py "
                              f"checkpoint (no checkpoints/ or state/)")
    with staging_dir(Path(out_dir), force=force, sources=[src]) as tmp:
        write_hf(cfg, leaves, read_leaves, tmp, shard_size=size, progress=progress)
        for f, n in side:
            if f.is_file():
                shutil.copyfile(f, tmp / n)
    return Path(out_dir)


def export_params(cfg: ModelConfig, params: dict, out_dir, *, shard_size: int | str = "5GB",
                  force: bool = False, progress: bool = True) -> Path:
    """Write a model's parameter pure dict (any layout; float weights are quantised) as an HF checkpoint."""
    flat = {n: np.asarray(a) for n, a in _flatten(params).items()}
    leaves = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in flat.items()}
    with staging_dir(Path(out_dir), force=force) as tmp:
        write_hf(cfg, leaves, lambda names: {n: flat[n] for n in names}, tmp, shard_size=parse_size(shard_size),
                 progress=progress)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------- loading

class _ReleaseView:
    """Reader-like access (``[name]``, ``in``, ``info``, ``keys``) to the released tensors of stored leaves,
    so the HF loader's per-tensor conversion (``hf.checkpoint.read_leaf``) applies unchanged."""

    @dataclass(frozen=True)
    class Info:
        dtype: str
        shape: tuple

    def __init__(self, cfg: ModelConfig, leaves: dict, read_leaf, path):
        self.cfg, self.read_leaf, self.path = cfg, read_leaf, path
        self.leaves = leaves
        self.plan = {p.name: p for p in plan_tensors(cfg, leaves)}
        self._cache: dict[str, dict] = {}

    def keys(self):
        return self.plan.keys()

    def __len__(self):
        return len(self.plan)

    def __contains__(self, name):
        return name in self.plan

    def info(self, name):
        p = self.plan[name]
        return self.Info(p.dtype, p.shape)

    def __getitem__(self, name):
        leaf = self.plan[name].leaf
        if leaf not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[leaf] = dict(leaf_tensors(self.cfg, leaf, self.read_leaf(leaf)))
        return self._cache[leaf][name]


def load_orbax_model(source, *, mode: str = "exact", layout: str = "float", dtype=jnp.float32,
                     attention_impl: str | None = None, moe_impl: str | None = None, progress: bool = True,
                     mesh=None, kv_cache: str = "auto"):
    """A ``Transformer`` from an orbax-form directory (``source``: its path, or opened by ``open_orbax``)
    or an opened ``train.py`` checkpoint (``checkpoint.open_train_run``), in the requested ``layout``
    (split over ``mesh`` if given, as ``load_model`` does); see ``load_orbax_params``."""
    import dataclasses

    from v4jax.model.layers import WeightLayout
    from v4jax.model.transformer import Transformer
    op = source if hasattr(source, "leaves") else open_orbax(source)
    overrides = {k: v for k, v in (("attention_impl", attention_impl), ("moe_impl", moe_impl)) if v is not None}
    cfg = dataclasses.replace(op.cfg, **overrides)
    if layout not in ("float", "released"):
        raise ValueError(f"layout must be 'float' or 'released', got {layout!r}")
    wl = WeightLayout.float(dtype) if layout == "float" else WeightLayout.released(cfg)
    model = nnx.eval_shape(lambda: Transformer(cfg, mode=mode, layout=wl, rngs=nnx.Rngs(0), kv_cache=kv_cache))
    load_orbax_params(model, op, layout, progress=progress, mesh=mesh)
    return model


def load_orbax_params(model, op: OrbaxParams, layout: str, *, progress: bool = True, mesh=None) -> None:
    """Fill ``model`` (built for ``op.cfg`` in ``layout``, possibly abstract) in place from an opened
    orbax-form directory; with ``mesh``, each leaf goes straight to its shards (``sharding.placer``).

    Same layout as stored: leaves are restored and cast (``tid2eid`` to int32). Otherwise each
    parameter is built from the released tensors of the stored leaves exactly as ``load_model`` builds
    it from safetensors (dequantised for ``float``, quantised for ``released``), so a released-layout
    orbax directory gives the same model as the HF checkpoint it came from.
    """
    if layout == op.layout:
        fill_model(model, op.leaves, op.read, mesh=mesh, progress=progress)
        return
    cfg = model.cfg
    view = _ReleaseView(op.cfg, op.leaves, op.leaf, op.path)
    validate(view, cfg)
    fill_leaves(model, lambda name, t: read_leaf(view, name, t, cfg.n_routed_experts), mesh=mesh, progress=progress)


def fill_model(model, leaves: dict[str, jax.ShapeDtypeStruct], read_leaves: Callable[[list[str]], dict], *,
               mesh=None, progress: bool = True) -> None:
    """Fill ``model`` (possibly abstract) in place from stored leaves of its own layout, cast to its
    dtypes: ``read_leaves(names)`` is called with runs of small leaves of at most ``GROUP_BYTES`` together
    (a large leaf alone), and each leaf goes to its shards at once, so host memory holds one group."""
    targets = _flatten(nnx.to_pure_dict(nnx.state(model)))
    missing, unexpected = sorted(set(targets) - set(leaves)), sorted(set(leaves) - set(targets))
    if missing or unexpected:
        raise ConversionError(f"the checkpoint's leaves are not the model's: missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}")
    groups, group_of, size = [], {}, GROUP_BYTES
    for name in targets:
        s = leaves[name]
        nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        if size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        group_of[name] = len(groups) - 1
        size += nbytes
    pending: dict[str, np.ndarray] = {}

    def read(name, target):
        if name not in pending:
            pending.update(read_leaves(groups[group_of[name]]))
        a = pending.pop(name)
        if tuple(a.shape) != tuple(target.shape):
            raise ConversionError(f"leaf {name!r}: stored shape {list(a.shape)}, the model's {list(target.shape)}")
        return a.astype(target.dtype)
    fill_leaves(model, read, mesh=mesh, progress=progress)
