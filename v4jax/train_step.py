"""V4 training losses and one optimisation step (SPEC §6).

loss = CE(next token) + w_mtp · CE(MTP, token t+2) + w_bal · sequence-wise balance + w_idx · indexer KL

After the optimizer update, the aux-loss-free rule nudges every score-routed layer's gate bias by
``speed · sign(mean load - load)`` (outside the gradient). The train state is a plain pytree:
``{"params": pure dict of the model's nnx.Params, "buffers": pure dict of its other state (the hash
layers' ``tid2eid``), "opt_state", "step", "rng"}``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from v4jax.config import ModelConfig, TrainConfig
from v4jax.hf.names import expected_tensors, path_to_name, tensor_names
from v4jax.sharding import BATCH_AXES, for_compute, gathered_weights
from v4jax.model.layers import dot_f32


def cross_entropy(logits, targets):
    """Mean next-token NLL; logits fp32 ``[B, S, V]``, targets int ``[B, S]``."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


LOSS_CHUNK_TOKENS = 2048  # tokens per step of chunked_cross_entropy: its logits are chunk × vocab floats

# train.head_precision -> the dot algorithm of the head matmuls. On a GPU "fp32" (Precision.HIGHEST)
# is fp32 arithmetic without tensor cores; the presets split each fp32 operand into bf16 pieces and
# run that many tensor-core products (XLA:CPU ignores them and computes in fp32).
HEAD_PRECISION = {
    "fp32": jax.lax.Precision.HIGHEST,
    "bf16x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
}


def head_logits(u, w, precision: str = "fp32"):
    """fp32 logits ``u @ w.T`` (u ``[..., D]``, w ``[V, D]``), products per ``HEAD_PRECISION[precision]``;
    the backward pass's matmuls use the same algorithm."""
    if precision == "fp32":
        return dot_f32(u, w)
    return jnp.einsum("...i,oi->...o", u.astype(jnp.float32), w.astype(jnp.float32),
                      precision=HEAD_PRECISION[precision], preferred_element_type=jnp.float32)


def chunked_cross_entropy(u, w, targets, *, chunk_tokens: int = LOSS_CHUNK_TOKENS, precision: str = "fp32",
                          bf16_head: bool = False):
    """``cross_entropy(head_logits(u, w, precision), targets)`` without ``[B, S, V]`` logits in memory.

    u ``[B, S, D]`` head inputs, w ``[V, D]`` the head, targets int ``[B, S]``. The sequence is cut
    into chunks of ``chunk_tokens // B`` positions (whole batch rows, so a batch split over devices
    stays split); each chunk's fp32 logits are made, reduced to NLL and dropped, under
    ``jax.checkpoint`` so the backward pass remakes them one chunk at a time too.

    ``bf16_head``: w holds bf16 values (``train.bf16_weight_qat``); each chunk multiplies it as a bf16
    array, exactly, so ``dot_f32`` can use bf16 tensor cores, while its gradient still sums over the
    chunks in fp32.
    """
    B, S, _ = u.shape
    C = max(1, min(S, chunk_tokens // B))
    n = -(-S // C)
    pad = n * C - S
    us = jnp.moveaxis(jnp.pad(u, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, -1), 1, 0)
    ts = jnp.moveaxis(jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, C), 1, 0)

    @jax.checkpoint
    def one(args):
        i, uc, tc = args
        logits = head_logits(uc, w.astype(jnp.bfloat16) if bf16_head else w, precision)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where((i * C + jnp.arange(C) < S)[None], nll, 0.0))  # padding adds nothing

    return jnp.sum(jax.lax.map(one, (jnp.arange(n), us, ts))) / (B * S)


def sequence_balance_loss(experts, scores, n_experts: int):
    """Sequence-wise balance loss ``Σ_i f_i · P_i``, averaged over sequences.

    experts int ``[B, S, k]`` (chosen), scores ``[B, S, E]`` (sqrt-softplus affinities):
    ``f_i = E / (k·S) · #{t : i chosen at t}`` (no gradient), ``P_i = mean_t s_{t,i} / Σ_j s_{t,j}``.
    """
    B, S, k = experts.shape
    counts = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum((1, 2))          # [B, E]
    f = jax.lax.stop_gradient(counts * n_experts / (k * S))
    p = jnp.mean(scores / jnp.sum(scores, -1, keepdims=True), axis=1)                   # [B, E]
    return jnp.mean(jnp.sum(f * p, -1))


def expert_counts(experts, n_experts: int):
    """Tokens routed to each expert over the batch: float ``[E]``."""
    return jax.nn.one_hot(experts.reshape(-1), n_experts, dtype=jnp.float32).sum(0)


def _score_layers(cfg: ModelConfig, infos, mtp_infos):
    """(path to the gate, info) of every score-routed (non-hash) MoE."""
    out = [(("layers", i), info) for i, info in enumerate(infos) if i >= cfg.num_hash_layers]
    return out + [(("mtp", j), info) for j, info in enumerate(mtp_infos)]


def compute_loss(model, tokens, cfg: ModelConfig, tcfg: TrainConfig):
    """tokens int ``[B, S + 1]`` -> (total loss, metrics, expert counts per score-routed layer).

    metrics: ``loss`` (next-token CE), ``mtp_ce``, ``balance_loss``, ``indexer_kl``, ``total_loss``,
    with ``model.moe_capacity`` ``moe_dropped``.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    _, X, _, infos = model(inputs, train=True, remat=tcfg.remat, logits=False, scan=tcfg.scan_layers)
    head = for_compute(model.head.weight[...], model.head.weight)
    kw = dict(precision=tcfg.head_precision, bf16_head=tcfg.bf16_weight_qat)
    ce = chunked_cross_entropy(model.head_inputs(X), head, targets, **kw)
    metrics = {"loss": ce}                     # the next-token cross-entropy
    loss = ce
    mtp_infos = []
    if cfg.num_nextn_predict_layers and tcfg.mtp_loss_weight > 0:
        states, mtp_infos = model.mtp_states(X, targets, train=True, remat=tcfg.remat)
        # MTP block j at position t predicts token t + 2 + j (drop positions past the sequence)
        S = targets.shape[1]
        mtp_ce = jnp.mean(jnp.stack([
            chunked_cross_entropy(model.head_inputs(Xj[:, : S - 1 - j], owner=blk), head, tokens[:, 2 + j:], **kw)
            for j, (blk, Xj) in enumerate(states)]))
        metrics["mtp_ce"] = mtp_ce
        loss = loss + tcfg.mtp_loss_weight * mtp_ce
    scored = _score_layers(cfg, infos, mtp_infos)
    if scored:
        bal = jnp.mean(jnp.stack([sequence_balance_loss(i["experts"], i["scores"], cfg.n_routed_experts)
                                  for _, i in scored]))
        metrics["balance_loss"] = bal
        loss = loss + tcfg.balance_loss_weight * bal
    kls = [i["indexer_kl"] for i in infos + mtp_infos if "indexer_kl" in i]
    if kls:
        kl = jnp.mean(jnp.stack(kls))
        metrics["indexer_kl"] = kl
        loss = loss + tcfg.indexer_loss_weight * kl
    counts = {path: expert_counts(i["experts"], cfg.n_routed_experts) for path, i in scored}
    if cfg.moe_capacity:  # expert-parallel capacity: the share of token-expert pairs dropped, mean over MoEs
        metrics["moe_dropped"] = jnp.mean(jnp.stack([i["dropped"] for i in infos + mtp_infos]))
    metrics["total_loss"] = loss
    return loss, metrics, counts


def update_gate_biases(params, counts, speed: float):
    """Aux-loss-free balancing: ``bias += speed · sign(mean load - load)`` for each score-routed layer."""
    if speed == 0 or not counts:
        return params
    params = jax.tree_util.tree_map(lambda x: x, params)  # fresh containers, leaves shared
    for (group, idx), c in counts.items():
        gate = params[group][idx]["ffn"]["gate"]
        gate["bias"] = gate["bias"] + speed * jnp.sign(jnp.mean(c) - c)
    return params


def load_stats(counts):
    """Worst expert load over layers, relative to the mean: (max, min)."""
    rel = [c / jnp.maximum(jnp.mean(c), 1e-9) for c in counts.values()]
    return jnp.max(jnp.stack([r.max() for r in rel])), jnp.min(jnp.stack([r.min() for r in rel]))


def bf16_tensor_names(cfg: ModelConfig) -> set[str]:
    """Names of the parameters a checkpoint of ``cfg`` stores in BF16 (embedding, head, norms, gate,
    compressor, indexer ``weights_proj``; every weight matrix when it has no ``quantization_config``)."""
    return {name for name, (dtype, _) in expected_tensors(cfg).items() if dtype == "BF16"}


def round_bf16_tensors(params, cfg: ModelConfig):
    """``train.bf16_weight_qat``: the parameters the release stores in BF16, rounded to bf16 values for
    the forward pass (still float32 arrays, so gradients accumulate in fp32) with a straight-through
    gradient to the fp32 masters: the trained model is what an export, which rounds them, computes."""
    names, E = bf16_tensor_names(cfg), cfg.n_routed_experts

    def one(kp, v):
        if tensor_names(path_to_name(tuple(k.key for k in kp)), E)[0] not in names:
            return v
        return v + jax.lax.stop_gradient(v.astype(jnp.bfloat16).astype(v.dtype) - v)  # exactly the bf16 value
    return jax.tree_util.tree_map_with_path(one, params)


def untrained_parts(tcfg: TrainConfig) -> set[str]:
    """Parameter groups (a component of their names) that no loss term trains with ``tcfg``'s weights:
    ``mtp`` (the MTP blocks) when ``mtp_loss_weight`` is 0, ``indexer`` (the lightning indexers, trained
    by their KL alone) when ``indexer_loss_weight`` is 0. ``make_train_step`` keeps them unchanged:
    the optimizer would still decay them toward zero (fine-tuning a release without the MTP loss
    would erase its MTP block)."""
    return {part for part, w in (("mtp", tcfg.mtp_loss_weight), ("indexer", tcfg.indexer_loss_weight)) if not w}


def keep_untrained(new, old, parts: set[str]):
    """``new`` params with the leaves whose path names one of ``parts`` taken from ``old``."""
    if not parts:
        return new
    return jax.tree_util.tree_map_with_path(
        lambda kp, n, o: o if parts & {str(getattr(k, "key", k)) for k in kp} else n, new, old)


def make_train_step(graphdef, cfg: ModelConfig, tcfg: TrainConfig, tx: optax.GradientTransformation,
                    lr_schedule):
    """Returns ``step(state, tokens) -> (state, metrics)`` (pure; jit it with the state's shardings).

    ``graphdef`` comes from ``nnx.split(model, nnx.Param, ...)``.
    """

    def loss_fn(params, buffers, tokens):
        if tcfg.bf16_weight_qat:
            params = round_bf16_tensors(params, cfg)
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))
        with gathered_weights():  # FSDP under a mesh
            loss, metrics, counts = compute_loss(model, tokens, cfg, tcfg)
        return loss, (metrics, counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    untrained = untrained_parts(tcfg)

    def grads_of(params, buffers, tokens):
        """(metrics, counts, grads) of the batch, in ``tcfg.grad_accum`` microbatches run one after another."""
        A = tcfg.grad_accum
        if A == 1:
            (_, (metrics, counts)), grads = grad_fn(params, buffers, tokens)
            return metrics, counts, grads
        B = tokens.shape[0]
        if B % A:
            raise ValueError(f"a batch of {B} rows does not split into train.grad_accum={A} microbatches")
        # microbatch i holds rows i, i + A, i + 2A, ...: the rows each device holds (a contiguous block
        # of the batch) split evenly over the microbatches, so every microbatch stays data-parallel
        micro = jnp.swapaxes(tokens.reshape(B // A, A, -1), 0, 1)
        if not jax.sharding.get_abstract_mesh().empty:
            micro = jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES))

        def one(carry, mb):
            (_, aux), g = grad_fn(params, buffers, mb)
            return jax.tree_util.tree_map(jnp.add, carry, (aux, g)), None

        shapes = jax.eval_shape(grad_fn, params, buffers, micro[0])
        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][1], shapes[1]))
        ((metrics, counts), grads), _ = jax.lax.scan(one, zeros, micro)
        # every microbatch has as many sequences and tokens: the batch's mean losses and gradient are
        # the microbatches' means; expert counts add up
        metrics, grads = jax.tree_util.tree_map(lambda x: x / A, (metrics, grads))
        return metrics, counts, grads

    def step(state, tokens):
        metrics, counts, grads = grads_of(state["params"], state["buffers"], tokens)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = update_gate_biases(params, counts, tcfg.bias_update_speed)
        params = keep_untrained(params, state["params"], untrained)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                            for g in jax.tree_util.tree_leaves(grads)))
        metrics["lr"] = lr_schedule(state["step"])
        if counts:
            metrics["max_expert_load"], metrics["min_expert_load"] = load_stats(counts)
        new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new, metrics

    return step


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, mtp: bool = True) -> float:
    """Model FLOPs of one training token (forward + backward = 3 × forward), for MFU.

    Matmuls: 2 FLOPs per active weight (projections, compressors, indexer, gate, shared and the
    k routed experts, mHC mixes, head; the MTP blocks with ``mtp``, i.e. when a loss runs them).
    Attention: 4·H·hd per attended key (scores and values) with the average key count of each layer
    kind at this sequence length.
    """
    D, H, hd, hc = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    I, k, E = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    per_block = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * hd + D * hd + H * hd * cfg.o_lora_rank
                 + cfg.o_groups * cfg.o_lora_rank * D + E * D + 3 * D * I * (k + cfg.n_shared_experts)
                 + 2 * (2 + hc) * hc * hc * D)
    flops = 0.0
    win = min(cfg.sliding_window, seq_len)
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    for r in cfg.compress_ratios[:cfg.num_hidden_layers + n_mtp]:
        w = per_block
        keys = win
        if r:
            c = 2 if r == 4 else 1
            w += 2 * D * c * hd
            keys += min(cfg.index_topk, seq_len / r / 2) if r == 4 else seq_len / r / 2
        if r == 4:
            IH, ID = cfg.index_n_heads, cfg.index_head_dim
            w += cfg.q_lora_rank * IH * ID + D * IH + 2 * D * 2 * ID
            flops += 2 * IH * ID * seq_len / 8                   # indexer scores, average entry count
        flops += 2 * w + 4 * H * hd * keys
    flops += 2 * cfg.vocab_size * D * (1 + n_mtp)
    flops += 2 * 2 * D * D * n_mtp                              # e_proj, h_proj
    return 3.0 * flops
