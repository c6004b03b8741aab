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

Command line: ``python eval.py qat-ties --checkpoint DIR --reference REF.npz [--out OUT.npz]`` (REF.npz
as ``eval.py logits`` writes it: ``tokens``, ``prefill_logits`` and, if the model has an MTP block,
``mtp_logits``).
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
class Tie:
    b: int            # batch row
    pos: int          # sequence position whose computation the value enters
    grid: str
    value: float      # the scaled value as computed here
    rounded: float    # the grid value it is rounded to instead (the reference's way)
    distance: float   # |value - midpoint| / |midpoint|
    calls: tuple      # (quantiser call, flat index) of every copy of the value


class Unexplained(Exception):
    """A disagreement with the reference that no near-tie explains."""


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


def rel_errors(a, b):
    """Per position ``|a - b| / |b|`` (L2 over the last axis), as ``compare.py`` computes it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


class Resolver:
    """The forward of ``eval.py logits`` (prefill logits of ``tokens[:, :S]`` and, with ``mtp``, the
    first MTP block's logits with input tokens ``tokens[:, 1:S+1]``) of a qat ``model``, with forced
    roundings as inputs: compiled once for all of them."""

    def __init__(self, model, tokens, S: int, *, mtp: bool):
        if not model.numerics.qat:
            raise ValueError(f"near-ties are a qat question; the model runs in {model.numerics.mode!r} mode")
        self.B, self.S, self.mtp = tokens.shape[0], S, mtp
        self.ratios = sorted({m for m in model.cfg.compress_ratios if m})
        self.graphdef, self.state = nnx.split(model)
        self.tokens = jnp.asarray(tokens[:, :S + 1] if mtp else tokens[:, :S])
        hooks = []
        jax.eval_shape(lambda s, t: self._forward(s, t, None, hooks), self.state, self.tokens)
        self.meta = [(grid, v.shape) for grid, v, _ in hooks[0].calls]
        self._jit = jax.jit(lambda s, t, f: self._forward(s, t, f, []))

    def _forward(self, state, tokens, forced, hooks):
        model = nnx.merge(self.graphdef, state)
        with quant.rounding_hook(_Hook(forced)) as hook:
            hooks.append(hook)
            logits, X, _, _ = model(tokens[:, :self.S])
            mtp = model.mtp_logits(X, tokens[:, 1:])[0][0] if self.mtp else None
        return logits, mtp, [(v, rows) for _, v, rows in hook.calls]

    def run(self, ties: list[Tie]):
        """-> (prefill logits, MTP logits or None, [(scaled inputs, rows)] per quantiser call)."""
        per_call = {}
        for t in ties:
            for call, flat in t.calls:
                per_call.setdefault(call, []).append((flat, t.rounded))
        forced = []
        for call, (_, shape) in enumerate(self.meta):
            pairs = per_call.get(call, [])
            if len(pairs) > SLOTS:
                raise Unexplained(f"more than {SLOTS} near-ties in one quantiser's input (call {call})")
            idx = np.full(SLOTS, np.prod(shape), np.int32)  # out of range: dropped
            val = np.zeros(SLOTS, np.float32)
            for k, (flat, rounded) in enumerate(pairs):
                idx[k], val[k] = flat, rounded
            forced.append((jnp.asarray(idx), jnp.asarray(val)))
        logits, mtp, inputs = self._jit(self.state, self.tokens, forced)
        return (np.asarray(logits), None if mtp is None else np.asarray(mtp),
                [(np.asarray(v), None if r is None else np.asarray(r)) for v, r in inputs])

    def positions(self, shape, rows):
        """(batch row, sequence position) of each leading row of a quantiser input ``[..., n, block]``."""
        B, S, lead = self.B, self.S, shape[:-2]
        if rows is not None or lead[0] == B * S:  # token rows [B*S] (or reordered ones, named by rows)
            t = rows if rows is not None else np.arange(lead[0])
            t = np.repeat(t, int(np.prod(lead[1:])))
            return t // S, t % S
        if lead[0] != B:
            raise ValueError(f"a quantiser input of shape {shape} is neither per token nor per entry")
        n, inner = lead[1], int(np.prod(lead[2:]))
        b = np.repeat(np.arange(B), n * inner)
        j = np.tile(np.repeat(np.arange(n), inner), B)
        if n == S or n == 0:
            return b, j
        ratio = [m for m in self.ratios if S // m == n]  # compressed entries: entry j completes at (j+1)·m-1
        if len(ratio) != 1:
            raise ValueError(f"a quantiser input of shape {shape}: {n} entries match no single compress ratio")
        return b, (j + 1) * ratio[0] - 1

    def near_ties(self, inputs, b: int, pos: int, delta: float) -> list[Tie]:
        """Values entering (b, pos) within ``delta`` of a rounding midpoint, nearest first; equal values
        at the same place in several quantiser calls (one input, several linears) are one Tie."""
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
                key = (grid, float(x), int(r), int(c))
                tie = found.setdefault(key, Tie(b, pos, grid, float(x), other, float(dist[r, c]), ()))
                tie.calls += ((call, int(sel[r] * vals.shape[1] + c)),)
        return sorted(found.values(), key=lambda t: t.distance)


def resolve(model, tokens, ref_prefill, ref_mtp=None, *, delta: float = 1e-5, tol: float = 1e-5,
            max_ties: int = 40, report=None):
    """Round near-ties the reference's way until every position agrees.

    ``tokens [B, >=S+1]``, ``ref_prefill [B, S, V]``, ``ref_mtp [B, S, V]`` or None (not compared).
    Returns (ties, prefill logits, MTP logits or None), every position within ``tol`` of the
    reference (relative L2 over the vocabulary). Raises ``Unexplained`` when a row's first
    disagreement has no untried value within ``delta`` (relative) of a rounding midpoint, or more than
    ``max_ties`` are needed. ``report(first_disagreements, ties, prefill, mtp)`` is called before each
    round (the first call: the logits without any forced rounding).
    """
    S = ref_prefill.shape[1]
    res = Resolver(model, tokens, S, mtp=ref_mtp is not None)
    ties: list[Tie] = []

    def firsts(prefill, mtp):
        e = rel_errors(prefill, ref_prefill)
        if mtp is not None:
            e = np.maximum(e, rel_errors(mtp, ref_mtp))
        return [int(np.argmax(row > tol)) if (row > tol).any() else S for row in e]

    prefill, mtp, inputs = res.run(ties)
    tried = set()
    while True:
        first = firsts(prefill, mtp)
        if report is not None:
            report(first, ties, prefill, mtp)
        todo = [(b, p) for b, p in enumerate(first) if p < S]
        if not todo:
            return ties, prefill, mtp
        if len(ties) + len(todo) > max_ties:
            raise Unexplained(f"more than {max_ties} near-ties needed (first disagreements {first})")
        trial = []
        for b, p in todo:  # rows are independent: one candidate for each disagreeing row per run
            cands = [t for t in res.near_ties(inputs, b, p, delta) if (b, p, t.value, t.calls) not in tried]
            if not cands:
                raise Unexplained(f"row {b} disagrees from position {p} on, and no untried value there lies "
                                  f"within {delta:g} of a rounding midpoint (after {len(ties)} near-ties)")
            tried.add((b, p, cands[0].value, cands[0].calls))
            trial.append(cands[0])
        prefill, mtp, inputs = res.run(ties + trial)
        after = firsts(prefill, mtp)
        kept = [t for t in trial if after[t.b] > t.pos]
        ties += kept
        if len(kept) < len(trial):
            prefill, mtp, inputs = res.run(ties)
