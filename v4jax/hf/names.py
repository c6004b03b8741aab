"""The released tensor set of a config (SPEC §4), and the map between tensor names and model paths.

``expected_tensors(cfg)`` is written from the spec alone (names, dtypes, shapes), not from the model
code, so validating a checkpoint against it also checks that the model and the spec agree.

Model parameter paths mirror the tensor names (``layers.3.attn.wq_a.weight`` is
``model.layers[3].attn.wq_a.weight``) with two exceptions: routed experts are stacked
(``layers.N.ffn.experts.w1.weight [E, out, in]`` holds ``layers.N.ffn.experts.{e}.w1.weight``) and the
float layout stores ``wo_a`` as ``[G, r, H·hd/G]``.
"""
from __future__ import annotations

from v4jax.config import ModelConfig


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of every tensor a checkpoint of ``cfg`` holds."""
    V, D, hc = cfg.vocab_size, cfg.hidden_size, cfg.hc_mult
    H, hd, G, r = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    E, I, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    quantized = cfg.quantization_config is not None
    t: dict[str, tuple[str, tuple[int, ...]]] = {}

    def fp8(name, out_dim, in_dim):
        if quantized:
            t[name + ".weight"] = ("F8_E4M3", (out_dim, in_dim))
            t[name + ".scale"] = ("F8_E8M0", (_cdiv(out_dim, 128), _cdiv(in_dim, 128)))
        else:
            t[name + ".weight"] = ("BF16", (out_dim, in_dim))

    def expert(name, out_dim, in_dim):
        if quantized and cfg.expert_dtype == "fp4":
            t[name + ".weight"] = ("I8", (out_dim, in_dim // 2))
            t[name + ".scale"] = ("F8_E8M0", (out_dim, in_dim // 32))
        elif quantized and cfg.expert_dtype == "fp8":
            fp8(name, out_dim, in_dim)
        else:
            t[name + ".weight"] = ("BF16", (out_dim, in_dim))

    def bf16(name, *shape):
        t[name] = ("BF16", tuple(shape))

    def f32(name, *shape):
        t[name] = ("F32", tuple(shape))

    def hc_head(p):
        f32(p + "hc_head_fn", hc, hc * D)
        f32(p + "hc_head_base", hc)
        f32(p + "hc_head_scale", 1)

    def compressor(p, ratio, d):
        c = 2 if ratio == 4 else 1
        f32(p + "ape", ratio, c * d)
        bf16(p + "wkv.weight", c * d, D)
        bf16(p + "wgate.weight", c * d, D)
        bf16(p + "norm.weight", d)

    def block(p, ratio, hashed):
        bf16(p + "attn_norm.weight", D)
        bf16(p + "ffn_norm.weight", D)
        for sub in ("attn", "ffn"):
            f32(p + f"hc_{sub}_fn", (2 + hc) * hc, hc * D)
            f32(p + f"hc_{sub}_base", (2 + hc) * hc)
            f32(p + f"hc_{sub}_scale", 3)
        a = p + "attn."
        fp8(a + "wq_a", cfg.q_lora_rank, D)
        bf16(a + "q_norm.weight", cfg.q_lora_rank)
        fp8(a + "wq_b", H * hd, cfg.q_lora_rank)
        fp8(a + "wkv", hd, D)
        bf16(a + "kv_norm.weight", hd)
        fp8(a + "wo_a", G * r, H * hd // G)
        fp8(a + "wo_b", D, G * r)
        f32(a + "attn_sink", H)
        if ratio:
            compressor(a + "compressor.", ratio, hd)
        if ratio == 4:
            fp8(a + "indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            bf16(a + "indexer.weights_proj.weight", cfg.index_n_heads, D)
            compressor(a + "indexer.compressor.", 4, cfg.index_head_dim)
        f = p + "ffn."
        bf16(f + "gate.weight", E, D)
        if hashed:
            t[f + "gate.tid2eid"] = ("I64", (V, k))
        else:
            f32(f + "gate.bias", E)
        for e in range(E):
            expert(f + f"experts.{e}.w1", I, D)
            expert(f + f"experts.{e}.w2", D, I)
            expert(f + f"experts.{e}.w3", I, D)
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            fp8(f + "shared_experts.w1", Is, D)
            fp8(f + "shared_experts.w2", D, Is)
            fp8(f + "shared_experts.w3", Is, D)

    bf16("embed.weight", V, D)
    bf16("head.weight", V, D)
    bf16("norm.weight", D)
    hc_head("")
    L = cfg.num_hidden_layers
    for i in range(L):
        block(f"layers.{i}.", cfg.compress_ratios[i], i < cfg.num_hash_layers)
    for j in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{j}."
        block(p, cfg.compress_ratios[L + j], False)
        fp8(p + "e_proj", D, D)
        fp8(p + "h_proj", D, D)
        bf16(p + "enorm.weight", D)
        bf16(p + "hnorm.weight", D)
        bf16(p + "norm.weight", D)
        hc_head(p)
    return t


def path_to_name(path: tuple) -> str:
    """Model state path (strings and ints) -> dotted name, e.g. ``('layers', 3, 'attn', 'wq_a', 'weight')``."""
    return ".".join(str(p) for p in path)


def expert_stack(name: str) -> tuple[str, str] | None:
    """``layers.N.ffn.experts.w1.weight`` -> (``layers.N.ffn.experts.``, ``.w1.weight``); None if not a stack."""
    head, sep, tail = name.partition(".experts.")
    if not sep or tail.split(".")[0].isdigit():
        return None
    return head + sep, "." + tail


def tensor_names(name: str, n_experts: int) -> list[str]:
    """The checkpoint tensors one model parameter is made of (E of them for an expert stack)."""
    stack = expert_stack(name)
    if stack is None:
        return [name]
    return [f"{stack[0]}{e}{stack[1]}" for e in range(n_experts)]
