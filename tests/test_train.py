"""Training: loss terms on hand-made inputs, the train CLI end to end, resumption, SIGTERM."""
import json
import math
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.config import ConfigError, load_config
from v4jax.model.attention import indexer_kl
from v4jax.model.moe import ExpertWeight
from v4jax import quant
from v4jax.train_step import cross_entropy, sequence_balance_loss, update_gate_biases
from conftest import REPO, run_on_host_devices

TINY = REPO / "configs" / "tiny.yaml"
# small and quick: two layers (CSA + hash routing, HCA) and the MTP block, short sequences
FAST = ["data.seq_len=64", "data.global_batch=4", "data.max_bytes=300000", "train.log_every=1",
        "model.num_hidden_layers=2", "model.compress_ratios=[4,16,0]"]


def test_cross_entropy_by_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])   # p(1) = 3/4 ; uniform
    got = cross_entropy(logits, jnp.array([[1, 0]]))
    assert abs(float(got) - (-math.log(0.75) + math.log(2.0)) / 2) < 1e-6


@pytest.mark.parametrize("S,chunk_tokens", [(37, 24), (5, 4096), (8, 1)])
def test_chunked_cross_entropy_equals_the_full_logits(S, chunk_tokens):
    """Chunks of whole batch rows (ragged against S, longer than S, one position) give the loss and
    gradients of cross_entropy on the full fp32 logits."""
    from v4jax.model.layers import dot_f32
    from v4jax.train_step import chunked_cross_entropy

    B, D, V = 3, 16, 50
    ks = jax.random.split(jax.random.key(1), 3)
    u, w = jax.random.normal(ks[0], (B, S, D)), jax.random.normal(ks[1], (V, D))
    t = jax.random.randint(ks[2], (B, S), 0, V)
    full = jax.jit(jax.value_and_grad(lambda u, w: cross_entropy(dot_f32(u, w), t), argnums=(0, 1)))
    chunked = jax.jit(jax.value_and_grad(lambda u, w: chunked_cross_entropy(u, w, t, chunk_tokens=chunk_tokens),
                                         argnums=(0, 1)))
    chex.assert_trees_all_close(chunked(u, w), full(u, w), rtol=1e-5, atol=1e-6)


def test_sequence_balance_loss_by_hand():
    # one sequence, 2 tokens, 4 experts, top-2: token 0 -> {0, 1}, token 1 -> {0, 2}
    experts = jnp.array([[[0, 1], [0, 2]]])
    scores = jnp.array([[[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, 0.0]]])
    f = np.array([2, 1, 1, 0]) * 4 / (2 * 2)                    # E / (k S) · counts
    p = (np.array([0.25, 0.25, 0.25, 0.25]) + np.array([0.5, 0, 0.5, 0])) / 2
    assert abs(float(sequence_balance_loss(experts, scores, 4)) - float((f * p).sum())) < 1e-6
    # the routing counts carry no gradient; the scores do
    g = jax.grad(lambda s: sequence_balance_loss(experts, s, 4))(scores)
    assert float(jnp.abs(g).sum()) > 0


def test_gate_bias_moves_toward_balance():
    params = {"layers": {1: {"ffn": {"gate": {"bias": jnp.zeros(4)}}}}}
    counts = {("layers", 1): jnp.array([10.0, 2.0, 4.0, 4.0])}   # mean 5
    out = update_gate_biases(params, counts, 0.01)
    np.testing.assert_allclose(np.asarray(out["layers"][1]["ffn"]["gate"]["bias"]), [-0.01, 0.01, 0.01, 0.01])
    assert float(params["layers"][1]["ffn"]["gate"]["bias"].sum()) == 0.0       # input not modified


@pytest.mark.parametrize("weights, frozen", [((0.3, 1.0), set()), ((0.0, 1.0), {"mtp"}),
                                             ((0.3, 0.0), {"indexer"})])
def test_parameters_no_loss_term_trains_stay_as_they_are(weights, frozen):
    """With mtp_loss_weight 0 the MTP block, with indexer_loss_weight 0 the indexers get no gradient;
    the step (AdamW / Muon with weight decay) leaves them exactly as they were, and trains the rest."""
    from flax import nnx
    from conftest import small_config
    from v4jax.config import TrainConfig
    from v4jax.model.transformer import Transformer
    from v4jax.optim import OptimizerConfig, build_optimizer
    from v4jax.train_step import make_train_step

    cfg = small_config(num_hidden_layers=2, compress_ratios=[4, 8, 4])
    graph, params, rest = nnx.split(Transformer(cfg, mode="exact", rngs=nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = build_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10, weight_decay=0.5), params)
    tcfg = TrainConfig(mode="exact", mtp_loss_weight=weights[0], indexer_loss_weight=weights[1])
    state = {"params": params, "buffers": nnx.to_pure_dict(rest), "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
    new, _ = jax.jit(make_train_step(graph, cfg, tcfg, tx, lambda s: 1.0))(state, tokens)
    for kp, old in jax.tree_util.tree_leaves_with_path(params):
        names = {str(k.key) for k in kp}
        if names & {"mtp", "indexer"} and "bias" not in names:  # gate biases follow their own rule
            moved = not np.array_equal(old, _at(new["params"], kp))
            assert moved != bool(names & frozen), (jax.tree_util.keystr(kp), moved)


def _at(tree, kp):
    for k in kp:
        tree = tree[k.key]
    return tree


def test_indexer_kl_by_hand():
    """The target is DSA's: each head's attention probabilities (softmax over its window keys, the
    compressed entries and its sink) summed over heads, L1-normalised over the entries."""
    rng = np.random.default_rng(0)
    B, S, H, N, d, W = 1, 9, 2, 3, 4, 3
    q = rng.standard_normal((B, S, H, d)).astype(np.float32)
    kv = rng.standard_normal((B, S, d)).astype(np.float32)
    ckv = rng.standard_normal((B, N, d)).astype(np.float32)
    sink = rng.standard_normal(H).astype(np.float32)
    valid = np.arange(N)[None, :] < ((np.arange(S) + 1) // 4)[:, None]
    scores = np.where(valid[None], rng.standard_normal((B, S, N)), -np.inf).astype(np.float32)
    kls = []
    for t in range(S):
        v = valid[t]
        if not v.any():
            continue
        keys = np.concatenate([kv[0, max(0, t - W + 1):t + 1], ckv[0, v]])
        lg = np.concatenate([np.einsum("hd,kd->hk", q[0, t], keys) * 0.5, sink[:, None]], axis=1)
        prob = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
        mass = prob[:, -1 - v.sum():-1].sum(0)             # the compressed entries' columns
        p = mass / mass.sum()
        lq = scores[0, t, v] - np.log(np.exp(scores[0, t, v]).sum())
        kls.append((p * (np.log(p) - lq)).sum())

    def kl(s):
        return indexer_kl(s, *(jnp.asarray(a) for a in (q, kv, ckv, sink)), window=W, scale=0.5)
    assert abs(float(kl(jnp.asarray(scores))) - np.mean(kls)) < 1e-5
    g = jax.grad(kl)(jnp.asarray(scores))
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("S,chunk", [(37, 8), (12, 64)])
def test_indexer_train_chunks_equal_the_full_score_matrix(S, chunk):
    """indexer_train (query chunks under remat) == top-k and KL of the whole [B, S, N] score matrix,
    values and gradients; S ragged against the chunk, and a chunk longer than S."""
    from pallas_kernels import reference
    from v4jax.model.attention import indexer_train

    B, IH, ID, H, hd, topk, W = 2, 3, 8, 4, 8, 5, 6
    N = S // 4
    ks = jax.random.split(jax.random.key(0), 7)
    qi, w, ik = (jax.random.normal(ks[0], (B, S, IH, ID)), jax.random.normal(ks[1], (B, S, IH)),
                 jax.random.normal(ks[2], (B, N, ID)))
    q, ckv = jax.random.normal(ks[3], (B, S, H, hd)), jax.random.normal(ks[4], (B, N, hd))
    kv, sink = jax.random.normal(ks[5], (B, S, hd)), jax.random.normal(ks[6], (H,))

    def full(qi, w, ik):
        scores = reference.indexer_scores(qi, w, ik, ratio=4)
        return reference.topk_indices(scores, topk), indexer_kl(scores, q, kv, ckv, sink, window=W, scale=0.3)

    def chunked(qi, w, ik):
        return indexer_train(qi, w, ik, q, kv, ckv, sink, topk=topk, window=W, scale=0.3, chunk=chunk)

    (idx_f, kl_f), (idx_c, kl_c) = jax.jit(full)(qi, w, ik), jax.jit(chunked)(qi, w, ik)
    chex.assert_shape(idx_c, (B, S, topk))
    np.testing.assert_array_equal(idx_c, idx_f)
    chex.assert_trees_all_close(kl_c, kl_f, rtol=1e-5)
    grads = [jax.jit(jax.grad(lambda *a: f(*a)[1], argnums=(0, 1, 2)))(qi, w, ik) for f in (full, chunked)]
    chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads[0][2]).sum()) > 0


def test_fp4_expert_qat_is_straight_through():
    from flax import nnx
    ew = ExpertWeight(2, 4, 64, fmt="float", dtype=jnp.float32, axes=("experts", "mlp", "embed"),
                      rngs=nnx.Rngs(0), fp4_qat=True)
    w = ew.weight[...]
    chex.assert_trees_all_close(ew.dequantized(jnp.float32), quant.fake_quant_fp4(w, 32))
    gd, st = nnx.split(ew)
    g = jax.grad(lambda s: jnp.sum(nnx.merge(gd, s).dequantized(jnp.float32) * 3.0))(st)
    chex.assert_trees_all_close(g["weight"][...], jnp.full_like(w, 3.0))


def test_fp8_weight_qat_is_straight_through():
    from flax import nnx
    from v4jax.model.layers import Linear, Numerics
    lin = Linear(200, 130, numerics=Numerics("exact", fp8_weights=True), rngs=nnx.Rngs(0), qat_input=True)
    w = lin.weight[...]
    q, s = quant.quant_fp8(np.asarray(w))          # the export path, in numpy
    chex.assert_trees_all_close(lin.dequantized(), jnp.asarray(quant.dequant_fp8(q, s)))
    gd, st = nnx.split(lin)
    g = jax.grad(lambda st: jnp.sum(nnx.merge(gd, st).dequantized() * 2.0))(st)
    chex.assert_trees_all_close(g["weight"][...], jnp.full_like(w, 2.0))


def test_activation_quantisers_pass_gradients_straight_through():
    """train.mode=qat: the FP8 / FP4 activation fake-quantisers (SPEC §5) keep their exact forward values
    and pass the gradient through unchanged. JAX differentiates a cast to float8 / float4 to zero, so
    before this every layer below the last quantiser got no gradient in qat training."""
    x = jax.random.normal(jax.random.key(0), (3, 200)) * 5
    c = jax.random.normal(jax.random.key(1), (3, 200))
    for fq, block in ((quant.fake_quant_fp8, 128), (quant.fake_quant_fp8, 64), (quant.fake_quant_fp4, 32)):
        y, vjp = jax.vjp(lambda v: fq(v, block), x)
        assert not np.array_equal(np.asarray(y), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(vjp(c)[0]), np.asarray(c))


def test_qat_training_gradients_reach_every_layer():
    """Whole model: in qat mode the first layer's attention and shared expert get gradients of the size
    exact mode gives them (the forward differs by the quantisation only)."""
    from flax import nnx
    from conftest import small_config
    from v4jax.model.transformer import Transformer

    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 160)
    norms = {}
    for mode in ("exact", "qat"):
        cfg = small_config(num_hidden_layers=1, compress_ratios=[4, 0])
        graph, params, rest = nnx.split(Transformer(cfg, mode=mode, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graph, p, rest)(tokens)[0]
            return cross_entropy(logits[:, :-1], tokens[:, 1:])

        grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
        norms[mode] = {".".join(map(str, k)): float(jnp.linalg.norm(v[...])) for k, v in grads
                       if k[:2] == ("layers", 0) and k[2:4] in (("attn", "wq_a"), ("attn", "wq_b"), ("attn", "wkv"),
                                                                 ("attn", "wo_b"), ("ffn", "shared_experts"))}
    assert len(norms["qat"]) >= 6
    for name, exact in norms["exact"].items():
        assert exact > 0 and 0.5 < norms["qat"][name] / exact < 2, (name, exact, norms["qat"][name])


def test_repeated_run_by_hand():
    from v4jax.model.transformer import repeated_run
    assert repeated_run(list("hhcxcxcxw")) == (2, 2, 3)      # (CSA, HCA) pairs beat the 2 hash layers
    assert repeated_run(list("hhh")) == (0, 1, 3)
    assert repeated_run(list("abcd")) is None
    assert repeated_run(list("abcabcab")) == (0, 3, 2)       # the ragged tail stays outside
    flash = [("w", True)] * 2 + [("c", True)] + [("h", False), ("c", False)] * 20
    assert repeated_run(flash) == (3, 2, 20)


_SCAN_SCRIPT = """
import sys
import chex, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from conftest import small_config
from v4jax import sharding
from v4jax.config import TrainConfig
from v4jax.model.transformer import Transformer
from v4jax.train_step import compute_loss

# moe_capacity=2 on the mesh (expert=2): room for every pair, through the capacity path
cfg = small_config(num_hidden_layers=5, compress_ratios=[0, 4, 8, 4, 8, 0], moe_capacity=2.0)
model = Transformer(cfg, mode="exact", rngs=nnx.Rngs(0))
graph, params, rest = nnx.split(model, nnx.Param, ...)
devices = np.asarray(jax.devices())
mesh = Mesh(devices.reshape(2, 1, 2, 1) if sys.argv[1] == "mesh" else devices[:1].reshape(1, 1, 1, 1), sharding.AXES)
shardings = sharding.param_shardings(params, mesh)
params, rest = jax.device_put(nnx.to_pure_dict(params), shardings), nnx.to_pure_dict(rest)
tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, cfg.vocab_size)

def loss(params, scan):
    model = nnx.merge(graph, nnx.State(params), nnx.State(rest))
    total, metrics, counts = compute_loss(model, tokens, cfg, TrainConfig(mode="exact", remat=True, scan_layers=scan))
    return total, (metrics, counts)

out = {}
with jax.set_mesh(mesh):
    for scan in (False, True):
        f = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        out[scan] = f(params, scan)
        text = f.trace(params, scan).lower().as_text()
        out[scan, "dots"] = text.count("dot_general")
        if mesh.size > 1:  # the routed experts ran expert-parallel
            assert "all_gather" in text or "all-gather" in text, "no expert-parallel collective"
(total, (metrics, counts)), grads = out[True]
(total0, (metrics0, counts0)), grads0 = out[False]
assert out[True, "dots"] < 0.8 * out[False, "dots"], (out[True, "dots"], out[False, "dots"])
chex.assert_trees_all_close(metrics, metrics0, rtol=1e-5)
assert float(metrics["moe_dropped"]) == 0.0, metrics
chex.assert_trees_all_equal(counts, counts0)
for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    chex.assert_trees_all_close(g, g0, rtol=0, atol=1e-3 * float(jnp.max(jnp.abs(g0))) + 1e-12)
print("ok")
"""


@pytest.mark.parametrize("where", ["one_device", "mesh"])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(where):
    """train.scan_layers: the repeated (ratio-4, ratio-8) layers run as one lax.scan, on one device and
    with the routed experts split over a data=2 x expert=2 mesh (4 host devices). Loss, routing and
    gradients equal the unrolled model's, up to float32 reordering (remat on vs off differs as much:
    4e-4 of the largest head-gradient entry); the lowered step has fewer matmuls (the scan body is
    traced once)."""
    out = run_on_host_devices(_SCAN_SCRIPT, 4, where)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


_ACCUM_SCRIPT = """
import re
import chex, jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import Mesh
from conftest import small_config
from v4jax import sharding
from v4jax.config import TrainConfig
from v4jax.model.transformer import Transformer
from v4jax.train_step import make_train_step

cfg = small_config(num_hidden_layers=2, compress_ratios=[4, 8, 0])
model = Transformer(cfg, mode="exact", rngs=nnx.Rngs(0))
graph, params0, rest = nnx.split(model, nnx.Param, ...)
tx = optax.sgd(1.0)  # the update is minus the gradient
devices = np.asarray(jax.devices())
for shape, accums in (((1, 1, 1, 1), (1, 4)), ((2, 1, 2, 1), (1, 2))):
    mesh = Mesh(devices[:np.prod(shape)].reshape(shape), sharding.AXES)
    params = jax.device_put(nnx.to_pure_dict(params0), sharding.param_shardings(params0, mesh))
    state = {"params": params, "buffers": nnx.to_pure_dict(rest), "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    tokens = jax.device_put(jax.random.randint(jax.random.key(1), (8, 33), 0, cfg.vocab_size),
                            sharding.batch_sharding(mesh))
    out = {}
    with jax.set_mesh(mesh):
        for accum in accums:
            step = make_train_step(graph, cfg, TrainConfig(mode="exact", grad_accum=accum), tx, lambda s: 1.0)
            compiled = jax.jit(step).lower(state, tokens).compile()
            out[accum] = compiled(state, tokens)
    if mesh.size > 1:  # per device, the 2 microbatches hold 8 / (2 x 4 devices) = 1 sequence each
        held = set(re.findall(r"s32\\[(\\d+),(\\d+),33\\]", compiled.as_text()))
        assert ("2", "1") in held and not any(int(rows) > 1 for _, rows in held), held
    (new1, m1), (new, m) = out[accums[0]], out[accums[1]]
    chex.assert_trees_all_close(m, m1, rtol=1e-5)  # losses, gradient norm, expert loads
    for (path, p0), p1, p in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new1["params"]),
                                 jax.tree.leaves(new["params"])):
        g1, g = p0 - p1, p0 - p  # gradients (and the same gate-bias step)
        chex.assert_trees_all_close(g, g1, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(g1))) + 1e-12,
                                    custom_message=jax.tree_util.keystr(path))
print("ok")
"""


@pytest.mark.slow
def test_gradient_accumulation_gives_the_whole_batch_step():
    """train.grad_accum: a step over 8 sequences run as 4 (one device) or 2 (data=2 x expert=2 mesh, 4
    host devices: each microbatch is still split over the batch axes, one sequence per device) microbatches gives the one-pass
    step's metrics, gradients (SGD with rate 1: the parameter change) and gate-bias update, up to
    float32 reordering."""
    out = run_on_host_devices(_ACCUM_SCRIPT, 4)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


_FSDP_SCRIPT = """
import re
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import Mesh
from conftest import small_config
from v4jax import sharding
from v4jax.config import TrainConfig
from v4jax.model.transformer import Transformer
from v4jax.train_step import make_train_step

cfg = small_config(hidden_size=96)
model = Transformer(cfg, mode="production", rngs=nnx.Rngs(0))
graph, params, rest = nnx.split(model, nnx.Param, ...)
tx = optax.sgd(1e-3)
mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2, 2, 1), sharding.AXES)
params = jax.device_put(nnx.to_pure_dict(params), sharding.param_shardings(params, mesh))
state = {"params": params, "buffers": nnx.to_pure_dict(rest), "opt_state": tx.init(params),
         "step": jnp.zeros((), jnp.int32)}
tokens = jax.device_put(jax.random.randint(jax.random.key(1), (8, 41), 0, cfg.vocab_size),
                        sharding.batch_sharding(mesh))
with jax.set_mesh(mesh):
    step = make_train_step(graph, cfg, TrainConfig(mode="production"), tx, lambda s: 1.0)
    text = jax.jit(step).lower(state, tokens).compile().as_text()
rows = {int(b) for b in re.findall(r"\\[(\\d+),4[01],\\d+", text)}  # [sequences, positions, width]
print(sorted(rows))
"""


@pytest.mark.slow
def test_weights_are_gathered_so_each_device_computes_its_own_sequences():
    """FSDP on a fsdp=2 x expert=2 mesh (4 host devices): the compiled training step's activations
    ``[sequences, positions, width]`` hold each device's 2 of the 8 sequences, never all 8. Left to
    itself the partitioner computes some matmuls for the whole batch on every device (the weights'
    contracting dimension is split over the same axes as the batch; on V4-Flash over 256 TPU chips
    this was a 64 GiB product): with ``sharding.for_compute`` returning its input unchanged, this check
    sees ``[2, 8]`` (checked when written; not rerun, to keep the suite short)."""
    out = run_on_host_devices(_FSDP_SCRIPT, 4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2]


def test_out_of_memory_names_the_settings_that_lower_it():
    from v4jax.config import TrainConfig
    from v4jax.trainer import out_of_memory
    err = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 91.27GiB.\nmore")
    e = out_of_memory(err, TrainConfig(grad_accum=2), "running")
    assert isinstance(e, ConfigError)
    assert str(e).startswith("out of device memory while running the training step (RESOURCE_EXHAUSTED: Out of "
                             "memory while trying to allocate 91.27GiB.). Less memory per device: raise "
                             "train.grad_accum (now 2;")
    assert "train.remat=true" in str(e) and "train.remat" not in str(out_of_memory(err, TrainConfig(remat=True), "x"))
    assert out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes"), TrainConfig(), "compiling") is None
    # how the trainer wraps compiling and running the step
    from v4jax.trainer import _explain_oom
    with pytest.raises(ConfigError, match="while compiling") as info, _explain_oom(TrainConfig(), "compiling"):
        raise err
    assert info.value.__cause__ is err
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"), _explain_oom(TrainConfig(), "running"):
        raise RuntimeError("INVALID_ARGUMENT: shapes")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(TINY, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        load_config(TINY, ["train.steps=0"])
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(TINY, ["data.seq_len=-4"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(TINY, ["trian.steps=3"])
    with pytest.raises(ConfigError, match=r"train.head_precision: must be one of \['fp32', 'bf16x6'"):
        load_config(TINY, ["train.head_precision=tf32"])
    with pytest.raises(ConfigError, match="train.head_precision=bf16x3 needs train.mode=production"):
        load_config(TINY, ["train.head_precision=bf16x3", "train.mode=exact"])
    from v4jax.sharding import mesh_shape
    from v4jax.config import MeshConfig
    with pytest.raises(ConfigError, match="devices"):
        mesh_shape(MeshConfig(data=2, fsdp=3), 4)
    assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == (4, 1, 1, 2)
    from v4jax.sharding import check_batch
    with pytest.raises(ConfigError, match=r"global_batch=6 must be a multiple of .* = 4"):
        check_batch(6, {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1})
    with pytest.raises(ConfigError, match=r"global_batch=8 must be a multiple of mesh data×fsdp×expert × "
                                          r"train.grad_accum = 2×1×2×4 = 16"):
        check_batch(8, {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}, grad_accum=4)
    check_batch(8, {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2})
    with pytest.raises(ConfigError, match=r"tiny.yaml: model: FP4 experts need hidden_size"):
        load_config(TINY, ["model.hidden_size=100"])
    with pytest.raises(ConfigError, match=r"train.fp8_weight_qat needs model.quantization_config"):
        load_config(TINY, ["model.quantization_config=null", "model.expert_dtype=null"])
    with pytest.raises(ConfigError, match=r"train.fp4_expert_qat needs FP4 routed experts .* expert_dtype is fp8"):
        load_config(TINY, ["model.expert_dtype=fp8"])
    load_config(TINY, ["model.expert_dtype=fp8", "train.fp4_expert_qat=false"])
    # data problems are reported as config errors (train.py prints them without a traceback)
    # before the model is built
    from v4jax.trainer import train
    bad = load_config(TINY, ["data.source=text", f"data.paths=[{tmp_path}/none/*.txt]"])
    with pytest.raises(ConfigError, match=r"^data: DataConfig.paths: glob .*none/\*.txt' matches no files"):
        train(bad, tmp_path / "run", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    bad = load_config(TINY, ["data.source=jsonl", f"data.paths=[{tmp_path}/bad.jsonl]"])
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: no field 'text'"):
        train(bad, tmp_path / "run", progress=False)
    # token ids past the model's vocabulary (another tokenizer's data) stop the run at their batch
    vocab = load_config(TINY).model.vocab_size
    np.save(tmp_path / "ids.npy", np.where(np.arange(4000) % 50, 1, vocab).astype(np.int32))
    bad = load_config(TINY, ["data.source=tokens", f"data.paths=[{tmp_path}/ids.npy]", *FAST])
    with pytest.raises(ConfigError, match=rf"data: token id {vocab} at step 1 is not below the model's "
                                          rf"vocab_size={vocab}"):
        train(bad, tmp_path / "ids", progress=False)


def _train(workdir, *overrides, env=None):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--workdir", str(workdir), "--quiet",
           *FAST, *overrides]
    subprocess.run(cmd, check=True, cwd=workdir.parent, env=env)
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_learns_and_resumes_exactly_after_sigterm(tmp_path):
    straight = _train(tmp_path / "a", "train.steps=16")
    first, last5 = straight[0]["loss"], np.mean([r["loss"] for r in straight[-5:]])
    assert last5 <= 0.9 * first, (first, last5)
    for r in straight:
        for k in ("loss", "mtp_ce", "balance_loss", "indexer_kl", "grad_norm", "lr", "max_expert_load",
                  "min_expert_load", "tokens_per_s", "step_time_s"):
            assert np.isfinite(r[k]), (k, r)
    # the compilation is timed apart, once, and not in the first row's step time
    assert straight[0]["compile_s"] > straight[0]["step_time_s"] > 0
    assert 0 < straight[0]["step_memory_gib"] < 8  # XLA's buffer assignment for the step, per device
    assert not any("compile_s" in r for r in straight[1:])
    assert any((tmp_path / "a" / "tb").iterdir())

    # the same run, stopped by SIGTERM a few steps in: it saves and exits cleanly
    work = tmp_path / "b"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--workdir", str(work), "--quiet",
           *FAST, "train.steps=16", "checkpoint.every=1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM  # saved, and not mistaken for a finished run
    stopped = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == stopped[-1] and 3 <= stopped[-1] < 16

    # re-running resumes from that checkpoint and continues exactly as the uninterrupted run (a metrics
    # row cut short by an interruption is dropped)
    with open(metrics, "a") as f:
        f.write('{"step": 99, "lo')
    resumed = _train(work, "train.steps=16")
    assert [m["step"] for m in resumed] == list(range(1, 17))
    for a, b in zip(straight, resumed):
        for key in ("loss", "mtp_ce", "indexer_kl", "grad_norm", "max_expert_load"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    ckpts = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == 16 and len(ckpts) <= 2  # keep: 2

    # a finished run, run again, trains nothing and says so; fewer steps than its checkpoint's is an error
    # (overrides may come before and after the flags)
    for steps, rc, said in ((16, 0, "nothing to train"), (15, 1, "past train.steps=15")):
        out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY), f"train.steps={steps}",
                              "--workdir", str(work), "--quiet", *FAST], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == rc and said in out.stdout + out.stderr, out
    assert len(metrics.read_text().splitlines()) == 16


@pytest.mark.slow
def test_training_starts_from_the_weights_of_a_checkpoint(tmp_path, monkeypatch):
    """train.init_from: a train.py run, its export in the released format and that export's orbax form
    each give a fresh run exactly their weights (hash tables and gate biases included), read a few
    leaves at a time; a resumed run restores its own checkpoint instead; a checkpoint of another model
    is an error naming the keys."""
    from flax import nnx
    from v4jax import checkpoint
    from v4jax.checkpoint import load_train_params
    from v4jax.hf import convert
    from v4jax.hf.checkpoint import load_model
    from v4jax.hf.safetensors import CheckpointError
    from v4jax.trainer import train

    base = [*FAST, "checkpoint.async_save=false"]
    src = tmp_path / "src"
    train(load_config(TINY, base + ["train.steps=2"]), src, progress=False)
    _, trained, _ = load_train_params(src)
    convert.orbax_to_hf(src, tmp_path / "hf", progress=False)
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="bfloat16", progress=False)
    released = nnx.to_pure_dict(nnx.state(load_model(tmp_path / "hf", progress=False)))
    # one step whose update is zero: warmup starts at learning rate 0, no gate-bias step
    still = base + ["train.steps=1", "optimizer.warmup_steps=5", "train.bias_update_speed=0"]
    reads = []
    read = checkpoint.TrainRunParams.read
    monkeypatch.setattr(checkpoint.TrainRunParams, "read", lambda self, names: reads.append(
        sum(self.leaves[n].size * self.leaves[n].dtype.itemsize for n in names)) or read(self, names))
    monkeypatch.setattr(convert, "GROUP_BYTES", 1 << 16)
    for name, path, expected in [("run", src, trained), ("hf", tmp_path / "hf", released),
                                 ("orbax", tmp_path / "orbax", released)]:
        reads.clear()
        train(load_config(TINY, still + [f"train.init_from={path}"]), tmp_path / f"from_{name}", progress=False)
        if name == "run":
            init_reads = list(reads)
        _, got, step = load_train_params(tmp_path / f"from_{name}")
        assert step == 1
        chex.assert_trees_all_equal(got, jax.tree.map(np.asarray, expected))

    largest = max(a.size * a.dtype.itemsize for a in jax.tree.leaves(trained))
    assert len(init_reads) > 10 and max(init_reads) <= max(1 << 16, largest), init_reads  # streamed

    resumed = train(load_config(TINY, still + ["train.steps=2", f"train.init_from={tmp_path}/gone"]),
                    tmp_path / "from_run", progress=False)
    assert [m["step"] for m in resumed] == [2]
    with pytest.raises(ConfigError, match=r"holds a different model.*\n  sliding_window: checkpoint 32, run 16"):
        train(load_config(TINY, still + ["model.sliding_window=16", f"train.init_from={src}"]),
              tmp_path / "other", progress=False)

    # a damaged data file: the resumed run and init_from name what they could not read (and resume from
    # no other step by themselves)
    for data in (tmp_path / "from_run" / "checkpoints" / "2" / "state", tmp_path / "orbax" / "params" / "part-00000"):
        largest = max((data / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot restore the checkpoint of step 2 .*from_run/checkpoints/2\): "
                                              r".*\(move .*/2 away to resume from step 1\)"):
        train(load_config(TINY, still + ["train.steps=3"]), tmp_path / "from_run", progress=False)
    with pytest.raises(ConfigError, match=r"train.init_from: cannot read .*orbax/params/part-00000: "):
        train(load_config(TINY, still + [f"train.init_from={tmp_path}/orbax"]), tmp_path / "from_bad", progress=False)


def test_optimizer_state_follows_parameter_shardings():
    """Per-parameter optimizer leaves take their parameter's sharding; counts are replicated."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from v4jax.optim import OptimizerConfig, build_optimizer
    from v4jax.sharding import follow_params

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
    params = {"embed": {"weight": jnp.ones((8, 4))}, "layers": {0: {"ffn": {"experts": {"w1": jnp.ones((2, 4, 4))}},
                                                                     "attn_norm": {"weight": jnp.ones((4,))}}}}
    shard = {"embed": {"weight": NamedSharding(mesh, P("tensor", "fsdp"))},
             "layers": {0: {"ffn": {"experts": {"w1": NamedSharding(mesh, P("expert", None, "fsdp"))}},
                            "attn_norm": {"weight": NamedSharding(mesh, P(None))}}}}
    tx = build_optimizer(OptimizerConfig(), params)
    out = follow_params(jax.eval_shape(tx.init, params), params, shard, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(out)
    by_spec = {}
    for path, s in leaves:
        by_spec.setdefault(tuple(s.spec), []).append(jax.tree_util.keystr(path))
    assert any("w1" in p for p in by_spec[("expert", None, "fsdp")])
    assert any("embed" in p for p in by_spec[("tensor", "fsdp")])
    assert all("w1" not in p and "embed" not in p for p in by_spec.get((), []))  # () = replicated
    assert by_spec.get(())  # the step counts


@pytest.mark.slow
def test_training_on_two_processes_matches_one_device(tmp_path):
    """Two processes (jax.distributed) with the routed experts split between them (expert=2), stopped by
    a SIGTERM to one of them (both save at the same step and exit), then resumed by one process on one
    device (another process count and mesh: the checkpoint is resharded, the data position carried
    over), give one device's losses."""
    import os
    import socket

    # Without weight QAT: the programs sum in different float32 orders, and a weight that differs in its last
    # bit on either side of an FP4 / FP8 rounding midpoint moves by a whole grid step (with QAT, mtp_ce moved
    # 0.1% by step 10); without it the losses agree to ~1e-7 (seen over 12 steps)
    exact = ["train.mode=exact", "train.steps=12", "optimizer.lr=1e-3", "train.fp4_expert_qat=false",
             "train.fp8_weight_qat=false", "train.bf16_weight_qat=false"]
    one = _train(tmp_path / "one", *exact)
    work = tmp_path / "processes"
    metrics = work / "metrics.jsonl"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--workdir", str(work), "--quiet",
           *FAST, *exact, "checkpoint.every=1000", "mesh.data=1", "mesh.expert=2"]
    # no persistent compilation cache: on CPU, the step (it has all-gathers) that both processes load from
    # the cache runs mismatched collectives (gloo: "collective mismatch"; JAX 0.10.2); compiled afresh it runs
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_NUM_PROCESSES="2",
        JAX_ENABLE_COMPILATION_CACHE="false",
        JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f"localhost:{port}")) for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in procs] == [128 + signal.SIGTERM] * 2
    stopped = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped[-1]] and 2 <= stopped[-1] < 12, (saved, stopped)

    processes = _train(work, *exact)
    assert [m["step"] for m in processes] == list(range(1, 13))
    # A token whose top-k is a near-tie could still be routed differently: that would move max_expert_load by
    # 1/64 and, since the token's gradient then reaches another expert, grad_norm by a fraction of a percent
    for a, b in zip(one, processes):
        for key, rtol, atol in (("loss", 1e-4, 0), ("mtp_ce", 1e-4, 0), ("grad_norm", 1e-2, 0),
                                ("max_expert_load", 0, 0.05)):
            assert abs(a[key] - b[key]) <= rtol * abs(a[key]) + atol, (a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_small_config_lowers_for_gpu_with_the_kernels(monkeypatch):
    """configs/small.yaml (the GPU run; 4 of its layers, one of each kind, to keep the test short) as
    the GPU would get it: the whole training step (production mode, remat, FP4/FP8 weight QAT, gradient accumulation) and
    prefill + decode lower for ``cuda`` with every Pallas kernel as a Triton call. Lowering needs no
    GPU; the kernels are forced to their Triton form."""
    import re

    from flax import nnx

    from v4jax.model import layers
    from v4jax.model.transformer import Transformer
    from v4jax.optim import build_optimizer, learning_rate_schedule
    from v4jax.train_step import make_train_step

    monkeypatch.setattr(layers, "kernel_kw", lambda: {"backend": "triton"})
    monkeypatch.setattr(layers, "bf16_passes", lambda: True)  # as on a GPU
    cfg = load_config(REPO / "configs" / "small.yaml", ["data.seq_len=1024", "data.global_batch=4", "train.grad_accum=2",
                                                               "model.num_hidden_layers=4",
                                                               "model.compress_ratios=[0,4,128,0,4]"])
    m, t = cfg.model, cfg.train
    model = nnx.eval_shape(lambda: Transformer(m, mode=t.mode, rngs=nnx.Rngs(0), fp4_expert_qat=t.fp4_expert_qat,
                                               fp8_weight_qat=t.fp8_weight_qat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = build_optimizer(cfg.optimizer, params)
    state = {"params": params, "buffers": rest, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    batch = jax.ShapeDtypeStruct((4, 1025), jnp.int32)
    step = make_train_step(graphdef, m, t, tx, learning_rate_schedule(cfg.optimizer))

    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    def kernels(text):
        return set(re.findall(r'name = "(v4_\w+)"', text))

    text = lowered(step, state, batch)
    assert kernels(text) >= {
        "v4_window_attention_fwd", "v4_window_attention_dq", "v4_window_attention_dkv", "v4_csa_attention_fwd",
        "v4_csa_attention_dq", "v4_hca_attention_fwd", "v4_hca_attention_dq", "v4_hca_attention_dkv",
        "v4_gmm", "v4_tgmm"}
    # small.yaml's train.bf16_weight_qat: the head is bf16, so with the bf16 activations its forward
    # (main and MTP) is a bf16 matmul with exact products, and no matmul with the vocabulary as a
    # dimension runs as fp32 arithmetic (HIGHEST)
    assert t.bf16_weight_qat and t.head_precision == "fp32"
    head_dots = [line for line in text.splitlines() if "dot_general" in line and f"x{m.vocab_size}x" in line]
    forward = [d for d in head_dots if f"tensor<{m.vocab_size}x{m.hidden_size}xbf16>" in d and "xbf16>, tensor" in d]
    assert len(forward) >= 2 and not any("HIGHEST" in d for d in head_dots), head_dots

    tokens = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def prefill_decode(params, rest, tokens):
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
        logits, cache, _ = model.prefill(tokens, 512)
        return logits, model.decode(tokens[:, -1], cache)[0]

    assert kernels(lowered(prefill_decode, params, rest, tokens)) >= {
        "v4_window_attention_fwd", "v4_csa_attention_fwd", "v4_hca_attention_fwd", "v4_indexer_scores", "v4_gmm"}


def test_head_benchmark_smoke_runs():
    """benchmarks/head.py --smoke prints a row per train.head_precision: the script keeps working."""
    script = REPO / "benchmarks" / "head.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--reps", "1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0] for line in out.stdout.splitlines()[3:]}
    assert rows == {"fp32", "bf16x6", "bf16x3", "bf16"}, out.stdout


def test_bf16_weight_qat_rounds_the_release_bf16_tensors_straight_through():
    """train.bf16_weight_qat casts exactly the tensors the release stores in BF16 to bf16 for the forward
    pass; their fp32 masters receive the gradient of the rounded model (straight-through)."""
    from flax import nnx

    from conftest import small_config
    from v4jax.hf.names import path_to_name
    from v4jax.model.transformer import Transformer
    from v4jax.train_step import round_bf16_tensors

    cfg = small_config()
    graphdef, params, rest = nnx.split(Transformer(cfg, mode="exact", rngs=nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    leaves, tree = jax.tree_util.tree_flatten(params)  # no leaf on the bf16 grid (norms start at 1)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([a + 0.01 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])
    rounded = round_bf16_tensors(params, cfg)
    as_bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params)
    names = {path_to_name(tuple(k.key for k in kp)) for kp, v in jax.tree_util.tree_leaves_with_path(rounded)
             if not bool(jnp.array_equal(v, params_at(params, kp)))}
    chex.assert_trees_all_equal_dtypes(rounded, params)
    for kp, v in jax.tree_util.tree_leaves_with_path(rounded):  # rounded leaves are exactly bf16 values
        if path_to_name(tuple(k.key for k in kp)) in names:
            np.testing.assert_array_equal(v, params_at(as_bf16, kp))
    assert {"embed.weight", "head.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.0.attn.q_norm.weight",
            "layers.1.ffn.gate.weight", "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.norm.weight",
            "layers.1.attn.indexer.weights_proj.weight", "mtp.0.enorm.weight"} <= names
    assert not names & {"layers.0.attn.wq_a.weight", "layers.0.attn.wo_a.weight", "layers.0.ffn.experts.w1.weight",
                        "layers.1.ffn.gate.bias", "layers.0.attn.attn_sink", "hc_head_fn", "layers.1.attn.compressor.ape",
                        "mtp.0.e_proj.weight"}

    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, nnx.State(p), rest)(tokens)[0] ** 2)

    g_ste = jax.jit(jax.grad(lambda p: loss(round_bf16_tensors(p, cfg))))(params)
    g_rounded = jax.jit(jax.grad(loss))(rounded)         # the gradient at the rounded values, passed straight through
    chex.assert_trees_all_close(g_ste, g_rounded, rtol=1e-4, atol=1e-7)  # fp32 rounding of two programs
    assert float(jnp.abs(g_ste["head"]["weight"]).max()) > 0


def params_at(tree, kp):
    for k in kp:
        tree = tree[k.key]
    return tree


def test_flops_per_token_count_the_mtp_block_only_when_it_runs():
    """MFU's model FLOPs: with mtp=False (mtp_loss_weight 0: no loss runs the block) those of the same
    model without its MTP block."""
    from conftest import small_config
    from v4jax.train_step import train_flops_per_token

    with_mtp, without = small_config(), small_config(num_nextn_predict_layers=0, compress_ratios=[0, 4, 8])
    assert train_flops_per_token(with_mtp, 64, mtp=False) == train_flops_per_token(without, 64)
    assert train_flops_per_token(with_mtp, 64) > 1.2 * train_flops_per_token(without, 64)


def test_experts_not_divisible_by_the_expert_axis_fail_before_the_model_is_built(tmp_path, monkeypatch):
    """mesh.expert must divide model.n_routed_experts: train() says so as a ConfigError naming both keys and
    numbers, before the data or the model (for V4-Flash: minutes of loading) are touched, not at trace time
    from inside the MoE."""
    import types

    from v4jax import sharding, trainer
    from v4jax.sharding import check_experts
    with pytest.raises(ConfigError, match=r"model.n_routed_experts=8 must be a multiple of mesh.expert=3"):
        check_experts(8, {"data": 1, "fsdp": 1, "expert": 3, "tensor": 1})
    check_experts(8, {"data": 3, "fsdp": 1, "expert": 4, "tensor": 3})
    # 3 devices on the expert axis (a stand-in mesh: the check needs only its shape)
    monkeypatch.setattr(sharding, "make_mesh", lambda cfg, devices=None: types.SimpleNamespace(
        shape={"data": 1, "fsdp": 1, "expert": 3, "tensor": 1}))
    monkeypatch.setattr(trainer, "make_iterator", lambda *a, **k: pytest.fail("the data was read first"))
    cfg = load_config(TINY, [*FAST, "data.global_batch=6"])
    with pytest.raises(ConfigError, match=r"^model.n_routed_experts=8 must be a multiple of mesh.expert=3"):
        trainer.train(cfg, tmp_path / "run", progress=False)
