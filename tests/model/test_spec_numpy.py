"""v4jax against an independent float64 numpy reference (``tests/spec_numpy.py``, written from
SPEC.md alone, sharing no code with v4jax).

(a) The reference itself passes the golden data (``golden/tiny``, compare.py's exact limits, plus
    the per-block residual states ``layer_out``), so it can be trusted on other shapes.
(b) ``eval.py logits --mode exact`` (prefill, decode, MTP) on random checkpoints in the released
    layout of configurations the golden checkpoint does not cover, judged by compare.py with the
    reference's logits as the reference file.
"""
import subprocess
import sys

import chex
import numpy as np
import pytest

import spec_numpy
from conftest import REPO, small_config, write_random_checkpoint


def _rel_err(cand, ref):
    """compare.py's per-position error: L2 over the last axis, relative to the reference."""
    cand, ref = np.asarray(cand, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(cand - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def _compare(golden, reference, candidate):
    p = subprocess.run([sys.executable, str(golden / "compare.py"), str(reference), str(candidate), "--mode", "exact"],
                       capture_output=True, text=True)
    print(p.stdout)
    return p.returncode, p.stdout


def _reference_logits(cfg, w, tokens, prefill, decode):
    """prefill / decode / MTP logits the way ``eval.py logits`` lays them out: decode at position t
    equals a prefill's logits at t (SPEC §3), MTP reads tokens[:, 1:prefill+1]."""
    logits, state = spec_numpy.forward(cfg, w, tokens[:, :prefill])
    out = {"prefill_logits": logits, "mtp_logits": spec_numpy.mtp_logits(cfg, w, state, tokens[:, 1:prefill + 1])}
    if decode:
        out["decode_logits"] = spec_numpy.forward(cfg, w, tokens[:, :prefill + decode])[0][:, prefill:]
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_reference_matches_golden(golden, tmp_path):
    ref = np.load(golden / "tiny" / "reference_exact.npz")
    tokens, S, D = ref["tokens"], ref["prefill_logits"].shape[1], ref["decode_logits"].shape[1]
    cfg, w = spec_numpy.load(golden / "tiny" / "checkpoint")

    _, _, layers = spec_numpy.forward(cfg, w, tokens[:, :S], return_layers=True)
    chex.assert_shape(layers, ref["layer_out"].shape)
    for i in range(layers.shape[0]):  # every block's residual state, well below the logits' limits
        e = _rel_err(layers[i], ref["layer_out"][i])
        assert np.median(e) < 1e-5 and e.max() < 1e-4, (i, np.median(e), e.max())

    out = _reference_logits(cfg, w, tokens, S, D)
    np.savez(tmp_path / "spec_numpy.npz", **out)
    rc, text = _compare(golden, golden / "tiny" / "reference_exact.npz", tmp_path / "spec_numpy.npz")
    assert rc == 0, text


# Chosen to cover what golden/tiny (hc 4, ratios [0, 4, 128, 4 | MTP 0], window 16, FP4 experts,
# one hash layer, G 2) does not. Each: (small_config overrides, prefill S, batch, decode steps).
CASES = {
    # hc 3; CSA as layer 0; HCA ratios 8 / 16 and an MTP block with ratio 8; S not a multiple of
    # the ratios; index_topk 2 (smaller than the entries); two hash layers; one output group.
    "hc3-csa-first-hca8-16-mtp8": (dict(num_hidden_layers=4, compress_ratios=[4, 8, 16, 4, 8], hc_mult=3,
                                        num_hash_layers=2, o_groups=1, index_topk=2), 53, 2, 4),
    # BF16 checkpoint (no quantization_config, no expert_dtype); hc 2; window > S; index_topk >
    # entries; HCA ratio 32; no shared expert, no hash layer; H 4 = G 4; rd 32; batch 1.
    "bf16-hc2-wide-window-topk64": (dict(hc_mult=2, quantization_config=None, expert_dtype=None, n_shared_experts=0,
                                         num_hash_layers=0, sliding_window=64, index_topk=64,
                                         compress_ratios=[0, 4, 32, 4], qk_rope_head_dim=32, num_attention_heads=4,
                                         o_groups=4), 45, 1, 8),
    # consecutive HCA-128 layers (first layer compressed) and an MTP block with ratio 128; FP8
    # routed experts; a SwiGLU limit small enough that the clamp acts.
    "hca128x2-mtp128-fp8experts-clamp": (dict(num_hidden_layers=3, compress_ratios=[128, 128, 4, 128], sliding_window=16,
                                              hc_mult=4, expert_dtype="fp8", swiglu_limit=0.05), 140, 2, 4),
    # hc 1; widths that are not multiples of the 128 FP8 block / spread over several blocks; H 8,
    # G 2; hd 128 with index_head_dim 64; 8 experts top-3; two shared experts; window 4.
    "hc1-odd-widths-e8k3-shared2": (dict(hidden_size=192, q_lora_rank=160, moe_intermediate_size=96, o_lora_rank=136,
                                         head_dim=128, index_head_dim=64, index_n_heads=4, num_attention_heads=8,
                                         o_groups=2, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                                         hc_mult=1, compress_ratios=[0, 4, 4, 0], sliding_window=4), 41, 2, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_v4jax_matches_reference(golden, tmp_path, name):
    over, S, B, D = CASES[name]
    write_random_checkpoint(tmp_path / "ckpt", small_config(**over), seed=0)
    cfg, w = spec_numpy.load(tmp_path / "ckpt")
    tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(B, S + D + 1)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    np.savez(tmp_path / "reference.npz", tokens=tokens, **_reference_logits(cfg, w, tokens, S, D))

    subprocess.run([sys.executable, str(REPO / "eval.py"), "logits", "--checkpoint", str(tmp_path / "ckpt"),
                    "--tokens", str(tmp_path / "tokens.npy"), "--prefill", str(S), "--decode", str(D),
                    "--mode", "exact", "--out", str(tmp_path / "v4jax.npz"), "--quiet"], check=True, cwd=tmp_path)
    rc, text = _compare(golden, tmp_path / "reference.npz", tmp_path / "v4jax.npz")
    assert rc == 0, text
