"""Config: every config.json key read, clear errors for missing / contradictory / unknown keys, presets."""
import json

import pytest

from v4jax.config import ConfigError, apply_overrides, build, from_hf_config, load_model_config, ModelConfig
from conftest import REPO, small_config


def _golden_config(golden):
    return json.loads((golden / "tiny" / "checkpoint" / "config.json").read_text())


def test_reads_every_field_of_the_golden_config(golden):
    raw = _golden_config(golden)
    cfg = from_hf_config(golden / "tiny" / "checkpoint")
    for key in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "moe_intermediate_size",
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor",
                "swiglu_limit", "num_hash_layers", "num_nextn_predict_layers", "sliding_window", "index_n_heads",
                "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
                "rope_theta", "compress_rope_theta", "bos_token_id", "eos_token_id", "expert_dtype"]:
        assert getattr(cfg, key) == raw[key], key
    assert list(cfg.compress_ratios) == raw["compress_ratios"]
    assert cfg.rope_scaling.factor == raw["rope_scaling"]["factor"]
    assert cfg.rope_scaling.original_max_position_embeddings == raw["rope_scaling"]["original_max_position_embeddings"]
    assert list(cfg.quantization_config.weight_block_size) == raw["quantization_config"]["weight_block_size"]


def test_missing_key_is_named(golden):
    raw = _golden_config(golden)
    del raw["index_topk"]
    with pytest.raises(ConfigError, match="index_topk"):
        from_hf_config(raw)


@pytest.mark.parametrize("key,value,match", [
    ("compress_ratios", [0, 4, 128], "compress_ratios has 3 entries"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("num_experts_per_tok", 99, "num_experts_per_tok"),
    ("o_groups", 3, "o_groups"),
    ("index_head_dim", 96, "power of two"),
    ("scoring_func", "softmax", "scoring_func"),
    ("hidden_size", "big", "hidden_size: expected an integer"),
    ("num_hash_layers", 9, "num_hash_layers"),
])
def test_contradictory_or_bad_values_are_named(golden, key, value, match):
    raw = _golden_config(golden)
    raw[key] = value
    with pytest.raises(ConfigError, match=match):
        from_hf_config(raw)


def test_unknown_hf_keys_warn_and_bad_paths_error(golden, tmp_path, caplog):
    raw = _golden_config(golden)
    raw["some_future_key"] = 1
    from_hf_config(raw)
    assert "some_future_key" in caplog.text
    with pytest.raises(ConfigError, match="not found"):
        from_hf_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        from_hf_config(tmp_path)


def test_presets_load_and_have_every_feature():
    tiny = load_model_config(REPO / "configs" / "tiny.yaml")
    assert {0, 4} <= set(tiny.compress_ratios) and any(r not in (0, 4) for r in tiny.compress_ratios)
    assert tiny.num_hash_layers >= 1 and tiny.num_nextn_predict_layers >= 1
    flash = load_model_config(REPO / "configs" / "v4_flash.yaml")
    pro = load_model_config(REPO / "configs" / "v4_pro.yaml")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.n_routed_experts, flash.index_topk) == (4096, 43, 256, 512)
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-2:] == (4, 0)
    assert pro.compress_ratios[:4] == (128, 128, 4, 128) and len(pro.compress_ratios) == 62


def test_overrides_and_unknown_yaml_keys(tmp_path):
    cfg = load_model_config(REPO / "configs" / "tiny.yaml", ["model.sliding_window=64", "model.hc_eps=1e-5"])
    assert cfg.sliding_window == 64 and cfg.hc_eps == 1e-5
    with pytest.raises(ConfigError, match="model.sliding_windw"):
        load_model_config(REPO / "configs" / "tiny.yaml", ["model.sliding_windw=64"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["model.sliding_window"])
    with pytest.raises(ConfigError, match=r"model.moe_impl: must be one of \['xla', 'pallas'\], got 'triton'"):
        load_model_config(REPO / "configs" / "tiny.yaml", ["model.moe_impl=triton"])
    small = load_model_config(REPO / "configs" / "small.yaml", ["model.moe_impl=xla"])
    assert (small.attention_impl, small.moe_impl) == ("pallas", "xla")
    assert "moe_impl" not in small.to_hf_dict()


def test_to_hf_dict_round_trips():
    cfg = small_config()
    assert from_hf_config(cfg.to_hf_dict()) == cfg
    assert build(ModelConfig, {k: v for k, v in cfg.to_hf_dict().items()
                               if k not in ("architectures", "model_type")}) == cfg
