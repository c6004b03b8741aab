"""Minimal safetensors reader / writer with the dtypes of the released V4 checkpoints.

The installed ``safetensors`` numpy loaders cannot return BF16 / F8 tensors, so the header and the
bytes are read here: each file is memory-mapped and a tensor is materialised only when asked for.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
(offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or does not match what is expected."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple
    file: Path
    begin: int          # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one file's header: ({name: TensorInfo}, metadata). Validates offsets against the file size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated file (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
    infos = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {h}") from None
        if not all(_is_count(d) for d in (*shape, b, e)) or b > e:
            raise CheckpointError(f"{path}: tensor {name!r}: shape and data_offsets must be non-negative "
                                  f"integers, begin <= end (header: {h})")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if e - b != expected:
            raise CheckpointError(f"{path}: tensor {name!r} {dtype}{list(shape)} needs {expected} bytes, "
                                  f"header gives {e - b}")
        if 8 + n + e > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {8 + n + e}, "
                                  f"file has {size}")
        infos[name] = TensorInfo(name, dtype, shape, path, 8 + n + b, 8 + n + e)
    # As the safetensors format requires: the tensors tile the data section, without gaps or overlaps.
    end = 8 + n
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != end:
            what = "overlaps the tensor before it" if info.begin < end else f"leaves a gap of {info.begin - end} bytes"
            raise CheckpointError(f"{path}: tensor {info.name!r} {what} (data_offsets {info.begin - 8 - n}, "
                                  f"expected {end - 8 - n})")
        end = info.end
    if end != size:
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor's data (file has {size}, "
                              f"data ends at {end})")
    return infos, meta


class SafetensorsReader:
    """Read tensors from one ``.safetensors`` file or a sharded checkpoint directory, lazily.

    ``reader.info(name)`` gives dtype/shape without reading; ``reader[name]`` returns a numpy array
    (ml_dtypes for BF16/F8) backed by a read-only memory map. Files are opened on first use.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path does not exist: {path}")
        self.path = path
        weight_map = None
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / INDEX_FILE}: not a valid index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{path / INDEX_FILE}: weight_map must map tensor names to file names")
            files = sorted({(path / f).resolve() for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard(s) named in {INDEX_FILE} are missing: {missing}")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            infos, _ = read_header(f)
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._infos[name].file.name} "
                                          f"and {f.name}")
                self._infos[name] = info
        if weight_map is not None:
            unlisted = sorted(set(self._infos) - set(weight_map))
            if unlisted:
                raise CheckpointError(f"{path}: tensor(s) in the shards but not in {INDEX_FILE}: "
                                      f"{unlisted[:10]}{' ...' if len(unlisted) > 10 else ''}")
            for name, fname in weight_map.items():
                if name not in self._infos:
                    raise CheckpointError(f"{INDEX_FILE} maps {name!r} to {fname}, but that file has no such tensor")
                if self._infos[name].file.name != Path(fname).name:
                    raise CheckpointError(f"{INDEX_FILE} maps {name!r} to {fname}, but it is in "
                                          f"{self._infos[name].file.name}")
        self._maps: dict[Path, mmap.mmap] = {}

    def keys(self):
        return self._infos.keys()

    def __contains__(self, name):
        return name in self._infos

    def __len__(self):
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        return self._infos[name]

    def raw_bytes(self, name: str) -> memoryview:
        info = self.info(name)
        m = self._maps.get(info.file)
        if m is None:
            with open(info.file, "rb") as f:
                m = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(m)[info.begin:info.end]

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.info(name)
        return np.frombuffer(self.raw_bytes(name), dtype=DTYPES[info.dtype]).reshape(info.shape)

    def close(self):
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # an array still references the map; it is closed when collected
                pass
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write ``tensors`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    header, offset = {}, 0
    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays[name] = a
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
