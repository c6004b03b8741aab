"""Golden parity through the public entry points: ``eval.py logits`` + ``../shared/golden/compare.py``.

exact: compare.py must pass (prefill, decode, MTP), with the plain-JAX attention and experts and with
the Pallas kernels (attention and grouped matmul, interpret mode) on the released FP8/FP4 layout.

qat: the QAT forward rounds activations to FP8/FP4 grids, so an element whose value lies within
float32 noise (~4e-7 relative) of a rounding midpoint can round differently here and in the
reference; from that position on the two trajectories separate (errors jump from ~1e-7 to ~1e-2).
This is inherent to comparing two independent fp32 implementations of QAT, and is reported by
compare.py. Example, found by instrumenting the fake quantisers: row 1 of the golden data diverges
at position 46 because one element of layer 1's attention input, scaled, is 41.99998 — 3 float32
ulps below the e4m3 midpoint 42 between 40 and 44 — which rounds down here and up in the
reference; nudging that one element across the midpoint makes the rest of the row agree to 3e-7. What the test asserts is what identifies correct QAT semantics: every position before a
row's first divergence agrees to 1e-5 (a missing or wrong quantiser breaks agreement from the first
positions where it acts), the first divergence comes late, and compare.py's median criterion holds.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def _eval(golden, tmp_path, mode, *extra, env=None):
    ref = np.load(golden / "tiny" / f"reference_{'exact' if mode == 'production' else mode}.npz")
    tok = tmp_path / "tokens.npy"
    np.save(tok, ref["tokens"])
    out = tmp_path / f"{mode}.npz"
    case = json.loads((golden / "tiny" / "case.json").read_text())
    cmd = [sys.executable, str(REPO / "eval.py"), "logits", "--checkpoint", str(golden / "tiny" / "checkpoint"),
           "--tokens", str(tok), "--prefill", str(case["prefill_len"]), "--decode", str(case["decode_steps"]),
           "--mode", mode, "--out", str(out), "--quiet", *extra]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env)
    return ref, np.load(out)


def _compare(golden, out, mode):
    p = subprocess.run([sys.executable, str(golden / "compare.py"), str(golden / "tiny" / f"reference_{mode}.npz"),
                        str(out), "--mode", mode], capture_output=True, text=True)
    print(p.stdout)
    return p.returncode, p.stdout


def _rel(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--attention-impl", "pallas", "--layout", "released"]], ids=["xla", "pallas-released"])
def test_golden_exact(golden, tmp_path, extra):
    _eval(golden, tmp_path, "exact", *extra)
    rc, out = _compare(golden, tmp_path / "exact.npz", "exact")
    assert rc == 0, out


@pytest.mark.slow
def test_golden_exact_split_over_a_device_mesh(golden, tmp_path):
    """eval.py --mesh: weights split over 4 host devices (routed experts expert-parallel, heads and
    vocabulary over tensor), released layout; compare.py must pass as on one device."""
    import os

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    _eval(golden, tmp_path, "exact", "--layout", "released", "--mesh", "expert=2,tensor=2", env=env)
    rc, out = _compare(golden, tmp_path / "exact.npz", "exact")
    assert rc == 0, out


@pytest.mark.slow
def test_golden_qat(golden, tmp_path):
    ref, got = _eval(golden, tmp_path, "qat")
    rc, out = _compare(golden, tmp_path / "qat.npz", "qat")
    for key, min_prefix in [("prefill_logits", 24), ("mtp_logits", 16)]:
        e = _rel(got[key], ref[key])
        for row in e:
            bad = np.nonzero(row > 1e-3)[0]
            first = bad[0] if len(bad) else len(row)
            assert first >= min_prefix, f"{key}: diverges at position {first}"
            assert row[:first].max() <= 1e-5, f"{key}: prefix error {row[:first].max():.2e}"
    assert np.median(_rel(got["prefill_logits"], ref["prefill_logits"])) <= 1e-3


@pytest.mark.slow
def test_golden_production_report(golden, tmp_path, capsys):
    """production (bf16) mode against the exact golden: reported, not asserted beyond sanity."""
    ref, got = _eval(golden, tmp_path, "production")
    lines = []
    for key in ("prefill_logits", "decode_logits", "mtp_logits"):
        assert np.isfinite(got[key]).all()
        e = _rel(got[key], ref[key])
        agree = (got[key].argmax(-1) == ref[key].argmax(-1)).mean()
        lines.append(f"production vs exact golden, {key}: median rel error {np.median(e):.3e}, "
                     f"argmax agreement {agree:.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
