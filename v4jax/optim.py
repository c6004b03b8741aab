"""Optimizer for V4 training: Muon (hybrid Newton–Schulz) on matrices, AdamW elsewhere.

`build_optimizer(cfg, params)` returns one optax chain:

    clip by global norm (over trainable leaves only) -> partition by `param_labels`:
      "muon"   Nesterov momentum -> hybrid Newton–Schulz per matrix -> update-RMS match
               -> decoupled weight decay -> -muon_lr(t)
      "adamw"  AdamW (decay only on 2-D leaves: embed, head, hc_*_fn) with -lr(t)
      "frozen" optax.set_to_zero()

Which leaf goes where is decided by `param_labels` from the dotted checkpoint name
(`layers.0.attn.wq_a.weight`): every `*.weight` with ndim >= 2 is Muon (attention,
compressor, indexer, gate, shared and stacked routed experts, the per-group `wo_a`),
except `embed` and `head`; mHC parameters (`hc_*`), norms, biases, `attn_sink` and `ape`
are AdamW (SPEC §6). The report lists embedding, head, RMSNorm weights and the mHC
static biases and gating factors for AdamW, which would put the 2-D `hc_*_fn` mapping
matrices under Muon: `OptimizerConfig.muon_hc_fn=True` does that. `ffn.gate.bias` is
frozen: the aux-loss-free balancing rule moves it outside the optimizer (train_step.py).
Integer leaves (`tid2eid`) and FP8 block `scale` tensors are frozen too: they are not
trainable values.

Muon as configured here (DeepSeek-V4 report, §2.4 Algorithm 1, and Moonlight):
  * momentum 0.95, Nesterov: m <- mu*m + g; d = g + mu*m (`optax.trace(nesterov=True)`).
  * hybrid Newton–Schulz, 10 steps: 8 x (3.4445, -4.7750, 2.0315) drive singular values
    into an oscillating band ~[0.68, 1.14] fast, then 2 x (2, -1.5, 0.5) settle them at
    1 (that map has f(1) = 1, f'(1) = 0, so f(1 + e) ~ 1 + e^2 / 2). The schedule is
    `cfg.ns_coeffs`. The input is divided by its Frobenius norm first; tall matrices
    are transposed so the Gram matrix X X^T is the small side. Leading dims ([E, out, in] experts, [G, r, H*hd/G] `wo_a`) are
    batch dims: each matrix is orthogonalised on its own.
  * update-RMS matching: update *= update_rms * sqrt(max(m, n)), default 0.18 (V4;
    Moonlight used 0.2), so an orthogonal update has RMS `update_rms`, like AdamW's,
    and Muon can share AdamW's learning rate and weight decay.
  * decoupled weight decay: W <- W - lr * (update + wd * W).

Why not `optax.contrib.muon` (0.2.8)? It does accept a per-step coefficient list and
batch dims (`MuonDimensionNumbers`), and its `consistent_rms` is the same RMS rule, but
it runs Newton–Schulz in the momentum dtype at default matmul precision (no fp32/bf16
choice; TPU/GPU default precision lowers fp32 matmuls to bf16/tf32 passes), uses a
bias-corrected EMA momentum, and bundles an AdamW with Nesterov and a 2-way ndim-based
split that cannot express the frozen gate bias. So the chain here is built from optax parts
(`trace`, `add_decayed_weights`, `scale_by_learning_rate`, `adamw`, `partition`) plus a
~20-line Newton–Schulz (`newton_schulz`) with an explicit dtype and precision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from v4jax import sharding

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"

# DeepSeek-V4 hybrid schedule: 8 fast quintic steps, then 2 settling steps.
V4_NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2

_NS_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters (defaults: DeepSeek-V4 / Moonlight where published).

    lr: peak AdamW learning rate; muon_lr: peak Muon learning rate (None -> lr, which
    update-RMS matching makes reasonable). Both follow the same schedule shape:
    `schedule="cosine"` (linear warmup, cosine to final_lr_fraction * peak at
    total_steps) or `"wsd"` (linear warmup, constant, then decay over the last
    decay_fraction * total_steps with decay_shape "linear" | "1-sqrt").
    eps=1e-20: the AdamW epsilon public V4 training reproductions take from the report.
    muon_hc_fn: send the 2-D mHC mapping matrices `hc_*_fn` to Muon instead of AdamW.
    clip_norm: global gradient-norm clip; None disables clipping.
    """

    lr: float = 3e-4
    muon_lr: float | None = None
    warmup_steps: int = 2000
    total_steps: int = 100_000
    schedule: str = "cosine"
    decay_fraction: float = 0.1
    decay_shape: str = "linear"
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-20
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    ns_coeffs: tuple[tuple[float, float, float], ...] = V4_NS_COEFFS
    ns_dtype: str = "float32"
    update_rms: float = 0.18
    clip_norm: float | None = 1.0
    muon_hc_fn: bool = False

    def __post_init__(self):
        def check(ok: bool, field: str, expected: str):
            if not ok:
                raise ValueError(
                    f"OptimizerConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        check(self.lr > 0, "lr", "> 0")
        check(self.muon_lr is None or self.muon_lr > 0, "muon_lr", "None or > 0")
        check(self.total_steps >= 1, "total_steps", ">= 1")
        check(0 <= self.warmup_steps < self.total_steps, "warmup_steps",
              f"0 <= warmup_steps < total_steps ({self.total_steps})")
        check(self.schedule in ("cosine", "wsd"), "schedule", "'cosine' or 'wsd'")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "in (0, 1]")
        check(self.decay_shape in ("linear", "1-sqrt"), "decay_shape", "'linear' or '1-sqrt'")
        if self.schedule == "wsd":
            check(self.warmup_steps + _decay_steps(self) <= self.total_steps, "decay_fraction",
                  f"warmup + decay steps <= total_steps ({self.total_steps})")
        check(0 <= self.final_lr_fraction <= 1, "final_lr_fraction", "in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(0 <= self.b1 < 1, "b1", "in [0, 1)")
        check(0 <= self.b2 < 1, "b2", "in [0, 1)")
        check(self.eps > 0, "eps", "> 0")
        check(0 <= self.muon_momentum < 1, "muon_momentum", "in [0, 1)")
        try:  # YAML gives lists of lists; store a hashable tuple of float triples.
            coeffs = tuple(tuple(float(v) for v in step) for step in self.ns_coeffs)
        except (TypeError, ValueError):
            coeffs = ()
        object.__setattr__(self, "ns_coeffs", coeffs)
        check(len(coeffs) > 0 and all(len(s) == 3 for s in coeffs), "ns_coeffs",
              "a non-empty sequence of (a, b, c) triples")
        check(self.ns_dtype in _NS_DTYPES, "ns_dtype", f"one of {sorted(_NS_DTYPES)}")
        check(self.update_rms > 0, "update_rms", "> 0")
        check(self.clip_norm is None or self.clip_norm > 0, "clip_norm", "None or > 0")


def _decay_steps(cfg: OptimizerConfig) -> int:
    return max(1, round(cfg.decay_fraction * cfg.total_steps))


# ----------------------------------------------------------------------------- schedules

def learning_rate_schedule(cfg: OptimizerConfig, peak: float | None = None) -> optax.Schedule:
    """step -> learning rate, jit-safe. Warmup: peak * t / warmup_steps (0 at t = 0).

    cosine: peak * (f + (1 - f) * (1 + cos(pi * p)) / 2), p = (t - warmup) / (total - warmup).
    wsd: peak until total - D, then p = (t - (total - D)) / D, D = decay_fraction * total,
         linear: peak * (1 - (1 - f) * p); 1-sqrt: peak * (f + (1 - f) * (1 - sqrt(p))).
    p is clipped to [0, 1], so the rate stays at f * peak after total_steps.
    """
    peak = cfg.lr if peak is None else peak
    f, warm, total = cfg.final_lr_fraction, cfg.warmup_steps, cfg.total_steps

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warmup = t / warm if warm > 0 else jnp.ones_like(t)
        if cfg.schedule == "cosine":
            p = jnp.clip((t - warm) / (total - warm), 0.0, 1.0)
            after = f + (1 - f) * 0.5 * (1 + jnp.cos(jnp.pi * p))
        else:
            d = _decay_steps(cfg)
            p = jnp.clip((t - (total - d)) / d, 0.0, 1.0)
            shape = p if cfg.decay_shape == "linear" else jnp.sqrt(p)
            after = 1 - (1 - f) * shape
        return peak * jnp.where(t < warm, warmup, after)

    return schedule


# ----------------------------------------------------------------------------- labels

def _path_str(path) -> str:
    """jax key path -> dotted checkpoint name; list indices and int dict keys alike."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    return ".".join(parts)


def _label(name: str, leaf, muon_hc_fn: bool) -> str:
    parts = name.split(".")
    last = parts[-1]
    if (not jnp.issubdtype(leaf.dtype, jnp.inexact) or name.endswith("ffn.gate.bias")
            or last in ("scale", "tid2eid")):
        return FROZEN
    if parts[0] in ("embed", "head"):
        return ADAMW
    if last.startswith("hc_"):
        return MUON if muon_hc_fn and last.endswith("_fn") and leaf.ndim >= 2 else ADAMW
    if last == "weight" and leaf.ndim >= 2:
        return MUON
    return ADAMW


def param_labels(params: Any, *, muon_hc_fn: bool = False) -> Any:
    """Same-structure pytree of "muon" | "adamw" | "frozen" (see module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _label(_path_str(path), x, muon_hc_fn), params)


def _decay_mask(params: Any) -> Any:
    """True where AdamW applies weight decay: 2-D matrices (embed, head, hc_*_fn), not
    norms, biases, sinks, hc base/scale (all 1-D) nor the positional bias `ape`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and _path_str(path).split(".")[-1] != "ape", params)


# ----------------------------------------------------------------------------- Muon

def newton_schulz(x: jax.Array, coeffs, *, dtype=jnp.float32, eps: float = 1e-7) -> jax.Array:
    """Approximate polar factor U V^T of each trailing matrix of x.

    x: [..., m, n] (leading dims are independent matrices); returns [..., m, n] in x.dtype.
    Each step maps X -> a X + (b A + c A^2) X with A = X X^T, i.e. every singular value
    s -> a s + b s^3 + c s^5, starting from X / ||X||_F (all s <= 1).
    coeffs: sequence of (a, b, c), one per step. dtype: float32 (HIGHEST precision
    matmuls) or bfloat16 (faster); the Frobenius normalisation is always float32.
    """
    tall = x.shape[-2] > x.shape[-1]
    y = x.astype(jnp.float32)
    if tall:  # work on the wide orientation so the Gram matrix is min(m, n) square
        y = jnp.swapaxes(y, -1, -2)
    y = y / (jnp.sqrt(jnp.sum(y * y, axis=(-2, -1), keepdims=True)) + eps)
    y = y.astype(dtype)
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    mm = lambda p, q: jnp.matmul(p, q, precision=prec)

    def step(y, abc):  # scan keeps the program one step long, not len(coeffs)
        a, b, c = abc[0], abc[1], abc[2]
        gram = mm(y, jnp.swapaxes(y, -1, -2))
        return a * y + mm(b * gram + c * mm(gram, gram), y), None

    y, _ = jax.lax.scan(step, y, jnp.asarray(coeffs, dtype))
    if tall:
        y = jnp.swapaxes(y, -1, -2)
    return y.astype(x.dtype)


def _role(path) -> str:
    """The dotted name with every integer part (layer, list index) as ``#``: ``layers.#.attn.wq_a.weight``."""
    return ".".join("#" if p.isdigit() else p for p in _path_str(path).split("."))


def orthogonalize_updates(coeffs, *, ns_dtype=jnp.float32, update_rms: float = 0.18,
                          shardings: dict[str, NamedSharding] | None = None) -> optax.GradientTransformation:
    """Stateless: u [..., m, n] -> newton_schulz(u) * update_rms * sqrt(max(m, n)).

    For an exactly orthogonal result (min(m, n) unit singular values) the output RMS is
    update_rms * sqrt(max(m, n)) * sqrt(min(m, n) / (m n)) = update_rms.

    Leaves of one role in every layer (``_role``: same name but for the layer index, hence the
    same shape and sharding) are stacked and orthogonalised as one batch: one Newton–Schulz loop
    per role instead of one per leaf (small.yaml: 34 instead of 198), each matrix on its own.

    ``shardings`` (dotted name -> the parameter's ``NamedSharding``, as ``build_optimizer`` finds them):
    the stacks of matrices split over a mesh are orthogonalised by ``sharding.per_matrix``, each device
    taking whole matrices, its share of them.
    """
    shardings = shardings or {}

    def update_fn(updates, state, params=None):
        del params

        def one(u, at_rest: NamedSharding | None, stacked: bool):
            scale = update_rms * math.sqrt(max(u.shape[-2:]))

            def ns(m):
                return newton_schulz(m, coeffs, dtype=ns_dtype) * jnp.asarray(scale, m.dtype)
            if at_rest is None:
                return ns(u)
            return sharding.per_matrix(ns, u, P(*((None,) if stacked else ()), *at_rest.spec), at_rest.mesh)

        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        groups: dict[tuple, list[int]] = {}
        for i, (path, u) in enumerate(flat):
            groups.setdefault((_role(path), u.shape, u.dtype), []).append(i)
        out = [None] * len(flat)
        for idx in groups.values():
            at_rest = shardings.get(_path_str(flat[idx[0]][0]))
            if len(idx) > 1:
                done = one(jnp.stack([flat[i][1] for i in idx]), at_rest, True)
            else:
                done = one(flat[idx[0]][1], at_rest, False)[None]
            for k, i in enumerate(idx):
                out[i] = done[k]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, coeffs, *, momentum: float = 0.95,
         nesterov: bool = True, ns_dtype=jnp.float32, update_rms: float = 0.18,
         weight_decay: float = 0.0, shardings: dict[str, NamedSharding] | None = None
         ) -> optax.GradientTransformation:
    """Muon for a pytree of matrices (ndim >= 2; leading dims are batch dims); ``shardings``: see
    ``orthogonalize_updates``."""
    return optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov),
        orthogonalize_updates(coeffs, ns_dtype=ns_dtype, update_rms=update_rms, shardings=shardings),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------- builder

def build_optimizer(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The full V4 optimizer for `params` (nested dict; lists or int-keyed dicts of layers).

    Use with `opt.init(params)` and `opt.update(grads, state, params)` (params are
    required: weight decay reads them). Leaves of `params` (arrays or `ShapeDtypeStruct`s) that carry a
    `NamedSharding` tell Muon how its matrices are split over the mesh.
    """
    labels = param_labels(params, muon_hc_fn=cfg.muon_hc_fn)
    placed = {_path_str(path): leaf.sharding for path, leaf in jax.tree_util.tree_leaves_with_path(params)
              if isinstance(getattr(leaf, "sharding", None), NamedSharding)}
    trainable = jax.tree.map(lambda lab: lab != FROZEN, labels)
    muon_peak = cfg.lr if cfg.muon_lr is None else cfg.muon_lr
    clip = (optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm is not None
            else optax.identity())
    return optax.chain(
        optax.masked(clip, trainable),  # frozen grads (gate bias) do not count to the norm
        optax.partition(
            {
                MUON: muon(learning_rate_schedule(cfg, muon_peak), cfg.ns_coeffs,
                           momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                           ns_dtype=_NS_DTYPES[cfg.ns_dtype], update_rms=cfg.update_rms,
                           weight_decay=cfg.weight_decay, shardings=placed),
                ADAMW: optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                                   eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   mask=_decay_mask),
                FROZEN: optax.set_to_zero(),
            },
            labels,
        ),
    )

