"""Tests for v4jax/optim.py: Newton–Schulz spectra, partition, RMS matching, schedules."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import optim
from v4jax.optim import OptimizerConfig

FAST = ((3.4445, -4.7750, 2.0315),) * 8
SETTLE = ((2.0, -1.5, 0.5),) * 2
HYBRID = FAST + SETTLE
SHAPES = {"square": (48, 48), "tall": (96, 32), "wide": (32, 96), "stack": (3, 40, 24)}


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# ----------------------------------------------------------------------------- Newton–Schulz

@pytest.mark.parametrize("kind", ["square", "tall", "wide"])
def test_newton_schulz_is_the_scalar_map_on_singular_values(kind):
    """NS acts on X = U S V^T as U p(S / ||X||_F) V^T with p the composed polynomials."""
    x = _rand(SHAPES[kind], seed=1)
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    p = s / np.sqrt((s ** 2).sum())
    for a, b, c in HYBRID:
        p = a * p + b * p ** 3 + c * p ** 5
    expected = (u * p) @ vt
    got = optim.newton_schulz(jnp.asarray(x), HYBRID)
    chex.assert_shape(got, x.shape)
    chex.assert_trees_all_close(np.asarray(got, np.float64), expected, atol=2e-5)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_hybrid_schedule_drives_singular_values_to_one(kind):
    """Measured bounds, and why they hold.

    The quintic (3.4445, -4.775, 2.0315) grows small s by ~3.44x per step but overshoots:
    s in (0, 1] ends up oscillating in a band ~[0.68, 1.14] (measured 0.6818..1.1344),
    so after the fast phase we assert [0.65, 1.15]. The settling map
    g(s) = 2s - 1.5 s^3 + 0.5 s^5 has g(1) = 1, g'(1) = 0, g''(1) = 1, i.e.
    g(1 + e) ~ 1 + e^2 / 2: the band edges go 0.68 -> 0.962 -> 1.0005 and
    1.14 -> 1.019 -> 1.0002, so after both settling steps |s - 1| <= 1e-3.
    (Inputs here have smallest s / ||X||_F >= 1e-4, which 8 fast steps lift.)
    """
    x = jnp.asarray(_rand(SHAPES[kind], seed=2))
    s_fast = _svals(optim.newton_schulz(x, FAST))
    assert 0.65 <= s_fast.min() and s_fast.max() <= 1.15, (s_fast.min(), s_fast.max())
    s_full = _svals(optim.newton_schulz(x, HYBRID))
    assert np.abs(s_full - 1).max() <= 1e-3, np.abs(s_full - 1).max()
    # bf16 iterations: ~3 significant digits per matmul, measured |s - 1| <= 7e-3.
    s_bf16 = _svals(optim.newton_schulz(x, HYBRID, dtype=jnp.bfloat16))
    assert np.abs(s_bf16 - 1).max() <= 2e-2


def test_stack_is_orthogonalised_per_matrix():
    """[E, out, in] experts and [G, r, H*hd/G] wo_a: each slice alone == slice of stack."""
    for shape in [(3, 40, 24), (2, 16, 48)]:
        x = jnp.asarray(_rand(shape, seed=3))
        stacked = optim.newton_schulz(x, HYBRID)
        alone = jnp.stack([optim.newton_schulz(x[i], HYBRID) for i in range(shape[0])])
        chex.assert_trees_all_close(stacked, alone, atol=1e-5)
        # The Muon transform (incl. RMS scale sqrt(max(out, in))) is per matrix too.
        tx = optim.orthogonalize_updates(HYBRID, update_rms=0.2)
        out, _ = tx.update({"w": x}, tx.init({"w": x}))
        per, _ = tx.update({i: x[i] for i in range(shape[0])}, tx.init(None))
        chex.assert_trees_all_close(out["w"], jnp.stack([per[i] for i in range(shape[0])]),
                                    atol=1e-5)


def test_same_role_matrices_of_all_layers_share_one_loop():
    """One role in every layer (``layers.#.attn.wq.weight``) is orthogonalised as one stacked batch:
    one Newton-Schulz loop per role, and each matrix's update is what it gets alone."""
    rho = 0.18
    updates = {"layers": [{"attn": {"wq": {"weight": jnp.asarray(_rand((24, 40), seed=10 + i))}},
                           "ffn": {"experts": {"w1": jnp.asarray(_rand((3, 16, 8), seed=20 + i))}}}
                          for i in range(4)],
               "head": {"weight": jnp.asarray(_rand((24, 40), seed=30))}}  # same shape, another role
    tx = optim.orthogonalize_updates(HYBRID, update_rms=rho)
    out, _ = tx.update(updates, tx.init(updates))

    def alone(path, u):
        return optim.newton_schulz(u, HYBRID) * (rho * np.sqrt(max(u.shape[-2:])))
    chex.assert_trees_all_close(out, jax.tree_util.tree_map_with_path(alone, updates), atol=1e-5)
    text = jax.jit(lambda u: tx.update(u, None)[0]).lower(updates).as_text()
    assert text.count("stablehlo.while") == 3   # wq, experts.w1, head


_PER_MATRIX_SCRIPT = """
import re
import chex, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from v4jax import optim, sharding

rng = np.random.default_rng(0)
# 3 layers' [40, 16] matrix split by its width like an FSDP parameter and copied over `data` (3 layers
# padded to 8: one per device); experts [5 layers, 8, 16, 24] split over `expert` and by width over
# `fsdp`; a lone matrix, replicated; then on a mesh with `tensor`, a stack split along both dims
ups = {"layers": [{"w": jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)} for _ in range(3)],
       "experts": jnp.asarray(rng.normal(size=(5, 8, 16, 24)), jnp.float32),
       "lone": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32),
       "both": jnp.asarray(rng.normal(size=(3, 16, 40)), jnp.float32)}
want, _ = jax.jit(optim.orthogonalize_updates(optim.V4_NS_COEFFS).update)(ups, None)  # one device
for shape, both in (((2, 2, 2, 1), P()), ((1, 2, 2, 2), P(None, "tensor", ("fsdp", "expert")))):
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.AXES)
    at_rest = {"layers": [{"w": P(None, ("fsdp", "expert"))}] * 3, "experts": P(None, "expert", None, "fsdp"),
               "lone": P(), "both": both}
    at_rest = jax.tree.map(lambda s: NamedSharding(mesh, s), at_rest, is_leaf=lambda x: isinstance(x, P))
    placed = jax.device_put(ups, at_rest)
    names = {optim._path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(at_rest)}
    tx = optim.orthogonalize_updates(optim.V4_NS_COEFFS, shardings=names)
    with jax.set_mesh(mesh):
        step = jax.jit(tx.update).lower(placed, None).compile()
        got, _ = step(placed, None)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    if shape[0] == 2:
        # each device's Gram matrices (XLA drops unit dims): one of the 3 layers' [16, 16] (the tall
        # [40, 16] works on its transpose), 5 layers x 1 of its 2 experts [16, 16]; never a whole
        # stack, nor a partial sum
        grams = set(re.findall(r"f32\\[([\\d,]+)\\]\\{[^}]*\\} (?:dot|convolution)\\(", step.as_text()))
        assert {"16,16", "5,16,16"} <= grams, grams
        assert not {"3,16,16", "8,16,16", "5,2,16,16", "5,4,16,16", "10,16,16", "5,8,16,16"} & grams, grams
print("ok")
"""


def test_muon_splits_each_stack_of_matrices_over_the_mesh():
    """On a mesh, Newton-Schulz runs on whole matrices, each device a share of each stack
    (``sharding.per_matrix``), with the values of one device; XLA left to itself gathers every
    stack onto every device (V4-Flash: 5.4 GiB per chip for each of the largest)."""
    from conftest import run_on_host_devices

    out = run_on_host_devices(_PER_MATRIX_SCRIPT, 8, env={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32), (3, 48, 24)])
def test_update_rms_matching(shape):
    """For O = U diag(s) V^T ([m, n], r = min(m, n)): RMS(O) = sqrt(sum s^2 / (m n)), so
    RMS(rho * sqrt(max(m, n)) * O) = rho * sqrt(mean(s^2)) -> rho when all s = 1."""
    rho = 0.18
    x = jnp.asarray(_rand(shape, seed=4))
    tx = optim.orthogonalize_updates(HYBRID, update_rms=rho)
    out, _ = tx.update(x, tx.init(x))
    m, n = shape[-2:]
    s = _svals(optim.newton_schulz(x, HYBRID))  # [..., r]
    expected = rho * np.sqrt(max(m, n)) * np.sqrt((s ** 2).sum(-1) / (m * n))
    rms = np.sqrt(np.mean(np.asarray(out, np.float64) ** 2, axis=(-2, -1)))
    np.testing.assert_allclose(rms, expected, rtol=1e-5)
    np.testing.assert_allclose(rms, rho, rtol=1e-3)


# ----------------------------------------------------------------------------- partition

D, HC, E, V = 8, 2, 3, 16


def _z(*shape, dtype=np.float32):
    return np.full(shape, 0.5, dtype)


def _block(hash_gate=False):
    compressor = {"ape": _z(4, 8), "wkv": {"weight": _z(8, D)}, "wgate": {"weight": _z(8, D)},
                  "norm": {"weight": _z(4)}}
    gate = {"weight": _z(E, D)}
    gate.update({"tid2eid": np.zeros((V, 2), np.int32)} if hash_gate else {"bias": _z(E)})
    return {
        "attn_norm": {"weight": _z(D)}, "ffn_norm": {"weight": _z(D)},
        "hc_attn_fn": _z((2 + HC) * HC, HC * D), "hc_attn_base": _z((2 + HC) * HC),
        "hc_attn_scale": _z(3),
        "hc_ffn_fn": _z((2 + HC) * HC, HC * D), "hc_ffn_base": _z((2 + HC) * HC),
        "hc_ffn_scale": _z(3),
        "attn": {
            "wq_a": {"weight": _z(4, D)}, "q_norm": {"weight": _z(4)},
            "wq_b": {"weight": _z(8, 4)}, "wkv": {"weight": _z(4, D)},
            "kv_norm": {"weight": _z(4)}, "wo_a": {"weight": _z(2, 4, 4)},
            "wo_b": {"weight": _z(D, 8)}, "attn_sink": _z(2),
            "compressor": compressor,
            "indexer": {"wq_b": {"weight": _z(8, 4)}, "weights_proj": {"weight": _z(2, D)},
                        "compressor": dict(compressor)},
        },
        "ffn": {
            "gate": gate,
            "experts": {w: {"weight": _z(E, 6, D) if w != "w2" else _z(E, D, 6)}
                        for w in ("w1", "w2", "w3")},
            "shared_experts": {w: {"weight": _z(6, D) if w != "w2" else _z(D, 6)}
                               for w in ("w1", "w2", "w3")},
        },
    }


def make_params(int_keyed: bool):
    layers = [_block(hash_gate=True), _block()]
    mtp = _block()
    mtp.update({"e_proj": {"weight": _z(D, D)}, "h_proj": {"weight": _z(D, D)},
                "enorm": {"weight": _z(D)}, "hnorm": {"weight": _z(D)}, "norm": {"weight": _z(D)},
                "hc_head_fn": _z(HC, HC * D), "hc_head_base": _z(HC), "hc_head_scale": _z(1)})
    return {
        "embed": {"weight": _z(V, D)}, "head": {"weight": _z(V, D)}, "norm": {"weight": _z(D)},
        "hc_head_fn": _z(HC, HC * D), "hc_head_base": _z(HC), "hc_head_scale": _z(1),
        "layers": dict(enumerate(layers)) if int_keyed else layers,
        "mtp": {0: mtp} if int_keyed else [mtp],
    }


BLOCK_EXPECT = {
    "attn_norm.weight": "adamw", "ffn_norm.weight": "adamw",
    "hc_attn_fn": "adamw", "hc_attn_base": "adamw", "hc_attn_scale": "adamw",
    "hc_ffn_fn": "adamw", "hc_ffn_base": "adamw", "hc_ffn_scale": "adamw",
    "attn.wq_a.weight": "muon", "attn.q_norm.weight": "adamw", "attn.wq_b.weight": "muon",
    "attn.wkv.weight": "muon", "attn.kv_norm.weight": "adamw", "attn.wo_a.weight": "muon",
    "attn.wo_b.weight": "muon", "attn.attn_sink": "adamw",
    "ffn.gate.weight": "muon",
    **{f"ffn.experts.{w}.weight": "muon" for w in ("w1", "w2", "w3")},
    **{f"ffn.shared_experts.{w}.weight": "muon" for w in ("w1", "w2", "w3")},
    "attn.indexer.wq_b.weight": "muon", "attn.indexer.weights_proj.weight": "muon",
}
for _pre in ("attn.compressor.", "attn.indexer.compressor."):
    BLOCK_EXPECT.update({_pre + "ape": "adamw", _pre + "wkv.weight": "muon",
                         _pre + "wgate.weight": "muon", _pre + "norm.weight": "adamw"})


def expected_labels():
    exp = {"embed.weight": "adamw", "head.weight": "adamw", "norm.weight": "adamw",
           "hc_head_fn": "adamw", "hc_head_base": "adamw", "hc_head_scale": "adamw"}
    for pre in ("layers.0.", "layers.1.", "mtp.0."):
        exp.update({pre + k: v for k, v in BLOCK_EXPECT.items()})
    exp["layers.0.ffn.gate.tid2eid"] = "frozen"  # hash layer: int table, no bias
    exp["layers.1.ffn.gate.bias"] = "frozen"
    exp["mtp.0.ffn.gate.bias"] = "frozen"
    exp.update({"mtp.0.e_proj.weight": "muon", "mtp.0.h_proj.weight": "muon",
                "mtp.0.enorm.weight": "adamw", "mtp.0.hnorm.weight": "adamw",
                "mtp.0.norm.weight": "adamw", "mtp.0.hc_head_fn": "adamw",
                "mtp.0.hc_head_base": "adamw", "mtp.0.hc_head_scale": "adamw"})
    return exp


def flatten(tree, prefix=""):
    """Nested dict/list -> {dotted name: leaf}, written independently of optim._path_str."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else None
    if items is None:
        return {prefix[:-1]: tree}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    return out


@pytest.mark.parametrize("int_keyed", [False, True])
def test_param_labels(int_keyed):
    params = make_params(int_keyed)
    got = flatten(optim.param_labels(params))
    assert got == expected_labels()
    # Opt-in: the 2-D mHC mapping matrices go to Muon, bases and scales stay AdamW.
    got_hc = flatten(optim.param_labels(params, muon_hc_fn=True))
    changed = {k for k in got if got[k] != got_hc[k]}
    assert changed == {k for k in got if k.endswith("_fn")}
    assert all(got_hc[k] == "muon" for k in changed)


def _step(cfg, params, grads):
    opt = optim.build_optimizer(cfg, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    return updates, _apply(params, updates)


def _apply(params, updates):
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


def test_gate_bias_and_int_tables_get_zero_update():
    params = make_params(int_keyed=False)
    grads = jax.tree.map(lambda p: np.ones_like(p) * 3, params)
    cfg = OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=10)
    updates, new = _step(cfg, params, grads)
    flat_u, flat_p, flat_new = flatten(updates), flatten(params), flatten(new)
    for name, label in expected_labels().items():
        if label == "frozen":
            assert np.all(np.asarray(flat_u[name]) == 0), name
            np.testing.assert_array_equal(flat_new[name], flat_p[name])
        else:
            assert np.any(np.asarray(flat_u[name]) != 0), name


def test_weight_decay_mask():
    """Zero grads: Adam/Muon directions are 0, so the update is exactly -lr * wd * p on
    decayed leaves (matrices, embed, head, hc_*_fn) and 0 on norms/biases/sinks/ape."""
    params = make_params(int_keyed=False)
    grads = jax.tree.map(np.zeros_like, params)
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, total_steps=10)
    flat_u = flatten(_step(cfg, params, grads)[0])
    for name, label in expected_labels().items():
        decayed = label == "muon" or name in ("embed.weight", "head.weight") \
            or name.endswith("_fn")
        want = -0.1 * 0.5 * 0.5 if decayed else 0.0
        np.testing.assert_allclose(np.asarray(flat_u[name], np.float64), want, atol=1e-7,
                                   err_msg=name)


def test_one_step_reduces_quadratic_loss():
    params = make_params(int_keyed=True)
    targets = jax.tree.map(lambda p: _rand(p.shape, seed=p.size) if p.dtype.kind == "f"
                           else p, params)

    def loss(p):
        return sum(float(np.sum((np.asarray(a, np.float64) - t) ** 2)) / 2
                   for a, t in zip(jax.tree.leaves(p), jax.tree.leaves(targets))
                   if a.dtype.kind == "f")

    grads = jax.tree.map(lambda p, t: (p - t).astype(p.dtype), params, targets)  # d/dp
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=10)
    _, new = _step(cfg, params, grads)
    assert loss(new) < loss(params) - 1e-3, (loss(new), loss(params))


def test_chain_matches_a_numpy_reference_over_steps():
    """The whole chain, four steps through warmup into the cosine, against a float64 numpy rendering
    of the rules written from the Muon / AdamW descriptions (not from optim.py): clip by the global
    norm of the trainable gradients; Muon: m = mu m + g, d = g + mu m, NS per matrix of a stack,
    * rho sqrt(max(out, in)), W -= lr_muon(t) (u + wd W); AdamW with bias correction, decay on 2-D
    leaves only; the gate bias untouched."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    params = {"embed": {"weight": r(11, 6)}, "norm": {"weight": r(6)},
              "layers": [{"attn": {"wq_a": {"weight": r(4, 6)}, "attn_sink": r(2), "wo_a": {"weight": r(2, 3, 5)}},
                          "hc_attn_fn": r(8, 12), "hc_attn_base": r(8),
                          "ffn": {"gate": {"weight": r(3, 6), "bias": r(3)},
                                  "experts": {"w1": {"weight": r(3, 7, 6)}}}} for _ in range(2)]}
    cfg = OptimizerConfig(lr=0.05, muon_lr=0.03, warmup_steps=2, total_steps=6, weight_decay=0.1, clip_norm=1.0)
    muon_names = {"attn.wq_a.weight", "attn.wo_a.weight", "ffn.gate.weight", "ffn.experts.w1.weight"}

    def lr_at(t, peak):
        p = min(max((t - 2) / 4, 0.0), 1.0)
        return peak * t / 2 if t < 2 else peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    def ns(x):  # one matrix; a tall one is worked on as its transpose
        if x.shape[0] > x.shape[1]:
            return ns(x.T).T
        y = x / (np.linalg.norm(x) + 1e-7)
        for a, b, c in HYBRID:
            gram = y @ y.T
            y = a * y + (b * gram + c * gram @ gram) @ y
        return y

    def ortho(d):  # each matrix of a stack on its own
        return np.stack([ns(m) for m in d.reshape(-1, *d.shape[-2:])]).reshape(d.shape)

    ref = flatten(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    state = {k: np.zeros_like(v) for k, v in ref.items()}
    m1, m2 = dict(state), dict(state)
    opt = optim.build_optimizer(cfg, params)
    opt_state, cur, update = opt.init(params), params, jax.jit(opt.update)
    for t in range(4):
        grads = jax.tree.map(lambda p: r(*p.shape), params)
        g = flatten(jax.tree.map(lambda x: np.asarray(x, np.float64), grads))
        s = min(1.0, 1.0 / math.sqrt(sum((v ** 2).sum() for k, v in g.items() if not k.endswith("gate.bias"))))
        for k, w in ref.items():
            if k.endswith("gate.bias"):
                continue
            gk = g[k] * s
            if k.split(".", 2)[-1] in muon_names:
                state[k] = 0.95 * state[k] + gk
                u = ortho(gk + 0.95 * state[k]) * 0.18 * math.sqrt(max(w.shape[-2:]))
                ref[k] = w - lr_at(t, 0.03) * (u + 0.1 * w)
            else:
                m1[k], m2[k] = 0.9 * m1[k] + 0.1 * gk, 0.95 * m2[k] + 0.05 * gk ** 2
                adam = (m1[k] / (1 - 0.9 ** (t + 1))) / (np.sqrt(m2[k] / (1 - 0.95 ** (t + 1))) + 1e-20)
                ref[k] = w - lr_at(t, 0.05) * (adam + (0.1 if w.ndim >= 2 else 0.0) * w)
        updates, opt_state = update(grads, opt_state, cur)
        cur = _apply(cur, updates)
    got = flatten(cur)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), ref[k], atol=2e-6, err_msg=k)


# ----------------------------------------------------------------------------- schedules

def test_cosine_schedule_hand_values():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=100, total_steps=1100, final_lr_fraction=0.1)
    lr = optim.learning_rate_schedule(cfg)
    # warmup 0 -> 1e-3 linearly; cosine over 1000 steps from 1e-3 to 1e-4.
    cases = {0: 0.0, 50: 5e-4, 100: 1e-3, 600: 1e-4 + 0.9e-3 * 0.5,
             350: 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2, 1100: 1e-4, 5000: 1e-4}
    for step, want in cases.items():
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-12,
                                   err_msg=str(step))
    # Muon shares the shape with its own peak.
    np.testing.assert_allclose(float(optim.learning_rate_schedule(cfg, 2e-3)(600)),
                               2 * (1e-4 + 0.45e-3), rtol=1e-5)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_hand_values(shape):
    cfg = OptimizerConfig(lr=2e-3, schedule="wsd", warmup_steps=10, total_steps=110,
                          decay_fraction=0.2, decay_shape=shape, final_lr_fraction=0.0)
    lr = optim.learning_rate_schedule(cfg)
    # decay occupies the last 22 steps: 88 -> 110.
    mid = 2e-3 * (0.5 if shape == "linear" else 1 - math.sqrt(0.5))
    cases = {0: 0.0, 5: 1e-3, 10: 2e-3, 50: 2e-3, 88: 2e-3, 99: mid, 110: 0.0, 200: 0.0}
    for step, want in cases.items():
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-12,
                                   err_msg=str(step))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("warmup_steps", 100_000), ("schedule", "step"), ("ns_coeffs", ((1.0, 2.0),)),
    ("ns_dtype", "float16"), ("update_rms", 0.0), ("b2", 1.0), ("clip_norm", -1.0),
    ("decay_shape", "cubic"), ("muon_momentum", 1.0),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
        OptimizerConfig(**{field: value})


def test_config_accepts_yaml_lists_and_default_schedule():
    cfg = OptimizerConfig(ns_coeffs=[[3.4445, -4.775, 2.0315], [2, -1.5, 0.5]])
    assert cfg.ns_coeffs == ((3.4445, -4.775, 2.0315), (2.0, -1.5, 0.5))
    assert OptimizerConfig().ns_coeffs == HYBRID
    hash(cfg)
