"""Typed configuration: the model (HF ``config.json`` keys, SPEC §1), YAML presets and dotted overrides.

``ModelConfig`` fields carry the names of the released ``config.json`` so that a preset YAML's
``model:`` section and a checkpoint's ``config.json`` read the same way. Everything is a frozen
dataclass; construction validates and raises ``ConfigError`` naming the offending key.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

if TYPE_CHECKING:  # section types defined beside their code
    from v4jax.data import DataConfig
    from v4jax.optim import OptimizerConfig

log = logging.getLogger(__name__)

MODES = ("exact", "qat", "production")


class ConfigError(ValueError):
    """A configuration key is missing, unknown, of the wrong type or contradicts another."""


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class RopeScaling:
    """YaRN frequency interpolation for compressed layers (SPEC §2 RoPE)."""
    type: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        _check(self.type == "yarn", f"rope_scaling.type: only 'yarn' is supported, got {self.type!r}")
        _check(self.factor >= 1, f"rope_scaling.factor must be >= 1, got {self.factor}")
        _check(self.original_max_position_embeddings > 0,
               f"rope_scaling.original_max_position_embeddings must be > 0, got {self.original_max_position_embeddings}")
        _check(self.beta_fast > self.beta_slow > 0,
               f"rope_scaling: need beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")


@dataclass(frozen=True)
class QuantizationConfig:
    """How the released weights are stored (SPEC §4). ``None`` on the model = plain BF16 weights."""
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    scale_fmt: str = "ue8m0"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"

    def __post_init__(self):
        _check(self.quant_method == "fp8", f"quantization_config.quant_method: only 'fp8', got {self.quant_method!r}")
        _check(self.fmt == "e4m3", f"quantization_config.fmt: only 'e4m3', got {self.fmt!r}")
        _check(self.scale_fmt == "ue8m0", f"quantization_config.scale_fmt: only 'ue8m0', got {self.scale_fmt!r}")
        _check(tuple(self.weight_block_size) == (128, 128),
               f"quantization_config.weight_block_size: only [128, 128], got {list(self.weight_block_size)}")


# ModelConfig fields that say how v4jax runs the model, not what it is: not config.json keys, and free to
# differ between a checkpoint and the run that loads or resumes it
RUNTIME_KEYS = ("attention_impl", "moe_impl", "moe_capacity")


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4 architecture. Field names are the HF ``config.json`` keys (SPEC §1)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    swiglu_limit: float
    num_hash_layers: int
    num_nextn_predict_layers: int
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    compress_ratios: tuple[int, ...]
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: RopeScaling
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 65536
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    expert_dtype: str | None = "fp4"
    quantization_config: QuantizationConfig | None = None
    # --- not in config.json: how v4jax runs the model
    attention_impl: Literal["xla", "pallas"] = "xla"
    moe_impl: Literal["xla", "pallas"] = "xla"  # routed experts: ragged_dot or the grouped-matmul kernel
    # expert parallelism (mesh expert axis n > 1): 0 = dropless, each device sized for all of its expert
    # group's token-expert pairs; c > 0 = at most ceil(c * pairs / n) pairs per device, the rest dropped
    moe_capacity: float = 0.0

    def __post_init__(self):
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "moe_intermediate_size",
                    "n_routed_experts", "num_experts_per_tok", "sliding_window", "hc_mult", "hc_sinkhorn_iters"]
        for k in positive:
            _check(getattr(self, k) > 0, f"{k} must be > 0, got {getattr(self, k)}")
        for k in ["n_shared_experts", "num_hash_layers", "num_nextn_predict_layers"]:
            _check(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        _check(self.num_key_value_heads == 1,
               f"num_key_value_heads: V4 has one shared KV head, got {self.num_key_value_heads}")
        _check(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.head_dim,
               f"qk_rope_head_dim must be even and <= head_dim ({self.head_dim}), got {self.qk_rope_head_dim}")
        _check((self.num_attention_heads * self.head_dim) % self.o_groups == 0,
               f"o_groups ({self.o_groups}) must divide num_attention_heads*head_dim "
               f"({self.num_attention_heads * self.head_dim})")
        _check(self.num_experts_per_tok <= self.n_routed_experts,
               f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})")
        _check(self.num_hash_layers <= self.num_hidden_layers,
               f"num_hash_layers ({self.num_hash_layers}) > num_hidden_layers ({self.num_hidden_layers})")
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        _check(len(self.compress_ratios) == n,
               f"compress_ratios has {len(self.compress_ratios)} entries, need num_hidden_layers + "
               f"num_nextn_predict_layers = {n}")
        for i, r in enumerate(self.compress_ratios):
            _check(r >= 0, f"compress_ratios[{i}] must be >= 0, got {r}")
        if 4 in self.compress_ratios:
            for k in ["index_n_heads", "index_head_dim", "index_topk"]:
                _check(getattr(self, k) > 0, f"{k} must be > 0 when a layer has compress ratio 4, got {getattr(self, k)}")
            d = self.index_head_dim
            _check(d & (d - 1) == 0, f"index_head_dim must be a power of two (Hadamard rotation), got {d}")
            _check(self.qk_rope_head_dim <= d, f"qk_rope_head_dim ({self.qk_rope_head_dim}) > index_head_dim ({d})")
        _check(self.scoring_func == "sqrtsoftplus", f"scoring_func: only 'sqrtsoftplus', got {self.scoring_func!r}")
        _check(self.topk_method == "noaux_tc", f"topk_method: only 'noaux_tc', got {self.topk_method!r}")
        _check(self.norm_topk_prob is True, f"norm_topk_prob: only true is supported, got {self.norm_topk_prob}")
        _check(self.hidden_act == "silu", f"hidden_act: only 'silu', got {self.hidden_act!r}")
        _check(self.tie_word_embeddings is False, "tie_word_embeddings: V4 has a separate head; true is unsupported")
        _check(self.expert_dtype in (None, "fp4", "fp8", "bf16"),
               f"expert_dtype must be fp4, fp8, bf16 or absent, got {self.expert_dtype!r}")
        _check(self.attention_impl in ("xla", "pallas"),
               f"attention_impl must be 'xla' or 'pallas', got {self.attention_impl!r}")
        _check(self.moe_impl in ("xla", "pallas"), f"moe_impl must be 'xla' or 'pallas', got {self.moe_impl!r}")
        _check(isinstance(self.moe_capacity, (int, float)) and self.moe_capacity >= 0,
               f"moe_capacity must be a number >= 0 (0: dropless), got {self.moe_capacity!r}")
        if self.quantization_config is not None and self.expert_dtype == "fp4":
            _check(self.moe_intermediate_size % 32 == 0 and self.hidden_size % 32 == 0,
                   "FP4 experts need hidden_size and moe_intermediate_size to be multiples of 32")

    # --- derived quantities
    @property
    def num_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def layer_ratio(self, i: int) -> int:
        return self.compress_ratios[i]

    def to_hf_dict(self) -> dict:
        """The ``config.json`` form (drops v4jax-only fields)."""
        d = dataclasses.asdict(self)
        for k in RUNTIME_KEYS:
            d.pop(k)
        d["compress_ratios"] = list(self.compress_ratios)
        if self.quantization_config is not None:
            d["quantization_config"]["weight_block_size"] = list(self.quantization_config.weight_block_size)
        else:
            d.pop("quantization_config")
        if self.expert_dtype is None:
            d.pop("expert_dtype")
        return {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **d}


# ------------------------------------------------------------------------------------------- building

# config.json keys that carry nothing the model computes with; read and ignored without a warning.
_HF_IGNORED = {"architectures", "model_type", "transformers_version", "use_cache", "initializer_range",
               "attention_bias", "attention_dropout", "auto_map", "pad_token_id", "rope_interleave",
               "first_k_dense_replace", "n_group", "topk_group", "kv_lora_rank", "qk_nope_head_dim",
               "v_head_dim", "ep_size", "moe_layer_freq", "pretraining_tp", "_name_or_path", "dtype"}


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value, tp, key: str):
    """Convert a YAML/JSON value to the annotated field type, or raise naming ``key``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        _check(optional, f"{key}: null is not allowed")
        return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, prefix=key + ".")
    if origin is Literal:
        _check(value in typing.get_args(tp), f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), f"{key}: expected {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _check(isinstance(value, bool), f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool) or
               (isinstance(value, float) and value.is_integer()), f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data: dict, *, prefix: str = "", ignore: frozenset | set = frozenset()):
    """Build frozen dataclass ``cls`` from a mapping; unknown or missing keys are errors naming them."""
    _check(isinstance(data, dict), f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields) - set(ignore))
    _check(not unknown, f"unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
                        f"known: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):  # "field: ..." -> "model.field: ...", else "model: ..."
            msg = prefix + msg if msg.split(":")[0].split(" ")[0] in fields else f"{prefix.rstrip('.')}: {msg}"
        raise ConfigError(msg) from None


def from_hf_config(path_or_dict: str | Path | dict, **overrides) -> ModelConfig:
    """Read a released ``config.json`` (a path to the file or its directory, or the parsed dict).

    Every architectural key must be present (no preset is assumed); keys v4jax does not know are
    reported in a warning; contradictory values raise ``ConfigError`` naming them.
    """
    if isinstance(path_or_dict, dict):
        data, src = dict(path_or_dict), "config dict"
    else:
        p = Path(path_or_dict)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"config.json not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from None
        src = str(p)
    if data.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(f"{src}: model_type is {data['model_type']!r}, expected 'deepseek_v4'")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - set(RUNTIME_KEYS)
    unknown = sorted(set(data) - known - _HF_IGNORED)
    if unknown:
        log.warning("%s: ignoring config.json keys v4jax does not use: %s", src, unknown)
    if "quantization_config" not in data:
        data["quantization_config"] = None
    if "expert_dtype" not in data:
        data["expert_dtype"] = None
    rope = data.get("rope_scaling")
    if isinstance(rope, dict) and "rope_type" in rope and "type" not in rope:
        rope = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
        data["rope_scaling"] = rope
    if isinstance(rope, dict):
        extra = sorted(set(rope) - {f.name for f in dataclasses.fields(RopeScaling)})
        if extra:
            log.warning("%s: ignoring rope_scaling keys %s", src, extra)
            data["rope_scaling"] = {k: v for k, v in rope.items() if k not in extra}
    qc = data.get("quantization_config")
    if isinstance(qc, dict):
        data["quantization_config"] = {k: v for k, v in qc.items()
                                       if k in {f.name for f in dataclasses.fields(QuantizationConfig)}}
    data.update(overrides)
    try:
        return build(ModelConfig, data, ignore=_HF_IGNORED | set(unknown))
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


# ------------------------------------------------------------------------------------------- YAML

def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    _check(isinstance(data, dict), f"{p}: top level must be a mapping")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a nested dict, returning a copy.

    The key must already exist in ``data`` (a typo is an error naming it), except inside sections
    whose dataclass has defaults — those are checked when the dataclass is built.
    """
    out = json.loads(json.dumps(data))
    for item in overrides:
        _check("=" in item, f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            _check(isinstance(nxt, dict), f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A YAML preset's ``model:`` section (or a ``config.json``) -> ModelConfig."""
    p = Path(path)
    if p.suffix == ".json" or p.is_dir():
        return from_hf_config(p)
    data = apply_overrides(load_yaml(p), list(overrides))
    _check("model" in data, f"{p}: no 'model:' section")
    try:
        return build(ModelConfig, data["model"], prefix="model.")
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    """The training loop and its loss terms (SPEC §6)."""
    steps: int = 1000
    log_every: int = 10
    seed: int = 0
    mode: Literal["exact", "qat", "production"] = "production"  # numerics of the forward pass
    mtp_loss_weight: float = 0.3
    balance_loss_weight: float = 1e-4         # sequence-wise balance loss
    bias_update_speed: float = 1e-3           # aux-loss-free gate-bias step (sign of the load error)
    indexer_loss_weight: float = 1.0          # lightning-indexer KL to the main attention
    fp4_expert_qat: bool = False              # fake-quantise routed-expert weights to FP4 (STE)
    fp8_weight_qat: bool = False              # fake-quantise the release's FP8 layers' weights (STE)
    bf16_weight_qat: bool = False             # round the release's BF16 tensors to bf16 on use (STE)
    peak_tflops: float | None = None          # per device, for MFU; None: by device kind, else no MFU
    remat: bool = False                       # recompute each block in the backward pass
    scan_layers: bool = False                 # repeated layers as one lax.scan: shorter compilation
    # gradient accumulation: each step runs data.global_batch as this many microbatches, one after
    # another, and updates once (activation memory of global_batch / grad_accum sequences)
    grad_accum: int = 1
    # the loss's head matmuls (main and MTP, forward and backward; SPEC: fp32): "fp32" true fp32
    # products; "bf16x6" / "bf16x3" / "bf16": that many bf16 tensor-core passes (x6 ~ fp32 accuracy,
    # x3 ~ 1e-5 relative, 1 pass ~ 4e-3), production mode only. XLA:CPU computes all of them in fp32.
    head_precision: Literal["fp32", "bf16x6", "bf16x3", "bf16"] = "fp32"
    # a fresh run's initial weights (a resumed run restores its own): a released checkpoint, an
    # orbax-form directory or a train.py run; its model config must equal the run's (v4jax.checkpoint.init_weights)
    init_from: str | None = None

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        for k in ("mtp_loss_weight", "balance_loss_weight", "bias_update_speed", "indexer_loss_weight"):
            _check(getattr(self, k) >= 0, f"train.{k} must be >= 0, got {getattr(self, k)}")
        _check(self.peak_tflops is None or self.peak_tflops > 0, f"train.peak_tflops must be > 0, got {self.peak_tflops}")
        _check(self.head_precision == "fp32" or self.mode == "production",
               f"train.head_precision={self.head_precision} needs train.mode=production "
               f"(mode {self.mode} computes the head in fp32)")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500          # save every N steps (and always at the end / on SIGTERM)
    keep: int = 3             # newest checkpoints kept
    async_save: bool = True   # write in the background while training continues

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; their product must equal the device count. -1: the remaining devices."""
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        for name, v in zip(("data", "fsdp", "expert", "tensor"), sizes):
            _check(v == -1 or v >= 1, f"mesh.{name} must be >= 1 or -1, got {v}")
        _check(sizes.count(-1) <= 1, f"at most one mesh axis may be -1, got {sizes}")


@dataclass(frozen=True)
class Config:
    """A run: ``model`` (HF keys), ``train``, ``data``, ``optimizer``, ``mesh``, ``checkpoint`` sections."""
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    data: "DataConfig" = None  # type: ignore[assignment]
    optimizer: "OptimizerConfig" = None  # type: ignore[assignment]
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_hf_dict()
        for k in ("architectures", "model_type"):
            d["model"].pop(k)
        return json.loads(json.dumps(d))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """A YAML run config with ``dotted.key=value`` overrides -> Config (errors name the key)."""
    from v4jax.data import DataConfig
    from v4jax.optim import OptimizerConfig

    p = Path(path)
    data = apply_overrides(load_yaml(p), list(overrides))
    sections = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "optimizer": OptimizerConfig,
                "mesh": MeshConfig, "checkpoint": CheckpointConfig}
    unknown = sorted(set(data) - set(sections))
    _check(not unknown, f"{p}: unknown section(s) {unknown}; known: {sorted(sections)}")
    _check("model" in data, f"{p}: no 'model:' section")
    built = {}
    for name, cls in sections.items():
        try:
            built[name] = build(cls, data.get(name) or {}, prefix=name + ".")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except ValueError as e:  # section validators of data / optimizer
            raise ConfigError(f"{p}: {name}: {e}") from None
    m, t = built["model"], built["train"]
    quantized = m.quantization_config is not None
    _check(not t.fp8_weight_qat or quantized,
           f"{p}: train.fp8_weight_qat needs model.quantization_config (without one the FP8 layers are stored in BF16)")
    _check(not t.fp4_expert_qat or (quantized and m.expert_dtype == "fp4"),
           f"{p}: train.fp4_expert_qat needs FP4 routed experts (model.quantization_config and "
           f"model.expert_dtype: fp4; expert_dtype is {m.expert_dtype})")
    return Config(**built)
