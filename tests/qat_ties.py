"""Rounding near-ties between two float32 implementations of QAT, resolved the reference's way.

QAT (SPEC §5) rounds activations to FP8 / FP4 grids. Two correct float32 implementations compute
an activation a few ulps apart (their operation orders differ), so a value next to a rounding
midpoint can round to one neighbour here and to the other in the reference. From that position on
the two trajectories separate: errors jump from ~3e-7 to ~1e-2 and spread to later positions through
the KV. Where this happens depends on both implementations' float32 operation order, the CPU type
included, so golden qat logits cannot be matched position for position by an independent
implementation.

``resolve`` checks the semantics exactly instead. It runs the model's prefill and MTP forward under
``quant.rounding_hook`` and finds each row's first position that disagrees with the reference. At
that position it lists the quantiser inputs within ``delta`` (relative) of a rounding midpoint. It
rounds the nearest one the other way, together with the equal values other linears quantise from
the same input. It keeps the change if the first disagreement moves later, and tries the next
candidate if not. It stops when every position agrees. It fails when no near-tie explains a
disagreement: a wrong grid, block, scale rule or any other wrong semantics is not explained by
values sitting on midpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from v4jax import quant

SLOTS = 8  # forced roundings per quantiser call (fixed, so the forward compiles once)


def _grid(name: str) -> np.ndarray:
    """Sorted finite values of the e4m3 / e2m1 grid."""
    if name == "e4m3":
        vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        vals = quant.FP4_VALUES
    return np.unique(vals[np.isfinite(vals)])


GRIDS = {name: _grid(name) for name in ("e4m3", "e2m1")}


@dataclass
class Flip:
    b: int            # batch row
    pos: int          # sequence position whose computation the value enters
    grid: str
    value: float      # the scaled value as computed here
    rounded: float    # the grid value it is rounded to instead (the reference's way)
    distance: float   # |value - midpoint| / |midpoint|
    calls: tuple      # (quantiser call, flat index) of every copy of the value


class _Hook:
    """``quant.rounding_hook`` function: records every quantiser's input, applies forced roundings."""

    def __init__(self, forced=None):
        self.forced, self.calls = forced, []

    def __call__(self, grid, v, q, rows):
        i = len(self.calls)
        self.calls.append((grid, v, rows))
        if self.forced is not None:
            idx, val = self.forced[i]
            q = q.reshape(-1).at[idx].set(val, mode="drop").reshape(q.shape)
        return q


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


class Resolver:
    """The forward (prefill logits and the first MTP block's logits, as ``eval.py logits`` writes
    them) of ``model`` on ``tokens [B, S+1]``, with forced roundings as inputs (compiled once)."""

    def __init__(self, model, tokens):
        self.B, S1 = tokens.shape
        self.S = S1 - 1
        self.ratios = sorted({m for m in model.cfg.compress_ratios if m})
        self.graphdef, self.state = nnx.split(model)
        self.tokens = jnp.asarray(tokens)
        hooks = []
        jax.eval_shape(lambda s, t: self._forward(s, t, None, hooks), self.state, self.tokens)
        self.meta = [(grid, v.shape) for grid, v, _ in hooks[0].calls]
        self._jit = jax.jit(lambda s, t, f: self._forward(s, t, f, []))

    def _forward(self, state, tokens, forced, hooks):
        model = nnx.merge(self.graphdef, state)
        with quant.rounding_hook(_Hook(forced)) as hook:
            hooks.append(hook)
            logits, X, _, _ = model(tokens[:, :self.S])
            mtp, _ = model.mtp_logits(X, tokens[:, 1:])
        return logits, mtp[0], [(v, rows) for _, v, rows in hook.calls]

    def run(self, flips: list[Flip]):
        """-> (prefill logits, MTP logits, [(scaled inputs, rows)] per quantiser call)."""
        per_call = {}
        for f in flips:
            for call, flat in f.calls:
                per_call.setdefault(call, []).append((flat, f.rounded))
        forced = []
        for call, (_, shape) in enumerate(self.meta):
            pairs = per_call.get(call, [])
            assert len(pairs) <= SLOTS, f"more than {SLOTS} forced roundings in quantiser call {call}"
            idx = np.full(SLOTS, np.prod(shape), np.int32)  # out of range: dropped
            val = np.zeros(SLOTS, np.float32)
            for k, (flat, rounded) in enumerate(pairs):
                idx[k], val[k] = flat, rounded
            forced.append((jnp.asarray(idx), jnp.asarray(val)))
        logits, mtp, inputs = self._jit(self.state, self.tokens, forced)
        return np.asarray(logits), np.asarray(mtp), [(np.asarray(v), None if r is None else np.asarray(r))
                                                      for v, r in inputs]

    def positions(self, shape, rows):
        """(batch row, sequence position) of each leading row of a quantiser input ``[..., n, block]``."""
        B, S, lead = self.B, self.S, shape[:-2]
        if rows is not None or lead[0] == B * S:  # token rows [B*S] (or permuted ones, named by rows)
            t = rows if rows is not None else np.arange(lead[0])
            inner = int(np.prod(lead[1:]))
            t = np.repeat(t, inner)
            return t // S, t % S
        assert lead[0] == B, shape
        n, inner = lead[1], int(np.prod(lead[2:]))
        b = np.repeat(np.arange(B), n * inner)
        j = np.tile(np.repeat(np.arange(n), inner), B)
        if n == S:
            return b, j
        ratio = [m for m in self.ratios if S // m == n]  # compressed entries: entry j completes at (j+1)·m-1
        assert len(ratio) == 1, (shape, self.ratios)
        return b, (j + 1) * ratio[0] - 1

    def near_ties(self, inputs, b: int, pos: int, delta: float) -> list[Flip]:
        """Values entering (b, pos) within ``delta`` of a rounding midpoint, nearest first; equal values
        at the same place in several quantiser calls (one input, several linears) are one Flip."""
        found = {}
        for call, ((v, rows), (grid, shape)) in enumerate(zip(inputs, self.meta)):
            bb, ss = self.positions(shape, rows)
            sel = np.nonzero((bb == b) & (ss == pos))[0]
            if not len(sel):
                continue
            vals = v.reshape(len(bb), -1)[sel]
            g = GRIDS[grid]
            k = np.clip(np.searchsorted(g, vals), 1, len(g) - 1)
            lo, hi = g[k - 1], g[k]
            mid = (lo.astype(np.float64) + hi) / 2
            dist = np.abs(vals - mid) / np.maximum(np.abs(mid), 1e-30)
            dtype = ml_dtypes.float8_e4m3fn if grid == "e4m3" else ml_dtypes.float4_e2m1fn
            for r, c in zip(*np.nonzero(dist < delta)):
                x = vals[r, c]
                here = np.float32(x.astype(dtype))
                other = float(hi[r, c] if here == lo[r, c] else lo[r, c])
                key = (grid, float(x), c)
                flip = found.setdefault(key, Flip(b, pos, grid, float(x), other, float(dist[r, c]), ()))
                flip.calls += ((call, int(sel[r] * vals.shape[1] + c)),)
        return sorted(found.values(), key=lambda f: f.distance)


def resolve(model, tokens, ref_prefill, ref_mtp, *, delta: float = 1e-5, tol: float = 1e-5,
            max_flips: int = 40):
    """-> (flips, prefill logits, MTP logits) with every position within ``tol`` of the reference
    (relative L2 over the vocabulary); AssertionError when a disagreement is not a near-tie."""
    res = Resolver(model, tokens)
    flips: list[Flip] = []

    def errors(prefill, mtp):
        return np.maximum(_rel(prefill, ref_prefill), _rel(mtp, ref_mtp))

    def first_bad(e):
        return [int(np.argmax(row > tol)) if (row > tol).any() else len(row) for row in e]

    prefill, mtp, inputs = res.run(flips)
    tried = set()
    while True:
        firsts = first_bad(errors(prefill, mtp))
        todo = [(b, p) for b, p in enumerate(firsts) if p < res.S]
        if not todo:
            return flips, prefill, mtp
        assert len(flips) + len(todo) <= max_flips, f"more than {max_flips} near-ties needed: {flips}"
        trial = []
        for b, p in todo:  # rows are independent: one candidate for each diverging row per run
            cands = [f for f in res.near_ties(inputs, b, p, delta) if (b, p, f.value, f.calls) not in tried]
            assert cands, (f"row {b} disagrees from position {p} on and no untried value there lies within "
                           f"{delta:g} of a rounding midpoint (after {len(flips)} near-ties)")
            tried.add((b, p, cands[0].value, cands[0].calls))
            trial.append(cands[0])
        prefill, mtp, inputs = res.run(flips + trial)
        after = first_bad(errors(prefill, mtp))
        kept = [f for f in trial if after[f.b] > f.pos]
        flips += kept
        if len(kept) < len(trial):
            prefill, mtp, inputs = res.run(flips)
