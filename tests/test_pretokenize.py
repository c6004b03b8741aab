"""python -m v4jax.pretokenize: token shards that train exactly as the text / JSONL they came from."""
import json

import chex
import numpy as np
import pytest

from v4jax import data
from v4jax.pretokenize import main, pretokenize


def _batches(cfg, n):
    it = data.make_iterator(cfg)
    return [next(it)["tokens"] for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """Two JSONL files of 60 documents of different lengths (blank lines and an empty text too)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "def", "return", "(x)", "\n", "0.5", "import", "ü"]
    for i in range(2):
        lines = [json.dumps({"id": j, "text": " ".join(rng.choice(words, size=rng.integers(0, 40)))})
                 for j in range(60)]
        (tmp_path / f"part{i}.jsonl").write_text("\n".join(lines[:30]) + "\n\n" + "\n".join(lines[30:]) + "\n")
    return str(tmp_path / "part*.jsonl")


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_give_the_batches_of_the_text_source(tmp_path, corpus, shuffle):
    common = dict(seq_len=16, global_batch=3, seed=7, shuffle=shuffle, add_bos=True, num_epochs=2)
    source = data.DataConfig(source="jsonl", paths=(corpus,), **common)
    shards = pretokenize(source, tmp_path / "tok", shard_tokens=300, progress=False)
    assert len(shards) >= 4  # several shards; documents are never split across them
    lengths = np.concatenate([np.load(str(s)[:-4] + data.DOC_LENGTHS) for s in shards])
    assert lengths.size == 120 and lengths.min() == 2  # the empty text: bos + eos
    tokens = data.DataConfig(source="tokens", paths=(str(tmp_path / "tok" / "*.npy"),), **common)
    assert len(data.make_dataset(tokens)) == len(data.make_dataset(source))
    n = len(data.make_dataset(source))
    chex.assert_trees_all_equal(_batches(tokens, n), _batches(source, n))


def test_tokenizer_calls_bounded_by_bytes_change_nothing(tmp_path, corpus, monkeypatch):
    """Documents go to the tokenizer in runs of at most ~BATCH_BYTES (long documents alone): same shards."""
    common = dict(seq_len=16, global_batch=3, seed=7, num_epochs=1)
    source = data.DataConfig(source="jsonl", paths=(corpus,), **common)
    (whole,) = pretokenize(source, tmp_path / "whole", progress=False)
    calls = []
    encoder = data.document_encoder

    def spy(cfg):
        encode = encoder(cfg)
        return lambda texts: calls.append([len(t.encode()) for t in texts]) or encode(texts)

    monkeypatch.setattr(data, "BATCH_BYTES", 100)
    monkeypatch.setattr("v4jax.pretokenize.document_encoder", spy)
    (small,) = pretokenize(source, tmp_path / "small", progress=False)
    assert sum(map(len, calls)) == 120 and len(calls) > 10  # documents are ~0-300 bytes
    assert all(sum(sizes[:-1]) < 100 for sizes in calls)  # a call ends with the document reaching 100 bytes
    for suffix in (".npy", data.DOC_LENGTHS):
        np.testing.assert_array_equal(np.load(str(whole)[:-4] + suffix), np.load(str(small)[:-4] + suffix))


def test_text_format_one_document_per_file(tmp_path):
    texts = ["def f(x):\n    return x\n", "", "Hello, world! " * 30]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    common = dict(seq_len=8, global_batch=2, num_epochs=1)
    source = data.DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), **common)
    (shard,) = pretokenize(source, tmp_path / "tok", progress=False)
    assert np.load(str(shard)[:-4] + data.DOC_LENGTHS).size == 3
    tokens = data.DataConfig(source="tokens", paths=(str(shard),), **common)
    chex.assert_trees_all_equal(list(data.make_iterator(tokens)), list(data.make_iterator(source)))


def test_cli_and_its_errors(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    main([corpus, "--format", "jsonl", "--out", str(out), "--quiet"])
    assert "train with data.source=tokens" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["tokens-00000.doc_lengths", "tokens-00000.npy"]
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([corpus, "--format", "jsonl", "--out", str(out), "--quiet"])
    main([corpus, "--format", "jsonl", "--out", str(out), "--quiet", "--force", "--shard-tokens", "500"])
    assert len(list(out.glob("*.npy"))) > 1
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: no field 'text'"):
        main([str(tmp_path / "bad.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "bad"), "--quiet"])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))  # nothing half-written
    (tmp_path / "bad2.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \\ud800 half"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"bad2.jsonl:2: field 'text' is not valid Unicode text"):
        main([str(tmp_path / "bad2.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "bad2"), "--quiet"])
    (tmp_path / "bad2.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"bad2.jsonl:2: not UTF-8 text"):
        main([str(tmp_path / "bad2.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "bad2"), "--quiet"])
    with pytest.raises(SystemExit, match="matches no files"):
        main([str(tmp_path / "*.md"), "--format", "text", "--out", str(tmp_path / "x"), "--quiet"])
    # a doc_lengths file that does not add up to its shard is rejected by the tokens source
    np.save(out / "tokens-00000.doc_lengths", np.array([3, 4]))
    (out / "tokens-00000.doc_lengths.npy").rename(out / "tokens-00000.doc_lengths")
    with pytest.raises(ValueError, match=r"tokens-00000.doc_lengths: expected positive document lengths summing"):
        data.make_dataset(data.DataConfig(source="tokens", paths=(str(out / "*.npy"),), seq_len=4))
