"""Training data: sources -> tokens -> packed fixed-length windows -> sharded batches (grain).

  documents   text / jsonl files or the stdlib (tokenised, eos after each document),
              or pre-tokenised .npy files (one document per file, used as they are)
  epoch e     documents in a seeded permutation, concatenated into one token stream
  packing     concat-then-split: window j = stream[j*seq_len : j*seq_len + seq_len + 1];
              consecutive windows share one token, so every token is a target exactly once
  order       windows of an epoch in a seeded permutation; global window k is window
              k % W of epoch k // W (W windows per epoch, the tail < seq_len is dropped)
  batching    global batch b = windows [b*G, (b+1)*G); process p keeps rows [p*B, (p+1)*B)
              with B = G / process_count

Every process computes the same global stream, and a batch is a pure function of its
index, so the iterator state is grain's `{"next_index": b}`: small, exact on resume, and
independent of process_count.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import os
import sys
import sysconfig
import warnings

import grain
import numpy as np
from grain.experimental import index_shuffle
from tqdm.auto import tqdm

from v4jax.tokenizer import load_tokenizer, special_ids

__all__ = [
    "DataConfig",
    "make_dataset",
    "make_iterator",
    "load_tokenizer",
    "save_args",
    "restore_args",
    "stdlib_files",
    "stdlib_texts",
]

SOURCES = ("stdlib", "text", "jsonl", "tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    source:       "stdlib" (embedded default: this interpreter's stdlib *.py files),
                  "text" (one document per file), "jsonl" (one document per line, the
                  string field `text_field`), "tokens" (1-D integer .npy files: one document
                  each, or several listed by a SHARD.doc_lengths beside, see v4jax.pretokenize;
                  ids must lie in [0, 2^31), checked as windows are read).
    paths:        files or globs (`**` allowed), read in the given order, globs sorted.
    tokenizer:    tokenizer.json (or a directory holding one); None = the shipped tiny one.
    bos_id, eos_id: None = read from the tokenizer (tokenizer_config.json beside it, or
                  DeepSeek's special token names). Text sources append eos to every
                  document; add_bos also prepends bos.
    seq_len:      tokens per training sequence; a batch row holds seq_len + 1 tokens.
    global_batch: rows per step over all processes.
    seed, shuffle: document and window order (a new permutation each epoch).
    num_epochs:   None = repeat forever.
    max_bytes:    stdlib source only: read the first max_bytes bytes in sorted file order.
    prefetch:     batches computed ahead in a background thread (0 = none).
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    seq_len: int = 256
    global_batch: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    max_bytes: int = 4_000_000
    prefetch: int = 2

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        paths = tuple(os.fspath(p) if isinstance(p, os.PathLike) else p for p in paths)
        object.__setattr__(self, "paths", paths)  # YAML gives lists; Python pathlib.Paths
        if isinstance(self.tokenizer, os.PathLike):
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))

        def check(ok, name, expected):
            if not ok:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def check_int(name, low, optional=False):
            v = getattr(self, name)
            is_int = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            check(
                (optional and v is None) or (is_int and v >= low),
                name,
                f"{'None or ' if optional else ''}an integer >= {low}",
            )

        check(self.source in SOURCES, "source", f"one of {SOURCES}")
        check(
            self.source == "stdlib" or len(paths) > 0,
            "paths",
            f"at least one file or glob for source={self.source!r}",
        )
        check(all(isinstance(p, str) and p for p in paths), "paths", "non-empty strings")
        check(isinstance(self.text_field, str) and self.text_field, "text_field", "a field name")
        check(isinstance(self.add_bos, bool), "add_bos", "a bool")
        check(isinstance(self.shuffle, bool), "shuffle", "a bool")
        check(self.tokenizer is None or isinstance(self.tokenizer, str), "tokenizer", "None or a path")
        for name, low in (
            ("seq_len", 1),
            ("global_batch", 1),
            ("seed", 0),
            ("max_bytes", 1),
            ("prefetch", 0),
        ):
            check_int(name, low)
        for name, low in (("num_epochs", 1), ("bos_id", 0), ("eos_id", 0)):
            check_int(name, low, optional=True)


# ------------------------------------------------------------------------------- sources

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[str]:
    """The running interpreter's stdlib *.py files, sorted by relative path.

    Test directories, site-packages / dist-packages and __pycache__ are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel += [
            os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            for f in filenames
            if f.endswith(".py")
        ]
    return [os.path.join(root, r) for r in sorted(rel)]


def stdlib_texts(max_bytes: int) -> list[str]:
    """The first `max_bytes` bytes of `stdlib_files()`, one string per file.

    The last file is truncated so that the total is at most max_bytes.
    """
    texts, left = [], max_bytes
    for path in stdlib_files():
        if left <= 0:
            break
        with open(path, "rb") as f:
            data = f.read(left)
        left -= len(data)
        texts.append(data.decode("utf-8", errors="replace"))
    if not texts:
        raise ValueError(f"source='stdlib': no *.py files under {sysconfig.get_paths()['stdlib']!r}")
    return texts


def expand_paths(paths: tuple[str, ...]) -> list[str]:
    """Files named by `paths` (globs sorted), in order; FileNotFoundError for misses."""
    files = []
    for p in paths:
        p = os.path.expanduser(p)
        if any(c in p for c in "*?[") and not os.path.isfile(p):  # data[1].txt is a file, not a glob
            matches = [m for m in sorted(glob.glob(p, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"DataConfig.paths: glob {p!r} matches no files")
            files += matches
        elif os.path.isfile(p):
            files.append(p)
        else:
            what = "is a directory (use a glob such as dir/*.txt)" if os.path.isdir(p) else "does not exist"
            raise FileNotFoundError(f"DataConfig.paths: {p!r} {what}")
    seen = collections.Counter(os.path.realpath(f) for f in files)
    repeated = [f"{f} ({n} times)" for f, n in seen.items() if n > 1]
    if repeated:  # overlapping globs, or a file listed again: kept (it may be meant as upsampling), but said
        warnings.warn(f"DataConfig.paths names some files more than once; their documents are read that "
                      f"many times per epoch: {', '.join(repeated[:5])}" + (" ..." if len(repeated) > 5 else ""),
                      stacklevel=2)
    return files


def read_text(path: str) -> str:
    """The UTF-8 text of a file as it is (line endings kept: \\r\\n is not turned into \\n)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def read_jsonl(path: str, field: str) -> list[str]:
    return list(iter_jsonl(path, field))


def iter_jsonl(path: str, field: str):
    """The string field ``field`` of each non-empty line of a JSONL file, in order."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno}: no field {field!r} (DataConfig.text_field); found {keys}")
            if not isinstance(record[field], str):
                raise ValueError(
                    f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, expected str"
                )
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError as e:  # a JSON escape such as \ud800 gives a lone surrogate
                raise ValueError(f"{path}:{lineno}: field {field!r} is not valid Unicode text ({e.reason}: "
                                 f"{e.object[e.start:e.end]!r} at character {e.start})") from e
            yield record[field]


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """Documents as slices of token arrays: doc i = arrays[array[i]][start[i] : start[i] + length[i]]."""

    arrays: list[np.ndarray]
    array: np.ndarray  # [D] int
    start: np.ndarray  # [D] int64
    length: np.ndarray  # [D] int64
    names: tuple[str, ...] = ()  # the file of each array, where its ids are to be checked (.npy files)

    def doc(self, i: int) -> np.ndarray:
        return self.arrays[self.array[i]][self.start[i] : self.start[i] + self.length[i]]

    def check_ids(self, i: int, offset: int, ids: np.ndarray):
        """ValueError unless ids = doc(i)[offset : ...] are valid int32 token ids (0 <= id < 2^31)."""
        if self.names and ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            bad = int(np.flatnonzero((ids < 0) | (ids > np.iinfo(np.int32).max))[0])
            raise ValueError(f"{self.names[self.array[i]]}: token id {ids[bad]} at index "
                             f"{self.start[i] + offset + bad} is not in [0, 2^31 - 1]")


def document_encoder(cfg: DataConfig):
    """``encode(texts) -> [int32 array per document]``: ``[bos] + ids + [eos]`` (bos with ``add_bos``)
    by ``cfg``'s tokenizer and special ids, as every text source of a run tokenises."""
    tok = load_tokenizer(cfg.tokenizer)
    bos, eos = special_ids(tok, cfg.tokenizer)
    bos = cfg.bos_id if cfg.bos_id is not None else bos
    eos = cfg.eos_id if cfg.eos_id is not None else eos
    name = cfg.tokenizer or "the shipped tiny tokenizer"
    if eos is None:
        raise ValueError(f"cannot find the eos token in {name}; set DataConfig.eos_id")
    if cfg.add_bos and bos is None:
        raise ValueError(f"cannot find the bos token in {name}; set DataConfig.bos_id")
    head, tail = ([bos] if cfg.add_bos else []), [eos]

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(head + enc.ids + tail, np.int32)
                for enc in tok.encode_batch_fast(texts, add_special_tokens=False)]
    return encode


BATCH_DOCS, BATCH_BYTES = 1024, 1 << 22  # per tokenizer call (its Encodings take ~200 bytes a token)


def text_batches(texts):
    """``(documents, their UTF-8 bytes)``: consecutive runs of ``texts`` of BATCH_DOCS documents or about
    BATCH_BYTES bytes (a longer document alone), so that a tokenizer call's memory is bounded."""
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t.encode("utf-8"))
        if len(batch) == BATCH_DOCS or size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _tokenize(texts, cfg: DataConfig, total_bytes: int | None = None, progress: bool = False) -> _Corpus:
    """Tokenises documents (an iterable, read as it is consumed) into one flat int32 array
    (``document_encoder``); a progress bar over ``total_bytes`` (the files' sizes) with ``progress``."""
    encode = document_encoder(cfg)
    pieces = []
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", delay=2,
              disable=not progress) as bar:
        for batch, size in text_batches(texts):
            pieces += encode(batch)
            bar.update(size)
        bar.update(max(0, (total_bytes or 0) - bar.n))  # JSONL: the texts are shorter than their lines
    length = np.array([len(p) for p in pieces], np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return _Corpus([flat], np.zeros(len(pieces), np.int64), start, length)


DOC_LENGTHS = ".doc_lengths"  # beside SHARD.npy: SHARD.doc_lengths, its documents' lengths (npy format)


def _load_tokens(files: list[str]) -> _Corpus:
    """Memory-maps pre-tokenised 1-D integer .npy files: one document each, or the documents that a
    ``SHARD.doc_lengths`` file beside ``SHARD.npy`` lists (as ``python -m v4jax.pretokenize`` writes)."""
    arrays, array, start, length = [], [], [], []
    for i, f in enumerate(files):
        if f.endswith(DOC_LENGTHS):
            raise ValueError(f"{f}: the document lengths of a token shard, not tokens; list the shards "
                             f"only (DIR/*.npy)")
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{f}: not a .npy array file ({e})") from e
        if not isinstance(a, np.ndarray):  # an .npz archive
            raise ValueError(f"{f}: not a .npy array file (a {type(a).__name__}); save one array per .npy")
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{f}: expected a 1-D integer array of token ids, found {a.dtype} {a.shape}")
        lengths_file = os.path.splitext(f)[0] + DOC_LENGTHS
        if os.path.isfile(lengths_file):
            try:
                n = np.load(lengths_file, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"{lengths_file}: not a .npy array file ({e})") from e
            if n.ndim != 1 or not np.issubdtype(n.dtype, np.integer) or (n < 1).any() or n.sum() != a.size:
                raise ValueError(f"{lengths_file}: expected positive document lengths summing to the "
                                 f"{a.size} tokens of {f}, found {n.dtype} {n.shape} summing to {n.sum()}")
        else:
            n = np.array([a.size])
        arrays.append(a)
        array.append(np.full(n.size, i))
        start.append(np.cumsum(n) - n)
        length.append(n)
    return _Corpus(arrays, *(np.concatenate(x).astype(np.int64) for x in (array, start, length)), tuple(files))


def _load_corpus(cfg: DataConfig, progress: bool = False) -> tuple[_Corpus, str]:
    if cfg.source == "stdlib":
        return _tokenize(stdlib_texts(cfg.max_bytes), cfg), f"stdlib (max_bytes={cfg.max_bytes})"
    files = expand_paths(cfg.paths)
    desc = f"source={cfg.source!r} paths={list(cfg.paths)}"
    if cfg.source == "tokens":
        return _load_tokens(files), desc
    total = sum(os.path.getsize(f) for f in files)
    if cfg.source == "text":
        return _tokenize((read_text(f) for f in files), cfg, total, progress), desc
    return _tokenize((t for f in files for t in iter_jsonl(f, cfg.text_field)), cfg, total, progress), desc


# ------------------------------------------------------------------------------- packing


class _Packer:
    """Maps a batch index to its [B_local, seq_len + 1] int32 token rows (see module doc)."""

    def __init__(self, corpus: _Corpus, cfg: DataConfig, process_index: int, process_count: int):
        self.corpus, self.cfg = corpus, cfg
        self.rows = cfg.global_batch // process_count
        self.first_row = process_index * self.rows
        self.windows_per_epoch = (int(corpus.length.sum()) - 1) // cfg.seq_len
        self._epoch = functools.lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(document order [D], stream end offset of each ordered document [D], window seed)."""
        n = len(self.corpus.length)
        if not self.cfg.shuffle:
            return np.arange(n), np.cumsum(self.corpus.length), 0
        seeds = np.random.SeedSequence([self.cfg.seed, epoch])
        doc_seed, window_seed = seeds.spawn(2)
        order = np.random.default_rng(doc_seed).permutation(n)
        return order, np.cumsum(self.corpus.length[order]), int(window_seed.generate_state(1)[0])

    def window(self, k: int) -> np.ndarray:
        """Global window k: [seq_len + 1] int32."""
        epoch, j = divmod(k, self.windows_per_epoch)
        order, ends, window_seed = self._epoch(epoch)
        if self.cfg.shuffle:
            j = index_shuffle(j, max_index=self.windows_per_epoch - 1, seed=window_seed, rounds=4)
        size = self.cfg.seq_len + 1
        checked = bool(self.corpus.names)  # .npy ids: read as int64, checked to fit int32
        out = np.empty(size, np.int64 if checked else np.int32)
        pos, filled, pieces = j * self.cfg.seq_len, 0, []
        d = int(np.searchsorted(ends, pos, side="right"))  # first document ending after pos
        while filled < size:
            doc = self.corpus.doc(order[d])
            offset = pos - (ends[d] - len(doc))
            take = min(size - filled, len(doc) - offset)
            out[filled : filled + take] = doc[offset : offset + take]
            pieces.append((order[d], offset, doc[offset : offset + take]))
            filled, pos, d = filled + take, pos + take, d + 1
        if checked and (out.min() < 0 or out.max() > np.iinfo(np.int32).max):
            for piece in pieces:
                self.corpus.check_ids(*piece)
        return out.astype(np.int32, copy=False)

    def batch(self, b: int) -> dict[str, np.ndarray]:
        """Batch b of this process: {"tokens": [B_local, seq_len + 1] int32}."""
        first = b * self.cfg.global_batch + self.first_row
        return {"tokens": np.stack([self.window(k) for k in range(first, first + self.rows)])}


def make_dataset(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Random-access batches of this process: `ds[b]` = {"tokens": [B_local, seq_len + 1] int32}.

    len(ds) is the number of whole global batches in num_epochs epochs (sys.maxsize when
    repeating forever). Reads and tokenises the source once, here (with a progress bar on process 0
    when that takes over 2 s).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index}: expected 0 <= process_index < process_count={process_count}"
        )
    if cfg.global_batch % process_count:
        raise ValueError(
            f"DataConfig.global_batch={cfg.global_batch} is not divisible by process_count={process_count}"
        )
    corpus, desc = _load_corpus(cfg, progress=process_index == 0)
    total = int(corpus.length.sum())
    if total < cfg.seq_len + 1:
        raise ValueError(
            f"{desc} has {total} tokens in {len(corpus.length)} documents; "
            f"need at least seq_len + 1 = {cfg.seq_len + 1}"
        )
    packer = _Packer(corpus, cfg, process_index, process_count)
    if cfg.num_epochs is None:
        num_batches = sys.maxsize
    else:
        num_batches = cfg.num_epochs * packer.windows_per_epoch // cfg.global_batch
        if num_batches == 0:
            raise ValueError(
                f"{desc} gives {packer.windows_per_epoch} windows of seq_len + 1 = {cfg.seq_len + 1} "
                f"tokens per epoch; num_epochs={cfg.num_epochs} cannot fill one global_batch={cfg.global_batch}"
            )
    return grain.MapDataset.range(num_batches).map(packer.batch)


def make_iterator(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Checkpointable iterator over this process's batches {"tokens": [B_local, seq_len + 1] int32}.

    B_local = global_batch / process_count. Inputs are tokens[:, :-1], targets tokens[:, 1:].
    `get_state()` / `set_state()` (or `save_args` / `restore_args` with orbax) resume exactly.
    """
    ds = make_dataset(cfg, process_index=process_index, process_count=process_count)
    read = grain.ReadOptions(num_threads=min(cfg.prefetch, 1), prefetch_buffer_size=cfg.prefetch)
    return iter(ds.to_iter_dataset(read))


# ------------------------------------------------------------------------------- orbax


def save_args(iterator: grain.DatasetIterator):
    """Orbax args saving `iterator`'s position: an item of `ocp.args.Composite(data=...)`.

    Writes `process_{i}-of-{n}.json` (i, n = jax.process_index(), jax.process_count()).
    """
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator):
    """Orbax args restoring the position into `iterator` in place (built with the same config)."""
    return grain.checkpoint.CheckpointRestore(iterator)
