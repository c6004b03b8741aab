"""Tests for v4jax.data: sources, packing, order, sharding, resumable iterator state."""

import json
import os
from pathlib import Path

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from v4jax import data
from v4jax.tokenizer import TINY_TOKENIZER, load_tokenizer, special_ids


def take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def unpack(windows, seq_len):
    """Undoes concat-then-split for consecutive windows (they overlap by one token)."""
    return np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])


@pytest.fixture
def npy_docs(tmp_path):
    """Three pre-tokenised documents, each starting with token 0, other tokens unique."""
    lengths = (40, 25, 61)
    docs, next_id = [], 1
    for i, n in enumerate(lengths):
        docs.append(np.concatenate([[0], np.arange(next_id, next_id + n - 1)]).astype(np.int64))
        next_id += n - 1
        np.save(tmp_path / f"doc{i}.npy", docs[i])
    return str(tmp_path / "doc*.npy"), docs


def npy_cfg(glob, **kw):
    return data.DataConfig(
        **{"source": "tokens", "paths": (glob,), "seq_len": 5, "global_batch": 4, "prefetch": 0, **kw}
    )


# ------------------------------------------------------------------------------ tokenizer


def test_shipped_tokenizer_round_trips():
    tok = load_tokenizer()
    assert tok.get_vocab_size() == 2048
    assert tok.id_to_token(0) == "<｜begin▁of▁sentence｜>"
    assert tok.id_to_token(1) == "<｜end▁of▁sentence｜>"
    assert special_ids(tok) == (0, 1)
    sample = data.stdlib_texts(20_000)[0] + "\n  tabs\t, ünïcödé ✓ 日本語 🙂\r\n"
    ids = tok.encode(sample, add_special_tokens=False).ids
    assert max(ids) < 2048 and 0 not in ids and 1 not in ids
    assert len(ids) < len(sample.encode())  # BPE merges actually compress code
    assert tok.decode(ids) == sample


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "nonsense"}')
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(str(tmp_path))  # a directory means <dir>/tokenizer.json
    cfg = data.DataConfig(source="text", paths=(str(bad),), tokenizer=str(bad))
    with pytest.raises(ValueError, match="cannot load"):
        data.make_iterator(cfg)


@pytest.fixture
def word_tokenizer(tmp_path):
    """A word-level tokenizer with HF-style tokenizer_config.json naming <s> / </s>."""
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<s>": 3, "</s>": 4, "again": 5}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    return str(d / "tokenizer.json")


def test_special_ids_from_tokenizer_config(word_tokenizer):
    assert special_ids(load_tokenizer(word_tokenizer), word_tokenizer) == (3, 4)
    config = os.path.join(os.path.dirname(word_tokenizer), "tokenizer_config.json")
    with open(config, "w") as f:
        f.write('{"eos_token": "</s>",}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json' is not a valid JSON file"):
        special_ids(load_tokenizer(word_tokenizer), word_tokenizer)


def test_truncation_and_padding_saved_in_the_tokenizer_are_ignored(tmp_path):
    """A tokenizer.json saved with truncation / padding on must not cut or pad documents."""
    text = "def f(x):\n    return x + 1\n" * 20
    full = tokenizers.Tokenizer.from_file(TINY_TOKENIZER).encode(text, add_special_tokens=False).ids
    tok = tokenizers.Tokenizer.from_file(TINY_TOKENIZER)
    tok.enable_truncation(8)
    tok.enable_padding(length=4096, pad_id=0)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(text)
    assert load_tokenizer(str(tmp_path)).encode(text, add_special_tokens=False).ids == full
    cfg = data.DataConfig(source="text", paths=(str(tmp_path / "a.txt"),), tokenizer=str(tmp_path),
                          seq_len=4, global_batch=1, shuffle=False, num_epochs=1)
    windows = [b["tokens"][0] for b in data.make_iterator(cfg)]
    assert len(windows) == len(full) // 4  # len(full) + 1 tokens with eos
    np.testing.assert_array_equal(unpack(windows, 4), (full + [1])[: len(windows) * 4 + 1])


# ------------------------------------------------------------------------------ sources + packing


def test_text_packing_keeps_every_token_in_order(tmp_path):
    texts = ["def f(x):\n    return x\n", "Hello, world! " * 20, "import os\nprint(os.sep)\n" * 7]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    tok = tokenizers.Tokenizer.from_file(TINY_TOKENIZER)
    stream = np.concatenate([tok.encode(t, add_special_tokens=False).ids + [1] for t in texts])
    seq_len, batch = 7, 2
    cfg = data.DataConfig(
        source="text",
        paths=(str(tmp_path / "*.txt"),),
        seq_len=seq_len,
        global_batch=batch,
        shuffle=False,
        num_epochs=1,
    )
    batches = list(data.make_iterator(cfg))
    num_windows = (len(stream) - 1) // seq_len
    assert len(batches) == num_windows // batch
    for b in batches:
        chex.assert_shape(b["tokens"], (batch, seq_len + 1))
        chex.assert_type(b["tokens"], np.int32)
    windows = [row for b in batches for row in b["tokens"]]
    np.testing.assert_array_equal(unpack(windows, seq_len), stream[: len(windows) * seq_len + 1])


def test_jsonl_text_field_and_bos(tmp_path, word_tokenizer):
    lines = [{"id": 1, "body": "hello world"}, {"id": 2, "body": "world"}, {"body": "again hello"}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")  # blank lines are skipped
    cfg = data.DataConfig(
        source="jsonl",
        paths=(str(path),),
        text_field="body",
        tokenizer=word_tokenizer,
        add_bos=True,
        seq_len=10,
        global_batch=1,
        shuffle=False,
        num_epochs=1,
    )
    (b,) = list(data.make_iterator(cfg))
    #                        <s> hello world </s> <s> world </s> <s> again hello </s>
    np.testing.assert_array_equal(b["tokens"], [[3, 1, 2, 4, 3, 2, 4, 3, 5, 1, 4]])


def test_a_file_named_twice_is_kept_and_said(tmp_path):
    """Overlapping globs (or a file listed again) read its documents twice: kept, with a warning naming it."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x")
    with pytest.warns(UserWarning, match=r"a\.txt \(2 times\)"):
        files = data.expand_paths((str(tmp_path / "*.txt"), str(tmp_path / "a.txt")))
    assert files == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]


def test_text_files_are_read_as_they_are(tmp_path):
    """Line endings are kept (\\r\\n is not turned into \\n); a file named with glob characters is a file."""
    raw = "a\r\nb\rc\n  x = 1\r\n".encode() * 5
    (tmp_path / "data[1].txt").write_bytes(raw)
    assert data.expand_paths((str(tmp_path / "data[1].txt"),)) == [str(tmp_path / "data[1].txt")]
    assert data.read_text(str(tmp_path / "data[1].txt")) == raw.decode()
    stream = tokenizers.Tokenizer.from_file(TINY_TOKENIZER).encode(raw.decode(), add_special_tokens=False).ids + [1]
    cfg = data.DataConfig(source="text", paths=(str(tmp_path / "data[1].txt"),), seq_len=3, global_batch=1,
                          shuffle=False, num_epochs=1)
    windows = [b["tokens"][0] for b in data.make_iterator(cfg)]
    np.testing.assert_array_equal(unpack(windows, 3), stream[: len(windows) * 3 + 1])


def test_text_batches_bound_a_tokenizer_call(monkeypatch):
    monkeypatch.setattr(data, "BATCH_DOCS", 3)
    monkeypatch.setattr(data, "BATCH_BYTES", 10)
    texts = ["aaaa", "bbbbbb", "c", "dd", "e" * 12, "f", "g", "h", "éé", "i"]
    assert list(data.text_batches(iter(texts))) == [
        (["aaaa", "bbbbbb"], 10),  # 10 bytes
        (["c", "dd", "e" * 12], 15),  # a long document ends its batch
        (["f", "g", "h"], 3),  # 3 documents
        (["éé", "i"], 5),  # é is 2 bytes
    ]


def test_npy_tokens_concatenated_in_order(npy_docs):
    glob, docs = npy_docs
    stream = np.concatenate(docs)  # pre-tokenised files are used as they are: no separators added
    seq_len = 5
    windows = [
        row for b in data.make_iterator(npy_cfg(glob, shuffle=False, num_epochs=1)) for row in b["tokens"]
    ]
    assert len(windows) == (len(stream) - 1) // seq_len // 4 * 4
    np.testing.assert_array_equal(unpack(windows, seq_len), stream[: len(windows) * seq_len + 1])


def test_stdlib_default_source():
    files = data.stdlib_files()
    assert files == sorted(files, key=lambda f: os.path.relpath(f, os.path.dirname(os.__file__)))
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split(os.sep))
    texts = data.stdlib_texts(50_000)
    assert sum(len(t.encode()) for t in texts) <= 50_000
    with open(files[0], encoding="utf-8") as f:
        assert texts[0] == f.read()[: len(texts[0])]

    cfg = data.DataConfig()  # the embedded default: a few MB, tiny tokenizer, shuffled
    b = next(data.make_iterator(cfg))["tokens"]
    chex.assert_shape(b, (cfg.global_batch, cfg.seq_len + 1))
    assert b.dtype == np.int32 and b.min() >= 0 and b.max() < 2048

    first = next(data.make_iterator(data.DataConfig(shuffle=False, max_bytes=50_000)))["tokens"][0]
    tok = load_tokenizer()
    expected = tok.encode(texts[0], add_special_tokens=False).ids[: len(first)]
    np.testing.assert_array_equal(first, expected)


# ------------------------------------------------------------------------------ order


def test_deterministic_for_a_seed_and_reshuffled_each_epoch(npy_docs):
    glob, docs = npy_docs
    a = take(data.make_iterator(npy_cfg(glob, seed=1)), 12)
    b = take(data.make_iterator(npy_cfg(glob, seed=1, prefetch=3)), 12)
    c = take(data.make_iterator(npy_cfg(glob, seed=2)), 12)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))

    # One epoch = (126 - 1) // 5 = 25 windows; 24 whole epochs fill 150 batches of 4.
    windows = np.concatenate(take(data.make_iterator(npy_cfg(glob, seed=1)), 150)).reshape(24, 25, 6)
    assert not np.array_equal(windows[0], windows[1])  # a new order each epoch
    # Each epoch is a complete packing of some document order: all documents start with 0 and
    # windows overlap by one token, so the targets hold every token once except one leading 0.
    expected_counts = np.bincount(np.concatenate(docs))
    expected_counts[0] -= 1
    for epoch in windows:
        np.testing.assert_array_equal(
            np.bincount(epoch[:, 1:].ravel(), minlength=len(expected_counts)), expected_counts
        )

    unshuffled = np.concatenate(take(data.make_iterator(npy_cfg(glob, shuffle=False)), 50)).reshape(8, 25, 6)
    np.testing.assert_array_equal(unshuffled[0], unshuffled[3])


# ------------------------------------------------------------------------------ sharding


def test_processes_get_disjoint_slices_of_the_global_batch(npy_docs):
    glob, _ = npy_docs
    cfg = npy_cfg(glob, global_batch=4, seed=3)
    whole = take(data.make_iterator(cfg), 10)
    parts = [take(data.make_iterator(cfg, process_index=p, process_count=2), 10) for p in range(2)]
    for b in range(10):
        chex.assert_shape([parts[0][b], parts[1][b]], (2, 6))
        np.testing.assert_array_equal(np.concatenate([parts[0][b], parts[1][b]]), whole[b])
    # Windows within one epoch never repeat; 6 batches of 4 < 25 windows = one epoch.
    seen = [{tuple(row) for b in p[:6] for row in b} for p in parts]
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("prefetch", [0, 3])
def test_state_restore_continues_exactly(npy_docs, prefetch):
    glob, _ = npy_docs
    cfg = npy_cfg(glob, seed=5, prefetch=prefetch)
    it = data.make_iterator(cfg)
    take(it, 7)  # crosses an epoch boundary later: 25 windows / 4 per batch
    state = it.get_state()
    expected = take(it, 10)
    resumed = data.make_iterator(cfg)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 10)), np.stack(expected))
    # The state is global, so it also resumes a run with a different process count.
    halves = [data.make_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for h in halves:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([take(h, 10) for h in halves], axis=1), np.stack(expected))


def test_orbax_checkpoint_manager_round_trip(tmp_path):
    cfg = data.DataConfig(max_bytes=100_000, seq_len=32, global_batch=4)
    it = data.make_iterator(cfg)
    take(it, 5)
    params = {"w": np.arange(6.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params), data=data.save_args(it)))
        mngr.wait_until_finished()
    expected = take(it, 4)

    fresh = data.make_iterator(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(params=ocp.args.StandardRestore(params), data=data.restore_args(fresh)),
        )
    assert restored["data"] is fresh and fresh.get_state() == {"next_index": 5}
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    np.testing.assert_array_equal(np.stack(take(fresh, 4)), np.stack(expected))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "field,value",
    [
        ("source", "parquet"),
        ("seq_len", 0),
        ("global_batch", 0),
        ("seed", -1),
        ("num_epochs", 0),
        ("max_bytes", 0),
        ("prefetch", -1),
        ("eos_id", -2),
        ("text_field", ""),
        ("seq_len", "128"),
        ("global_batch", 2.0),
        ("shuffle", "yes"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}={value!r}"):
        data.DataConfig(**{field: value})


def test_config_needs_paths_for_file_sources():
    with pytest.raises(ValueError, match=r"DataConfig\.paths=\(\)"):
        data.DataConfig(source="jsonl")
    assert data.DataConfig(source="text", paths=["a.txt"]).paths == ("a.txt",)  # YAML lists
    cfg = data.DataConfig(source="text", paths=Path("a.txt"), tokenizer=Path("t/tokenizer.json"))
    assert cfg.paths == ("a.txt",) and cfg.tokenizer == "t/tokenizer.json"
    assert data.DataConfig(source="text", paths=[Path("a.txt"), "b.txt"]).paths == ("a.txt", "b.txt")


def test_clear_errors_for_bad_inputs(tmp_path, npy_docs):
    glob, _ = npy_docs

    def fails(exc, match, **kw):
        with pytest.raises(exc, match=match):
            data.make_iterator(data.DataConfig(**{"seq_len": 4, "global_batch": 2, **kw}))

    fails(FileNotFoundError, "does not exist", source="text", paths=(str(tmp_path / "nope.txt"),))
    fails(FileNotFoundError, "matches no files", source="text", paths=(str(tmp_path / "*.md"),))
    fails(FileNotFoundError, "is a directory", source="text", paths=(str(tmp_path),))
    (tmp_path / "empty.jsonl").write_text("\n")
    fails(ValueError, "has 0 tokens", source="jsonl", paths=(str(tmp_path / "empty.jsonl"),))
    (tmp_path / "short.txt").write_text("hi")
    fails(
        ValueError,
        r"need at least seq_len \+ 1 = 101",
        source="text",
        paths=(str(tmp_path / "short.txt"),),
        seq_len=100,
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    fails(ValueError, r"bad.jsonl:2: no field 'text'", source="jsonl", paths=(str(tmp_path / "bad.jsonl"),))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    fails(
        ValueError, r"broken.jsonl:1: invalid JSON", source="jsonl", paths=(str(tmp_path / "broken.jsonl"),)
    )
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(ValueError, "not UTF-8", source="text", paths=(str(tmp_path / "latin1.txt"),))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    fails(ValueError, r"latin1.jsonl:2: not UTF-8", source="jsonl", paths=(str(tmp_path / "latin1.jsonl"),))
    (tmp_path / "surrogate.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 half"}\n')
    fails(ValueError, r"surrogate.jsonl:2: field 'text' is not valid Unicode text \(surrogates not allowed",
          source="jsonl", paths=(str(tmp_path / "surrogate.jsonl"),))
    np.save(tmp_path / "matrix.npy", np.zeros((4, 4), np.int32))
    fails(ValueError, r"1-D integer array", source="tokens", paths=(str(tmp_path / "matrix.npy"),))
    np.save(tmp_path / "floats.npy", np.zeros(40, np.float32))
    fails(ValueError, r"1-D integer array", source="tokens", paths=(str(tmp_path / "floats.npy"),))
    fails(ValueError, "not a .npy array file", source="tokens", paths=(str(tmp_path / "short.txt"),))
    np.savez(tmp_path / "archive.npz", tokens=np.arange(40))
    fails(ValueError, r"archive.npz: not a .npy array file \(a NpzFile\)", source="tokens",
          paths=(str(tmp_path / "archive.npz"),))
    np.save(tmp_path / "shard.npy", np.arange(40))
    with open(tmp_path / "shard.doc_lengths", "wb") as f:
        np.save(f, np.array([15, 25]))
    fails(ValueError, r"shard.doc_lengths: the document lengths of a token shard", source="tokens",
          paths=(str(tmp_path / "shard*"),))
    fails(
        ValueError,
        "cannot fill one global_batch=64",
        source="tokens",
        paths=(glob,),
        num_epochs=1,
        global_batch=64,
    )
    with pytest.raises(ValueError, match="global_batch=3 is not divisible by process_count=2"):
        data.make_iterator(npy_cfg(glob, global_batch=3), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        data.make_iterator(npy_cfg(glob), process_index=2, process_count=2)


@pytest.mark.parametrize("bad", [-100, 2**31, 2**40 + 5])
def test_token_ids_outside_int32_are_an_error(tmp_path, bad):
    """Ids that int32 cannot hold (or negative ones, e.g. -100 labels) are not wrapped silently."""
    tokens = np.arange(30, dtype=np.int64)
    tokens[17] = bad
    np.save(tmp_path / "t.npy", tokens)
    it = data.make_iterator(npy_cfg(str(tmp_path / "t.npy"), global_batch=1, shuffle=False, prefetch=2))
    take(it, 3)  # windows 0-2 hold tokens 0..15
    with pytest.raises(ValueError, match=rf"t.npy: token id {bad} at index 17 is not in \[0, 2\^31 - 1\]"):
        take(it, 1)
