"""eval.py generate / perplexity / bench / needle, the chat encoding, sampling, and the lm-eval adapter.

A random small checkpoint (vocab 2048 = the shipped tiny tokenizer) is written once; one Engine is
compiled for the API-level tests and a persistent compilation cache lets CLI runs of the same
shapes skip XLA compilation.
"""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, eval_cli, small_config, write_random_checkpoint
from v4jax import chat
from v4jax.evaluate import Scorer, needle_prompt, perplexity, score_documents, score_windows
from v4jax.generate import Engine, generate, sample_logits
from v4jax.hf.checkpoint import load_model
from v4jax.tokenizer import TINY_TOKENIZER, load_tokenizer

MAX_LEN = 128
CFG = dict(vocab_size=2048, num_hidden_layers=2, num_nextn_predict_layers=0, compress_ratios=[4, 8],
           hc_sinkhorn_iters=2)  # window, CSA (+ indexer) and HCA layers; no MTP
PAD = 64  # one padded prefill shape for the hand-computed references


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(path, small_config(**CFG), seed=11)
    shutil.copyfile(TINY_TOKENIZER, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(load_model(ckpt, progress=False), max_len=MAX_LEN)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()



def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def _padded_logits(engine, ids, length=PAD):
    """Prefill logits of ``ids`` (right-padded to ``length``; causal, so the padding changes nothing
    before it) -> fp64 log-probabilities ``[len(ids), V]``."""
    x = np.zeros((1, length), np.int32)
    x[0, :len(ids)] = ids
    logits = np.asarray(engine.prefill(x)[0][0, :len(ids)], np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


# ------------------------------------------------------------------------------------------- chat

def test_chat_encoding_of_a_conversation():
    conv = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Let me greet back.</think>Hello!"},
            {"role": "user", "content": "What is 2+2?"}]
    head = ("<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
            "<｜User｜>What is 2+2?<｜Assistant｜>")
    assert chat.encode_chat(conv) == head + "</think>"
    assert chat.encode_chat(conv, thinking=True) == head + "<think>"
    assert chat.encode_chat(conv[1:2]) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert chat.encode_chat(conv[:3], add_generation_prompt=False).endswith("Hello!<｜end▁of▁sentence｜>")
    assert chat.split_reply("Sum of two twos.</think>4<｜end▁of▁sentence｜>", thinking=True) == ("Sum of two twos.", "4")
    # several system messages (--system and a --history starting with one): each one's bare content, in
    # order, nothing between them (the release's encoding_dsv4 renders messages one by one)
    two = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in French."}, conv[1]]
    assert chat.encode_chat(two) == "<｜begin▁of▁sentence｜>Be brief.Answer in French.<｜User｜>Hi<｜Assistant｜></think>"
    for bad, msg in [([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user messages"),
                     ([{"role": "tool", "content": "x"}], "unknown role"),
                     ([{"role": "assistant", "content": "x"}], "must follow a user"),
                     ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "before the first user")]:
        with pytest.raises(chat.ChatError, match=msg):
            chat.encode_chat(bad)


# ------------------------------------------------------------------------------------------- sampling / generation

def test_sampling_greedy_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    assert np.all(np.asarray(sample_logits(logits, key)) == 0)                       # greedy
    assert np.all(np.asarray(sample_logits(logits, key, temperature=1.0, top_p=0.4)) == 0)  # nucleus = {0}
    s = np.asarray(sample_logits(logits, key, temperature=1.0, top_p=0.7))           # nucleus = {0, 1}
    assert set(np.unique(s)) == {0, 1} and abs(np.mean(s == 0) - 0.5 / 0.8) < 0.03
    s = np.asarray(sample_logits(logits, key, temperature=1.0))                      # the full distribution
    np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    s = np.asarray(sample_logits(logits, key, temperature=0.5))                      # sharper: p ∝ p^2
    np.testing.assert_allclose(np.mean(s == 0), 0.25 / 0.365, atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(logits, key, temperature=1.0, top_p=0.0)
    # top-k keeps the k most likely, renormalised; top-p then applies to those (as HF and vLLM): with
    # p = .4, .3, .2, .1, top_k=2 leaves .571, .429 and top_p=.5 only the first (on the full
    # distribution it would keep two)
    flat = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4000, jnp.float32))
    s = np.asarray(sample_logits(flat, key, temperature=1.0, top_k=2))
    assert set(np.unique(s)) == {0, 1} and abs(np.mean(s == 0) - 0.4 / 0.7) < 0.03
    assert np.all(np.asarray(sample_logits(flat, key, temperature=1.0, top_k=2, top_p=0.5)) == 0)
    assert np.all(np.asarray(sample_logits(flat, key, temperature=1.0, top_k=1)) == 0)
    s = np.asarray(sample_logits(flat, key, temperature=1.0, top_k=4000))            # k >= V: all
    np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), [0.4, 0.3, 0.2, 0.1], atol=0.03)
    # one key per row: row b's draw depends on keys[b] and its own logits only
    keys = jax.random.split(key, 3)
    rows = jax.random.normal(jax.random.key(1), (3, 50))
    batch = np.asarray(sample_logits(rows, keys, temperature=1.0, top_p=0.9, top_k=20))
    for b in range(3):
        assert batch[b] == int(sample_logits(rows[b:b + 1], keys[b:b + 1], temperature=1.0, top_p=0.9, top_k=20)[0])


def test_generate_batch_of_different_lengths_equals_single_rows(engine):
    rng = np.random.default_rng(1)
    p1, p2 = rng.integers(2, 2048, 4).tolist(), rng.integers(2, 2048, 7).tolist()
    single = [generate(engine, [p], max_new_tokens=6)[0].tokens for p in (p1, p2)]
    batch = [g.tokens for g in generate(engine, [p1, p2], max_new_tokens=6)]
    assert batch == single and all(len(t) == 6 for t in single)
    again = [generate(engine, [p], max_new_tokens=6)[0].tokens for p in (p1, p2)]
    assert again == single                                                 # greedy is deterministic
    # the first generated token is the argmax of the prompt's last prefill logits (p2: prefill 4 tokens,
    # then 3 forced decode steps — the same token as a full prefill would give)
    assert single[0][0] == int(np.argmax(np.asarray(engine.prefill(np.array([p1]))[0])[0, -1]))
    assert single[1][0] == int(np.argmax(_padded_logits(engine, p2)[-1]))
    s1 = generate(engine, [p1], max_new_tokens=6, temperature=0.9, top_p=0.95, seed=3)[0].tokens
    assert generate(engine, [p1], max_new_tokens=6, temperature=0.9, top_p=0.95, seed=3)[0].tokens == s1


def test_sampled_row_does_not_depend_on_the_other_rows(engine):
    """A sampled row's tokens depend on the seed, its row id and its own prompt: not on how many other
    rows share the batch, nor on their lengths (which change how much of every prompt is prefilled)."""
    rng = np.random.default_rng(4)
    p1, p2, p3 = (rng.integers(2, 2048, n).tolist() for n in (5, 9, 70))
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=3)
    alone = generate(engine, [p2], row_ids=[1], **kw)[0].tokens
    assert generate(engine, [p1, p2], **kw)[1].tokens == alone
    assert generate(engine, [p3, p2, p1], **kw)[1].tokens == alone
    assert generate(engine, [p2], **kw)[0].tokens != alone                 # another row id, other draws
    twice = generate(engine, [p2, p2], **kw)
    assert twice[0].tokens != twice[1].tokens                              # duplicates are not copies
    with pytest.raises(ValueError, match="row_ids"):
        generate(engine, [p1, p2], row_ids=[0], **kw)


def test_generate_stops_on_eos(engine):
    prompt = list(range(2, 9))
    full = generate(engine, [prompt], max_new_tokens=6)[0]
    assert full.finish_reason == "length"
    k = next(i for i in range(1, 6) if full.tokens[i] not in full.tokens[:i])
    stopped = generate(engine, [prompt], max_new_tokens=6, stop_ids={full.tokens[k]})[0]
    assert stopped.tokens == full.tokens[:k] and stopped.finish_reason == "eos"
    seen = []
    generate(engine, [prompt], max_new_tokens=6, on_token=lambda r, t: seen.append(t))
    assert seen == full.tokens
    with pytest.raises(ValueError, match="exceeds the engine's max_len"):
        generate(engine, [prompt], max_new_tokens=MAX_LEN)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(engine, [[5000]], max_new_tokens=1)


def test_cli_generate_chat_streams_and_writes_json(ckpt, tok, tmp_path, capsys):
    ev = eval_cli()
    out = tmp_path / "gen.json"
    ev.main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hi there", "--system", "Be brief.",
             "--max-new-tokens", "5", "--max-len", str(MAX_LEN), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())[0]
    expected_prompt = chat.encode_chat([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi there"}])
    assert rec["prompt_tokens"] == len(_ids(tok, expected_prompt))
    assert rec["completion"] == tok.decode(rec["tokens"], skip_special_tokens=False)
    assert printed == rec["completion"] + "\n"                         # streamed, then completed
    assert len(rec["tokens"]) <= 5 and rec["finish_reason"] in ("length", "eos")
    with pytest.raises(SystemExit, match="at least one --prompt"):
        ev.main(["generate", "--checkpoint", str(ckpt), "--quiet"])


# ------------------------------------------------------------------------------------------- perplexity

def test_score_windows_cover_every_target_once():
    assert score_windows(10, 4) == [(0, 4, 1), (4, 8, 5), (5, 9, 9)]
    assert score_windows(10, 4, 2) == [(0, 2, 1), (0, 4, 3), (2, 6, 5), (4, 8, 7), (5, 9, 9)]
    for n, L, s in [(1, 4, None), (2, 4, None), (37, 8, 3), (37, 8, 8), (9, 8, 1)]:
        targets = [j for start, end, a in score_windows(n, L, s) for j in range(a, end + 1)]
        assert targets == list(range(1, n))
        assert all(end - start <= L for start, end, _ in score_windows(n, L, s))
    with pytest.raises(ValueError, match="stride"):
        score_windows(10, 4, 5)


def test_cli_perplexity_matches_logits(ckpt, tmp_path, capsys):
    L = 16
    x = np.random.default_rng(2).integers(0, 2048, 2 * L + 1)
    np.save(tmp_path / "doc.npy", x)
    rows = np.stack([x[0:L + 1], x[L:2 * L + 1]])            # the two disjoint windows of seq-len L
    np.save(tmp_path / "rows.npy", rows)
    ev = eval_cli()
    ev.main(["logits", "--checkpoint", str(ckpt), "--tokens", str(tmp_path / "rows.npy"), "--prefill", str(L),
             "--out", str(tmp_path / "l.npz"), "--quiet"])
    logits = np.load(tmp_path / "l.npz")["prefill_logits"].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, rows[:, 1:, None], -1))
    ev.main(["perplexity", "--checkpoint", str(ckpt), "--data", str(tmp_path / "doc.npy"), "--seq-len", str(L),
             "--batch", "2", "--json", str(tmp_path / "p.json"), "--quiet"])
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["tokens"] == 2 * L and r["bits_per_byte"] is None
    np.testing.assert_allclose(r["nats_per_token"], expected, rtol=1e-5)
    assert "nats/token" in capsys.readouterr().out


def test_perplexity_strided_windows_and_bits_per_byte(engine, tok):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    doc = np.array([0] + _ids(tok, text), np.int32)          # BOS + text
    L, stride = 16, 6
    scorer = Scorer(engine)
    got = score_documents(scorer, [doc], seq_len=L, stride=stride, batch=2, progress=False)[0]
    want = 0.0
    for s, e, a in score_windows(len(doc), L, stride):        # each window scored by its own prefill
        lp = _padded_logits(engine, doc[s:e])
        want += sum(lp[j - 1 - s, doc[j]] for j in range(a, e + 1))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    r = perplexity(scorer, [doc], [len(text.encode())], seq_len=L, stride=stride, batch=2, progress=False)
    assert r.tokens == len(doc) - 1 and r.bytes == len(text)
    np.testing.assert_allclose(r.nats_per_token, -want / r.tokens, rtol=1e-5)
    np.testing.assert_allclose(r.bits_per_byte, -want / math.log(2) / len(text), rtol=1e-5)


# ------------------------------------------------------------------------------------------- device mesh

_SHARDED_LOAD = """
import sys
import jax
from v4jax.config import MeshConfig
from v4jax.hf.checkpoint import load_model
from v4jax.sharding import make_mesh

mesh = make_mesh(MeshConfig(data=1, expert=2, tensor=2))
model = load_model(sys.argv[1], layout=sys.argv[2], mesh=mesh, progress=False)
w1 = model.layers[0].ffn.experts.w1.weight[...]
assert w1.sharding.spec[0] == "expert", w1.sharding
assert w1.addressable_shards[0].data.shape[0] == w1.shape[0] // 2   # each device holds half the experts
head = model.head.weight[...]
assert head.sharding.spec[0] == "tensor" and head.addressable_shards[0].data.shape[0] == head.shape[0] // 2
# wo_a is split by its groups over tensor, as the attention output's heads are (not across each group)
wo = model.layers[0].attn.wo_a.weight[...]
rows = wo.sharding.spec[0] if isinstance(wo.sharding.spec[0], tuple) else (wo.sharding.spec[0],)
assert rows[0] == "tensor" and wo.sharding.spec[-1] is None, wo.sharding
# a random model from a preset (`--config --mesh`) is created split too, and the cache figure of
# `eval.py bench` can be computed under the mesh the commands run in
from v4jax.evaluate import load_any
from v4jax.generate import cache_bytes
rand = load_any(config=sys.argv[3], mesh=mesh, progress=False)
w1 = rand.layers[0].ffn.experts.w1.weight[...]
assert w1.addressable_shards[0].data.shape[0] == w1.shape[0] // 2, w1.sharding
with jax.set_mesh(mesh):
    assert cache_bytes(rand.cfg, 64)["total"] > 0
print("ok")
"""


@pytest.mark.parametrize("layout", ["float", "released"])
def test_loading_onto_a_device_mesh_splits_the_weights(ckpt, layout):
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    preset = REPO / "configs" / "tiny.yaml"
    out = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(ckpt), layout, str(preset)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_cli_bad_mesh_flag_names_the_problem(ckpt):
    ev = eval_cli()
    for spec, msg in (("experts=2", "unknown axis 'experts'"), ("expert:2", "not AXIS=SIZE"),
                      ("expert=3", "devices")):
        with pytest.raises(SystemExit, match=msg):
            ev.main(["bench", "--checkpoint", str(ckpt), "--mesh", spec, "--quiet"])


def test_cli_checks_its_arguments_before_loading_the_model(tmp_path, capsys):
    """Bad arguments are named before a (possibly minutes-long) load: the checkpoint here does not exist."""
    ev = eval_cli()
    nowhere = ["--checkpoint", str(tmp_path / "nowhere"), "--quiet"]
    for cmd, said in ((["logits", "--prefill", "0", "--out", "x.npz"], "--prefill: must be >= 1, got 0"),
                      (["bench", "--iters", "0"], "--iters: must be >= 1"),
                      (["perplexity", "--data", "x.txt", "--stride", "0"], "--stride: must be >= 1"),
                      (["needle", "--trials", "-1"], "--trials: must be >= 1"),
                      (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k: must be >= 0")):
        with pytest.raises(SystemExit):
            ev.main(cmd + nowhere)
        assert said in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.zeros((1, 5), np.int32))
    (tmp_path / "object.json").write_text('{"role": "user"}')
    for cmd, said in (
            (["logits", "--prefill", "4", "--decode", "3", "--tokens", str(tmp_path / "short.npy"), "--out", "x.npz"],
             "--tokens has 5 columns; --prefill 4 \\+ --decode 3 needs 7"),
            (["generate", "--prompt", "hi", "--history", str(tmp_path / "object.json")], "expected a JSON list"),
            (["generate", "--prompt", "hi", "--raw", "--system", "be brief"], "--raw .* excludes --system"),
            (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "1.5"], "--top-p .* 0 < top_p <= 1"),
            (["needle", "--digits", "19"], "--digits: at most 18"),
            (["perplexity", "--data", str(tmp_path / "missing*.txt")], "--data")):
        with pytest.raises(SystemExit, match=said):
            ev.main(cmd + nowhere)


def test_cli_bad_prefill_chunk_names_the_rule(ckpt):
    with pytest.raises(SystemExit, match="--prefill-chunk: prefill_chunk must be a positive multiple of"):
        eval_cli().main(["bench", "--checkpoint", str(ckpt), "--prefill-chunk", "3", "--quiet"])


def test_cli_fp8_kv_cache_refuses_exact_mode(ckpt, tmp_path):
    ev = eval_cli()
    for cmd in (["logits", "--prefill", "4", "--out", str(tmp_path / "x.npz")], ["bench"]):
        with pytest.raises(SystemExit, match="--kv-cache fp8 .* --mode exact"):
            ev.main(cmd + ["--checkpoint", str(ckpt), "--kv-cache", "fp8", "--quiet"])


# ------------------------------------------------------------------------------------------- bench / needle

def test_cli_bench_prints_table(ckpt, tmp_path, capsys):
    ev = eval_cli()
    ev.main(["bench", "--checkpoint", str(ckpt), "--batch", "2", "--prompt-len", "16", "--decode-steps",
             str(MAX_LEN - 17), "--iters", "2", "--context", "4096", "--json", str(tmp_path / "b.json"), "--quiet"])
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "b.json").read_text())
    for row in ("prefill throughput", "decode throughput", "peak memory", "dense MLA baseline"):
        assert row in out
    cfg = small_config(**CFG)
    assert r["dense_mla_bytes_per_token"] == 2 * 576 * 2  # 2 layers x (512 + 64) bf16
    # V4 at 4096 positions (bf16): per layer a window ring of 8 rows of hd=64, CSA (ratio 4) entries of
    # hd plus indexer keys of 32, HCA (ratio 8) entries of hd; compressor rings are a few constant rows.
    hd, win = cfg.head_dim, cfg.sliding_window
    approx = (2 * win * hd + 4096 // 4 * (hd + cfg.index_head_dim) + 4096 // 8 * hd) * 2 / 4096
    assert approx <= r["kv_bytes_per_token"] < approx * 1.1
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0


def test_needle_prompt_places_the_key(tok):
    for depth in (0.0, 0.5, 1.0):
        ids = needle_prompt(tok, 224, depth, "48213", bos=0)
        assert len(ids) == 224 and ids[0] == 0
        assert needle_prompt(tok, 224, depth, "7", bos=0, chat=True)[-3:] == _ids(tok, "<｜Assistant｜></think>")[-3:]
        text = tok.decode(ids)
        assert text.count("48213") == 2 and text.endswith("The pass key is")
        where = text.index("The pass key is 48213") / len(text)
        assert abs(where - (0.1 + 0.75 * depth)) < 0.2
    with pytest.raises(ValueError, match="too short"):
        needle_prompt(tok, 40, 0.5, "48213", bos=0)


def test_needle_answer_ends_at_a_stop_token(engine, tok, monkeypatch):
    """What the model writes after <｜end▁of▁sentence｜> is no part of its answer: needle() stops there
    (by default the tokenizer's EOS; here also the first token of the answer, so it ends at once)."""
    import v4jax.evaluate as evaluate
    seen, answers = [], []

    def recording(*args, **kw):
        seen.append(set(kw.get("stop_ids", ())))
        answers.append(generate(*args, **kw))
        return answers[-1]
    monkeypatch.setattr(evaluate, "generate", recording)
    evaluate.needle(engine, tok, lengths=[96], depths=[0.5], trials=1, batch=1, bos=0, progress=False)
    assert seen == [{tok.token_to_id("<｜end▁of▁sentence｜>")}]
    first = answers[0][0].tokens[0]
    r = evaluate.needle(engine, tok, lengths=[96], depths=[0.5], trials=1, batch=1, bos=0, stop_ids={first},
                        progress=False)
    assert r.samples[0]["answer"] == "" and not r.samples[0]["correct"]


def test_cli_needle_prints_accuracy_table(ckpt, tmp_path, capsys):
    ev = eval_cli()
    # lengths + 13 answer tokens fit MAX_LEN; both prefill 64 tokens (compiled once)
    ev.main(["needle", "--checkpoint", str(ckpt), "--lengths", "96,115", "--depths", "0,1", "--trials", "1",
             "--batch", "2", "--json", str(tmp_path / "n.json"), "--quiet"])
    out = capsys.readouterr().out
    assert "| depth \\ length | 96 | 115 |" in out and "| 0% |" in out and "| 100% |" in out
    r = json.loads((tmp_path / "n.json").read_text())
    assert np.array(r["accuracy"]).shape == (2, 2) and len(r["samples"]) == 4
    for s in r["samples"]:  # accuracy is what the answers say
        assert s["correct"] == (s["key"] in s["answer"])


# ------------------------------------------------------------------------------------------- lm-eval adapter

class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm(engine):
    from v4jax.lm_eval_adapter import V4JaxLM
    return V4JaxLM(engine=engine, tokenizer=TINY_TOKENIZER, batch_size=2, max_length=PAD, progress=False)


def test_adapter_loglikelihood(lm, engine, tok):
    reqs = [_Req("The sky is", " blue"), _Req("x = ", "1 + 2"), _Req("", "hello world"),
            _Req("The quick brown fox jum", "ps over")]
    got = lm.loglikelihood(reqs)
    # the split of lm-eval's HF / vLLM backends (TemplateLM._encode_pair): trailing whitespace moved to
    # the continuation; continuation tokens = encode(context + continuation) past len(encode(context))
    ctx4, cont4 = "The quick brown fox jum", "ps over"
    assert _ids(tok, ctx4) + _ids(tok, cont4) != _ids(tok, ctx4 + cont4)   # BPE merges across the cut
    for (ctx, cont), (lp, greedy) in zip([("The sky is", " blue"), ("x =", " 1 + 2"), ("", "hello world"),
                                          (ctx4, cont4)], got):
        tail = _ids(tok, ctx + cont)[len(_ids(tok, ctx)):]
        whole = [0] + _ids(tok, ctx) + tail
        n = len(tail)
        logp = _padded_logits(engine, whole[:-1])
        pos = range(len(whole) - 1 - n, len(whole) - 1)
        np.testing.assert_allclose(lp, sum(logp[p, whole[p + 1]] for p in pos), rtol=1e-5)
        assert greedy == all(int(np.argmax(logp[p])) == whole[p + 1] for p in pos)
    # "two sp" + "aces": the context's last token "p" and "aces" re-tokenise as " spa" "ces", so no
    # continuation token is left past the context's count; lm-eval's backends then give (0.0, True)
    assert _ids(tok, "two spaces")[len(_ids(tok, "two sp")):] == []
    assert lm.loglikelihood([_Req("two sp", "aces")]) == [(0.0, True)]


def test_adapter_rolling_and_generate_until(lm, engine, tok):
    text = "def add(a, b):\n    return a + b\n" * 6
    ids = [0] + _ids(tok, text)
    assert len(ids) > lm.max_length + 1                             # two windows
    want = 0.0
    for s, e, a in score_windows(len(ids), lm.max_length):
        lp = _padded_logits(engine, ids[s:e])
        want += sum(lp[j - 1 - s, ids[j]] for j in range(a, e + 1))
    got = lm.loglikelihood_rolling([_Req(text), _Req("")])
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    assert got[1] == 0.0                                            # no tokens: log p = 0, as lm-eval

    prompt = "Once upon a time"
    full = generate(engine, [[0] + _ids(tok, prompt)], max_new_tokens=8)[0].tokens
    stop = tok.decode(full[:4])[len(tok.decode(full[:2])):]
    assert stop
    expected = tok.decode(full).split(stop, 1)[0]
    got = lm.generate_until([_Req(prompt, {"until": [stop], "max_gen_toks": 8}),
                             _Req(prompt, {"until": [], "max_gen_toks": 8})])
    assert got == [expected, tok.decode(full)]
    assert lm.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<｜User｜>Hi<｜Assistant｜></think>"


def test_adapter_sampled_generation_does_not_depend_on_batch_size(lm, engine):
    from v4jax.lm_eval_adapter import V4JaxLM
    one = V4JaxLM(engine=engine, tokenizer=TINY_TOKENIZER, batch_size=1, max_length=PAD, progress=False)
    kw = {"until": [], "max_gen_toks": 5, "do_sample": True, "temperature": 1.0, "top_k": 50}
    reqs = [_Req(p, kw) for p in ("Once upon a time", "The sky is", "def f(x):")]
    assert lm.generate_until(reqs) == one.generate_until(reqs)              # batch_size 2 and 1


def test_adapter_batches_prompts_of_similar_lengths(lm, monkeypatch):
    """generate_until batches the longest prompts together (generate() prefills to a batch's shortest
    prompt and feeds the rest one token a step) and returns the results in the requests' order."""
    import v4jax.lm_eval_adapter as adapter
    from v4jax.generate import Generation
    calls = []

    def fake(engine, prompts, **kw):  # "generates" each prompt's last token
        calls.append([len(p) for p in prompts])
        return [Generation([p[-1]], "length") for p in prompts]
    monkeypatch.setattr(adapter, "generate", fake)
    texts = ["a", "a long prompt with many more words in it", "b", "another long prompt with many words"]
    got = lm.generate_until([_Req(t, {"until": [], "max_gen_toks": 2}) for t in texts])
    assert len(calls) == 2 and min(calls[0]) > 5 and max(calls[1]) < 5   # the two long ones, then the short
    assert got == [lm.tok.decode([lm._encode(t)[-1]]) for t in texts]    # each request's own result


def test_lm_eval_harness_runs_a_local_task(lm, tmp_path, monkeypatch):
    """A tiny multiple-choice task (YAML + JSONL written here) through lm-eval's own evaluator."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import v4jax.lm_eval_adapter as adapter
    assert issubclass(adapter.V4JaxLM, lm_eval.api.model.LM)
    from lm_eval.api.registry import get_model
    assert get_model("v4jax") is adapter.V4JaxLM
    rows = [{"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
            {"question": "Two plus two is", "choices": ["four", "five"], "answer": 1}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        "task: v4jax_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    res = lm_eval.simple_evaluate(model=lm, tasks=["v4jax_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    samples = res["samples"]["v4jax_tiny_mc"]
    want = []
    for s, row in zip(sorted(samples, key=lambda s: s["doc_id"]), rows):
        scores = [r[0][0] for r in s["resps"]]
        direct = lm.loglikelihood([_Req(row["question"], " " + c) for c in row["choices"]])
        np.testing.assert_allclose(scores, [d[0] for d in direct], rtol=1e-6)
        want.append(float(int(np.argmax(scores)) == row["answer"]))
    assert res["results"]["v4jax_tiny_mc"]["acc,none"] == pytest.approx(np.mean(want))
