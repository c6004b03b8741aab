"""Safetensors I/O and the checkpoint loader: dtypes, validation errors that name the tensor, layouts."""
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from v4jax import quant
from v4jax.hf.checkpoint import load_model
from v4jax.hf.names import expected_tensors
from v4jax.hf.safetensors import CheckpointError, SafetensorsReader, read_header, write_safetensors
from conftest import small_config, write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = small_config()
    path = tmp_path_factory.mktemp("ckpt")
    tensors = write_random_checkpoint(path, cfg)
    return path, cfg, tensors


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt[0], dst)
    return dst


def test_every_dtype_round_trips(tmp_path):
    arrays = {
        "bf16": np.array([[1.5, -2.0]], ml_dtypes.bfloat16), "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f8": np.array([0.5, 448.0], ml_dtypes.float8_e4m3fn), "e8m0": np.array([1.0, 0.25], ml_dtypes.float8_e8m0fnu),
        "i8": np.array([-3, 7], np.int8), "i64": np.array([[1, 2]], np.int64), "empty": np.zeros((0, 4), np.float32),
    }
    write_safetensors(tmp_path / "a.safetensors", arrays)
    with SafetensorsReader(tmp_path / "a.safetensors") as r:
        assert {r.info(k).dtype for k in r.keys()} == {"BF16", "F32", "F8_E4M3", "F8_E8M0", "I8", "I64"}
        for k, v in arrays.items():
            assert r[k].dtype == v.dtype and r[k].shape == v.shape
            np.testing.assert_array_equal(r[k].view(np.uint8), v.view(np.uint8))


def test_golden_checkpoint_validates_and_reads(golden):
    from v4jax.config import from_hf_config
    from v4jax.hf.checkpoint import validate
    path = golden / "tiny" / "checkpoint"
    with SafetensorsReader(path) as r:
        validate(r, from_hf_config(path))
        assert r["layers.0.ffn.gate.tid2eid"].dtype == np.int64
        assert r["layers.0.ffn.experts.0.w1.weight"].dtype == np.int8
        assert r["layers.0.attn.wq_a.scale"].dtype == ml_dtypes.float8_e8m0fnu


def test_missing_tensor_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = "layers.1.attn.indexer.weights_proj.weight"
    fname = index["weight_map"].pop(victim)
    with SafetensorsReader(path / fname) as r:
        kept = {k: np.array(r[k]) for k in r.keys() if k != victim}
    write_safetensors(path / fname, kept)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{victim}'"):
        load_model(path, progress=False)


def _rewrite(path, name, new_value):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    fname = index["weight_map"][name]
    with SafetensorsReader(path / fname) as r:
        arrays = {k: np.array(r[k]) for k in r.keys()}
    arrays[name] = new_value
    write_safetensors(path / fname, arrays)


def test_wrong_dtype_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    name = "layers.0.attn.wq_a.weight"
    _rewrite(path, name, np.zeros(ckpt[2][name].shape, ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has dtype BF16, expected F8_E4M3"):
        load_model(path, progress=False)


def test_wrong_shape_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    name = "layers.2.attn.attn_sink"
    _rewrite(path, name, np.zeros((5,), np.float32))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[5\], expected \[2\]"):
        load_model(path, progress=False)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    write_safetensors(path / "extra.safetensors", {"layers.9.attn.wq_a.weight": np.zeros(2, np.float32)})
    index["weight_map"]["layers.9.attn.wq_a.weight"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.9.attn.wq_a.weight'"):
        load_model(path, progress=False)


def test_truncated_file_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    f = sorted(path.glob("model-*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{f.name}.*truncated"):
        load_model(path, progress=False)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(f)


def test_bad_paths(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere", progress=False)
    path = _copy(ckpt, tmp_path)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        SafetensorsReader(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        SafetensorsReader(empty)


def _edit_header(f, edit):
    """Rewrite the JSON header of safetensors file ``f`` with ``edit(header) -> header``, data unchanged."""
    import struct
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    blob = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _set(name, key, value):
    def edit(h):
        h[name][key] = value
        return h
    return edit


@pytest.mark.parametrize("case, match", [
    ("header_not_object", "header is not a JSON object"),
    ("offsets_not_integers", "must be non-negative integers"),
    ("negative_offsets", "must be non-negative integers"),
    ("float_shape", "must be non-negative integers"),
    ("dtype_not_a_string", "attn_sink' has unsupported dtype \\['F32'\\]"),
    ("overlap", "overlaps the tensor before it"),
    ("trailing_bytes", "7 bytes after the last tensor"),
    ("index_not_a_map", "weight_map must map tensor names to file names"),
    ("unlisted_tensor", "in the shards but not in model.safetensors.index.json"),
])
def test_malformed_files_are_named(ckpt, tmp_path, case, match):
    """Headers and indices that a safetensors writer never produces are refused, naming the file."""
    path = _copy(ckpt, tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "layers.0.attn.attn_sink"
    f = path / index["weight_map"][name]
    with SafetensorsReader(f) as r:  # two tensors of one dtype and shape: the second pointed at the first
        infos = [r.info(k) for k in r.keys()]
        base = min(i.begin for i in infos)
        first, second = next((a, b) for a in infos for b in infos
                             if a.begin < b.begin and (a.dtype, a.shape) == (b.dtype, b.shape))
    if case == "header_not_object":
        _edit_header(f, lambda h: [h])
    elif case == "offsets_not_integers":
        _edit_header(f, _set(name, "data_offsets", ["0", "8"]))
    elif case == "negative_offsets":
        _edit_header(f, _set(name, "data_offsets", [-8, 0]))
    elif case == "float_shape":
        _edit_header(f, _set(name, "shape", [2.0]))
    elif case == "dtype_not_a_string":
        _edit_header(f, _set(name, "dtype", ["F32"]))
    elif case == "overlap":
        _edit_header(f, _set(second.name, "data_offsets", [first.begin - base, first.end - base]))
    elif case == "trailing_bytes":
        with open(f, "ab") as fh:
            fh.write(b"\0" * 7)
    elif case == "index_not_a_map":
        index_file.write_text(json.dumps({"weight_map": list(index["weight_map"])}))
    elif case == "unlisted_tensor":
        del index["weight_map"][name]
        index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        load_model(path, progress=False)


def test_hash_table_naming_a_missing_expert_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    name = next(n for n in ckpt[2] if n.endswith(".tid2eid"))
    ids = np.array(ckpt[2][name])
    ids[3, 0] = ckpt[1].n_routed_experts
    _rewrite(path, name, ids)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has expert ids .* outside"):
        load_model(path, progress=False)


def test_loaded_parameters_equal_dequantised_tensors(ckpt):
    path, cfg, tensors = ckpt
    model = load_model(path, progress=False)
    w = tensors["layers.1.attn.wq_b.weight"].astype(np.float32) * np.repeat(np.repeat(
        tensors["layers.1.attn.wq_b.scale"].astype(np.float32), 128, 0), 128, 1)[:cfg.num_attention_heads * cfg.head_dim, :cfg.q_lora_rank]
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.wq_b.weight[...]), w)
    e = 2
    want = quant.dequant_fp4(tensors[f"layers.2.ffn.experts.{e}.w3.weight"], tensors[f"layers.2.ffn.experts.{e}.w3.scale"])
    np.testing.assert_array_equal(np.asarray(model.layers[2].ffn.experts.w3.weight[...][e]), want)
    np.testing.assert_array_equal(np.asarray(model.layers[0].ffn.gate.tid2eid[...]), tensors["layers.0.ffn.gate.tid2eid"])
    G, r = cfg.o_groups, cfg.o_lora_rank
    wo_a = quant.dequant_fp8(tensors["layers.0.attn.wo_a.weight"], tensors["layers.0.attn.wo_a.scale"])
    np.testing.assert_array_equal(np.asarray(model.layers[0].attn.wo_a.weight[...]), wo_a.reshape(G, r, -1))


def test_released_layout_keeps_quantised_bytes_and_gives_the_same_logits(ckpt):
    path, cfg, tensors = ckpt
    fl = load_model(path, progress=False)
    rl = load_model(path, layout="released", progress=False)
    np.testing.assert_array_equal(np.asarray(rl.layers[1].ffn.experts.w1.weight[...][3]),
                                  tensors["layers.1.ffn.experts.3.w1.weight"])
    assert rl.layers[1].attn.wq_a.weight[...].dtype == jnp.float8_e4m3fn
    assert rl.embed.weight[...].dtype == jnp.bfloat16
    tok = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
    a = nnx.jit(lambda m, t: m(t)[0])(fl, tok)
    b = nnx.jit(lambda m, t: m(t)[0])(rl, tok)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_expected_tensor_table_matches_golden_index(golden):
    """The spec-derived table names exactly the tensors of the golden checkpoint."""
    from v4jax.config import from_hf_config
    path = golden / "tiny" / "checkpoint"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(expected_tensors(from_hf_config(path))) == set(index["weight_map"])
