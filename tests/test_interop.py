"""Hugging Face interop: import/export against the independent PyTorch reference and real metadata.

Checkpoints here are written by the test itself (safetensors.torch, its own key renaming for the
Llama layout, its own safetensors headers), so the importer is checked against files it did not
produce; exports are loaded back by a fresh `RefLLaDA` with `load_state_dict(strict=True)`.
"""

import json
import math
import os
import re
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file

from llada_jax.config import ModelConfig, default_config
from llada_jax.interop import hf, llada
from llada_jax.model.transformer import Transformer
from llada_jax.parallel import make_mesh
from tests.interop_helpers import expected_hf_shapes, model_config_from_hf
from tests.test_program_runner import one_device_xla_flags
from tests.torch_reference import RefConfig, RefLLaDA, random_reference

# The real metadata from shared/hf_reference, copied into tests/data.
REAL = os.path.join(os.path.dirname(__file__), "data", "hf_reference",
                    "llada_v_language_tower")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB, D, LAYERS, HEADS, MLP = 64, 32, 2, 4, 48
MASK, BOS, EOS = 60, 59, 61


def reference(n_kv_heads: int, seed: int = 0) -> RefLLaDA:
    return random_reference(RefConfig(VOCAB, D, LAYERS, HEADS, n_kv_heads, MLP, 500000.0, 1e-5),
                            seed=seed)


def olmo_config(n_kv_heads: int, **changes) -> dict:
    """A released-style (OLMo field names) config.json of the tiny reference."""
    c = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": D,
         "n_heads": HEADS, "n_kv_heads": n_kv_heads, "n_layers": LAYERS,
         "mlp_hidden_size": MLP, "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB,
         "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 64,
         "mask_token_id": MASK, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS,
         "weight_tying": False, "include_bias": False, "block_type": "llama",
         "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False}
    c.update(changes)
    return c


def llama_config(n_kv_heads: int, **changes) -> dict:
    c = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "hidden_size": D,
         "num_attention_heads": HEADS, "num_key_value_heads": n_kv_heads,
         "num_hidden_layers": LAYERS, "intermediate_size": MLP, "vocab_size": VOCAB,
         "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
         "hidden_act": "silu", "attention_bias": False, "rope_scaling": None,
         "mask_token_id": MASK, "bos_token_id": BOS, "eos_token_id": EOS,
         "tie_word_embeddings": False}
    c.update(changes)
    return c


# The test's own LLaDA -> Llama key renaming (independent of llada.LAYOUTS).
LLAMA_RENAMES = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^model\.transformer\.blocks\.(\d+)\.(q|k|v)_proj\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.", r"model.layers.\1.mlp.up_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.", r"model.layers.\1.mlp.down_proj."),
]


def to_llama_name(key: str) -> str:
    for pattern, replacement in LLAMA_RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    raise AssertionError(f"no Llama name for {key}")


def save_checkpoint(directory, state: dict, config: dict, num_shards: int = 2,
                    dtype=torch.float32, generation_config: dict | None = None) -> None:
    """Writes a sharded safetensors checkpoint + index + config.json like Hugging Face does."""
    os.makedirs(directory, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    total = 0
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: state[k].detach().to(dtype or state[k].dtype).contiguous()
                for k in keys[s::num_shards]}
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(directory, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if generation_config is not None:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)


def reference_logits(model: RefLLaDA, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).numpy()


def our_logits(config: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 9))


@pytest.mark.parametrize("naming", ["llada", "llama"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_import_matches_reference_logits(tmp_path, naming, n_kv_heads):
    ref = reference(n_kv_heads, seed=n_kv_heads)
    state = ref.state_dict()
    if naming == "llama":
        state = {to_llama_name(k): v for k, v in state.items()}
        config_json = llama_config(n_kv_heads)
    else:
        config_json = olmo_config(n_kv_heads)
    save_checkpoint(tmp_path, state, config_json, num_shards=3)

    config, params = hf.import_hf(str(tmp_path))
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_dim, config.mlp_hidden_size, config.vocab_size) == \
        (D, LAYERS, HEADS, n_kv_heads, D // HEADS, MLP, VOCAB)
    assert (config.mask_token_id, config.bos_token_id, config.eos_token_id) == (MASK, BOS, EOS)
    assert config.rope_theta == 500000.0 and config.param_dtype == "float32"
    assert params["blocks"]["attn"]["k_proj"]["kernel"].shape == (LAYERS, D, n_kv_heads, D // HEADS)
    np.testing.assert_allclose(our_logits(config, params, TOKENS),
                               reference_logits(ref, TOKENS), rtol=2e-5, atol=2e-5)


def test_bf16_shards_keep_or_cast_dtype(tmp_path):
    ref = reference(2, seed=7)
    save_checkpoint(tmp_path, ref.state_dict(), olmo_config(2), dtype=torch.bfloat16)
    bf16_q = ref.state_dict()["model.transformer.blocks.1.q_proj.weight"].to(torch.bfloat16)
    # Layer 1's q_proj [H*hd, d] -> ours [d, H, hd]; exact bf16 values, no rounding anywhere.
    expected = bf16_q.float().numpy().T.reshape(D, HEADS, D // HEADS)

    config, params = hf.import_hf(str(tmp_path))
    q = params["blocks"]["attn"]["q_proj"]["kernel"]
    assert config.param_dtype == "bfloat16" and q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q[1], np.float32), expected)

    config32, params32 = hf.import_hf(str(tmp_path), param_dtype="float32")
    q32 = params32["blocks"]["attn"]["q_proj"]["kernel"]
    assert config32.param_dtype == "float32" and q32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q32[1]), expected)
    # The imported bf16 model computes what the bf16-rounded reference computes (in fp32).
    ref_rounded = reference(2, seed=7)
    ref_rounded.load_state_dict({k: v.to(torch.bfloat16).float()
                                 for k, v in ref.state_dict().items()})
    np.testing.assert_allclose(our_logits(config32, params32, TOKENS),
                               reference_logits(ref_rounded, TOKENS), rtol=2e-5, atol=2e-5)


def test_tied_embeddings_use_wte_as_lm_head(tmp_path):
    ref = reference(4, seed=5)
    with torch.no_grad():
        ref.model.transformer.ff_out.weight.copy_(ref.model.transformer.wte.weight)
    state = {k: v for k, v in ref.state_dict().items() if k != "model.transformer.ff_out.weight"}
    save_checkpoint(tmp_path, state, olmo_config(4, weight_tying=True))
    config, params = hf.import_hf(str(tmp_path))
    assert config.tie_embeddings and "lm_head" not in params   # the head is wte itself
    np.testing.assert_allclose(our_logits(config, params, TOKENS),
                               reference_logits(ref, TOKENS), rtol=2e-5, atol=2e-5)
    # A model with its own head (an override) gets wte as the head's initial value.
    config, params = hf.import_hf(str(tmp_path), overrides={"tie_embeddings": False})
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                  np.asarray(params["wte"]).T)
    np.testing.assert_allclose(our_logits(config, params, TOKENS),
                               reference_logits(ref, TOKENS), rtol=2e-5, atol=2e-5)


def load_exported_state(directory) -> dict:
    with open(os.path.join(directory, hf.INDEX_FILE)) as f:
        index = json.load(f)
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(os.path.join(directory, shard))
        assert all(index["weight_map"][k] == shard for k in part), shard
        state.update(part)
    assert set(state) == set(index["weight_map"])
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total
    return state


def test_export_loads_strictly_into_reference(tmp_path):
    ref = reference(2, seed=11)
    save_checkpoint(tmp_path / "in", ref.state_dict(), olmo_config(2))
    config, params = hf.import_hf(str(tmp_path / "in"))
    out = tmp_path / "out"
    # Small shards so that the export really is sharded; fp32 so logits compare tightly.
    summary = hf.export_hf(params, config, str(out), naming="llada", dtype="float32",
                           max_shard_bytes=40_000)
    n_tensors = 2 + 9 * LAYERS + 1
    assert summary.num_tensors == n_tensors and summary.num_shards > 1
    assert summary.num_bytes == 4 * config.num_params

    state = load_exported_state(out)
    fresh = RefLLaDA(RefConfig(VOCAB, D, LAYERS, HEADS, 2, MLP, 500000.0, 1e-5))
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    np.testing.assert_allclose(reference_logits(fresh, TOKENS), our_logits(config, params, TOKENS),
                               rtol=2e-5, atol=2e-5)

    with open(out / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == ["LLaDAModelLM"] and written["model_type"] == "llada"
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
    assert written["auto_map"]["AutoConfig"] == "configuration_llada.LLaDAConfig"
    assert (written["d_model"], written["n_heads"], written["n_kv_heads"], written["n_layers"],
            written["mlp_hidden_size"], written["mask_token_id"], written["weight_tying"]) == \
        (D, HEADS, 2, LAYERS, MLP, MASK, False)
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == EOS
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("naming", ["llada", "llama"])
def test_import_of_export_is_bit_identical(tmp_path, naming):
    config = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                         n_kv_heads=2, head_dim=D // HEADS, mlp_hidden_size=MLP,
                         mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=EOS)
    # Random values of every shape the module creates (eval_shape: no slow eager init).
    shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    hf.export_hf(params, config, str(tmp_path / "fp32"), naming=naming, dtype="float32")
    config_back, back = hf.import_hf(str(tmp_path / "fp32"))
    assert config_back == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, back)
    # bf16 export: exactly the round-to-nearest-even bf16 values of the fp32 params.
    hf.export_hf(params, config, str(tmp_path / "bf16"), naming=naming, dtype="bfloat16")
    config16, back16 = hf.import_hf(str(tmp_path / "bf16"))
    assert config16.param_dtype == "bfloat16"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a).astype(ml_dtypes.bfloat16), np.asarray(b)), params, back16)


def test_export_failure_leaves_no_directory_and_existing_is_refused(tmp_path):
    ref = reference(4)
    save_checkpoint(tmp_path / "in", ref.state_dict(), olmo_config(4))
    config, params = hf.import_hf(str(tmp_path / "in"))
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    # The tokenizer files are copied after every shard was written: the failure comes late.
    with pytest.raises(FileNotFoundError, match="none of the tokenizer files"):
        hf.export_hf(params, config, str(tmp_path / "out"), tokenizer_dir=str(empty))
    assert sorted(os.listdir(tmp_path)) == ["in", "no_tokenizer"]
    with pytest.raises(FileExistsError, match="already exists"):
        hf.export_hf(params, config, str(tmp_path / "in"))
    bad = dict(params, ln_f={"scale": jnp.ones((D + 1,))})
    with pytest.raises(ValueError, match=r"ln_f/scale has shape \[33\].*\[32\]"):
        hf.export_hf(bad, config, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="naming"):
        hf.export_hf(params, config, str(tmp_path / "out"), naming="gpt2")
    assert sorted(os.listdir(tmp_path)) == ["in", "no_tokenizer"]


def test_import_on_mesh_is_sharded_and_equal(tmp_path):
    ref = reference(4, seed=2)
    save_checkpoint(tmp_path, ref.state_dict(), olmo_config(4))
    _, single = hf.import_hf(str(tmp_path))
    cfg = default_config()
    cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4
    mesh = make_mesh(cfg)
    config, sharded = hf.import_hf(str(tmp_path), mesh=mesh)
    # The project's rule table: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor.
    expected_specs = {
        ("wte",): P("tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("ln_f", "scale"): P(None),
        ("blocks", "attn_norm", "scale"): P(None, None),
        ("blocks", "attn", "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "k_proj", "kernel"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "attn_out", "kernel"): P(None, "tensor", None, "fsdp"),
        ("blocks", "ff_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("blocks", "ff_out", "kernel"): P(None, "tensor", "fsdp"),
    }
    for path, spec in expected_specs.items():
        leaf = sharded
        for name in path:
            leaf = leaf[name]
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path
        assert len(leaf.sharding.device_set) == 8
    q = sharded["blocks"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (LAYERS, D // 2, HEADS // 4, D // HEADS)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 single, sharded)
    # Export straight from the sharded params: the reference loads it and computes the same.
    hf.export_hf(sharded, config, str(tmp_path / "out"), naming="llada", dtype="float32")
    fresh = RefLLaDA(RefConfig(VOCAB, D, LAYERS, HEADS, 4, MLP, 500000.0, 1e-5))
    fresh.load_state_dict(load_exported_state(tmp_path / "out"), strict=True)
    np.testing.assert_allclose(reference_logits(fresh, TOKENS), reference_logits(ref, TOKENS),
                               rtol=0, atol=0)

    # 2 kv heads cannot be split over tensor=4: refused by name before any tensor is read.
    save_checkpoint(tmp_path / "gqa", reference(2).state_dict(), olmo_config(2))
    with pytest.raises(ValueError, match=re.escape(
            "cannot shard blocks/attn/k_proj/kernel: its 'kv_heads' dim (n_kv_heads=2) is split "
            "over mesh axes ['tensor'] of 4 devices")):
        hf.import_hf(str(tmp_path / "gqa"), mesh=mesh)


# ------------------------------------------------------------------------------------------
# The real LLaDA-V tower metadata (8B, Llama names).


def expected_8b_shape(key: str) -> tuple[int, ...]:
    """Shape of each real key, written from REFERENCE.md section 1 (d 4096, 32 heads of 128)."""
    d, mlp, vocab = 4096, 12288, 126464
    table = {"lm_head.weight": (vocab, d), "model.embed_tokens.weight": (vocab, d),
             "model.norm.weight": (d,)}
    if key in table:
        return table[key]
    suffix = key.split(".", 3)[3]
    return {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
            "self_attn.v_proj.weight": (d, d), "self_attn.o_proj.weight": (d, d),
            "mlp.gate_proj.weight": (mlp, d), "mlp.up_proj.weight": (mlp, d),
            "mlp.down_proj.weight": (d, mlp)}[suffix]


def test_real_llada_v_config_and_index_map_onto_8b():
    with open(os.path.join(REAL, "config.json")) as f:
        config = model_config_from_hf(json.load(f))
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.mlp_hidden_size, config.vocab_size) == (4096, 32, 32, 32, 128, 12288, 126464)
    # Its BOS 128000 is Llama-3's (outside the vocabulary): LLaDA's ids are used.
    assert (config.mask_token_id, config.bos_token_id, config.eos_token_id) == \
        (126336, 126080, 126081)
    assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-5
    assert config.num_params == 8_015_581_184
    with open(os.path.join(REAL, hf.INDEX_FILE)) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == 16_031_162_368 == 2 * config.num_params

    shapes = expected_hf_shapes(config, "llama")
    assert set(shapes) == set(index["weight_map"])            # none missing, none left over
    for key, shape in shapes.items():
        assert shape == expected_8b_shape(key), key
    # Each key lands on one of our parameters with the right (eval_shape) slice shape.
    abstract = jax.eval_shape(Transformer(config).init, jax.random.key(0),
                              jnp.zeros((1, 1), jnp.int32))["params"]
    covered = {}
    for rule in llada.LAYOUTS["llama"]:
        leaf = abstract
        for name in rule.path:
            leaf = leaf[name]
        full = leaf.value.shape
        per_layer = full[1:] if rule.stacked else full
        def convert(w, rule=rule, per_layer=per_layer):   # PyTorch [out, in] -> ours
            return w.reshape(per_layer) if rule.num_in_dims is None else w.T.reshape(per_layer)
        for layer in (range(32) if rule.stacked else [None]):
            key = rule.key.format(i=layer)
            converted = jax.eval_shape(
                convert, jax.ShapeDtypeStruct(expected_8b_shape(key), jnp.bfloat16))
            assert converted.shape == per_layer, key
            covered[key] = math.prod(per_layer)
    assert set(covered) == set(index["weight_map"])
    assert sum(covered.values()) == 8_015_581_184


def write_header_only_shard(path: str, tensors: dict[str, tuple[int, ...]]) -> None:
    """A BF16 safetensors file whose data region is a hole (sparse file: no disk, no RAM)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in tensors.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def test_real_index_inspects_as_8b_checkpoint(tmp_path):
    """The real config + index with header-only shards pass every check of the importer."""
    with open(os.path.join(REAL, hf.INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    for name in ("config.json", "generation_config.json", hf.INDEX_FILE):
        with open(os.path.join(REAL, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    by_shard = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, {})[key] = expected_8b_shape(key)
    for shard, tensors in by_shard.items():
        write_header_only_shard(str(tmp_path / shard), tensors)
    checkpoint = hf.inspect_hf_checkpoint(str(tmp_path))
    assert checkpoint.naming == "llama" and not checkpoint.tied_embeddings
    assert checkpoint.config.bos_token_id == 126080   # from generation_config.json
    assert len(checkpoint.tensors) == 291 and checkpoint.num_bytes == 16_031_162_368


# ------------------------------------------------------------------------------------------
# Errors a user can cause.


@pytest.fixture
def saved(tmp_path):
    """A valid tiny LLaDA-layout checkpoint (GQA) and its state dict."""
    state = reference(2, seed=1).state_dict()
    save_checkpoint(tmp_path, state, olmo_config(2))
    return tmp_path, state


def rewrite_config(directory, **changes):
    with open(directory / "config.json") as f:
        c = json.load(f)
    c.update(changes)
    with open(directory / "config.json", "w") as f:
        json.dump(c, f)


def test_missing_files_are_named(tmp_path, saved):
    directory, _ = saved
    os.remove(directory / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors is missing"):
        hf.import_hf(str(directory))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.import_hf(str(tmp_path / "nowhere"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps(olmo_config(2)))
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json or model.safetensors"):
        hf.import_hf(str(tmp_path / "bare"))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    state = reference(2).state_dict()
    missing = {k: v for k, v in state.items() if k != "model.transformer.blocks.1.v_proj.weight"}
    save_checkpoint(tmp_path / "missing", missing, olmo_config(2))
    with pytest.raises(ValueError, match=r"1 missing tensor.*'model\.transformer\.blocks\.1\.v_proj\.weight'"):
        hf.import_hf(str(tmp_path / "missing"))
    extra = dict(state, **{"model.transformer.blocks.2.q_proj.weight": torch.zeros(D, D)})
    save_checkpoint(tmp_path / "extra", extra, olmo_config(2))
    with pytest.raises(ValueError, match=r"unexpected tensor.*2-layer.*'model\.transformer\.blocks\.2\.q_proj\.weight'"):
        hf.import_hf(str(tmp_path / "extra"))
    # Tensors of other towers (e.g. LLaDA-V's vision tower) can be skipped by prefix.
    config, _ = hf.import_hf(str(tmp_path / "extra"), skip_prefixes=["model.transformer.blocks.2."])
    assert config.n_layers == LAYERS


def test_index_pointing_at_wrong_shard_is_named(saved):
    directory, _ = saved
    with open(directory / hf.INDEX_FILE) as f:
        index = json.load(f)
    key = "model.transformer.ln_f.weight"
    wrong = "model-00001-of-00002.safetensors" if index["weight_map"][key].startswith(
        "model-00002") else "model-00002-of-00002.safetensors"
    index["weight_map"][key] = wrong
    with open(directory / hf.INDEX_FILE, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}'.*{re.escape(wrong)}.*does not contain"):
        hf.import_hf(str(directory))


def test_config_contradicting_tensors_is_explained(saved):
    directory, _ = saved
    rewrite_config(directory, n_kv_heads=1)   # tensors have 2 kv heads of 8
    with pytest.raises(ValueError, match=re.escape(
            "'model.transformer.blocks.0.k_proj.weight' has shape [16, 32], but config.json "
            "implies [8, 32] = [n_kv_heads*head_dim=1*8=8, d_model=32]")):
        hf.import_hf(str(directory))
    rewrite_config(directory, n_kv_heads=2, vocab_size=80, embedding_size=80)
    with pytest.raises(ValueError, match=re.escape(
            "'model.transformer.wte.weight' has shape [64, 32], but config.json implies "
            "[80, 32] = [vocab_size=80, d_model=32]")):
        hf.import_hf(str(directory))


def test_llama_head_dim_contradicting_q_proj(tmp_path):
    state = {to_llama_name(k): v for k, v in reference(4).state_dict().items()}
    save_checkpoint(tmp_path, state, llama_config(4, head_dim=4))
    with pytest.raises(ValueError, match=re.escape(
            "'model.layers.0.self_attn.q_proj.weight' has shape [32, 32], but config.json "
            "implies [16, 32] = [n_heads*head_dim=4*4=16, d_model=32]")):
        hf.import_hf(str(tmp_path))


def test_unconvertible_dtypes_are_named(tmp_path):
    state = dict(reference(4).state_dict())
    ints = dict(state, **{"model.transformer.ln_f.weight": torch.ones(D, dtype=torch.int64)})
    save_checkpoint(tmp_path / "int", ints, olmo_config(4), dtype=None)
    with pytest.raises(ValueError, match=r"'model\.transformer\.ln_f\.weight' has dtype I64"):
        hf.import_hf(str(tmp_path / "int"))
    # A single-file checkpoint (no index) with a float8 tensor.
    (tmp_path / "f8").mkdir()
    f8 = dict(state, **{"model.transformer.blocks.0.up_proj.weight":
                        state["model.transformer.blocks.0.up_proj.weight"].to(torch.float8_e4m3fn)})
    save_file({k: v.contiguous() for k, v in f8.items()}, str(tmp_path / "f8" / "model.safetensors"))
    (tmp_path / "f8" / "config.json").write_text(json.dumps(olmo_config(4)))
    with pytest.raises(ValueError, match=r"'model\.transformer\.blocks\.0\.up_proj\.weight' has dtype F8_E4M3"):
        hf.import_hf(str(tmp_path / "f8"))


def test_unsupported_or_broken_configs_are_named():
    with pytest.raises(ValueError, match="include_bias=True is not supported"):
        model_config_from_hf(olmo_config(4, include_bias=True))
    with pytest.raises(ValueError, match="layer_norm_type='default' is not supported"):
        model_config_from_hf(olmo_config(4, layer_norm_type="default"))
    with pytest.raises(ValueError, match="rope_scaling=.* is not supported"):
        model_config_from_hf(llama_config(4, rope_scaling={"type": "linear", "factor": 2}))
    with pytest.raises(ValueError, match="field 'rope_theta' is missing"):
        model_config_from_hf({k: v for k, v in olmo_config(4).items() if k != "rope_theta"})
    with pytest.raises(ValueError, match="hidden size 30 is not divisible .* 4"):
        model_config_from_hf(llama_config(4, hidden_size=30))
    with pytest.raises(ValueError, match="neither 'd_model'.*nor 'hidden_size'"):
        model_config_from_hf({"n_embd": 32})
    # A tiny vocabulary without mask_token_id: LLaDA's 126336 cannot be used.
    no_mask = {k: v for k, v in llama_config(4).items() if k != "mask_token_id"}
    with pytest.raises(ValueError, match=r"mask_token_id is not given and LLaDA's 126336 is "
                                         r"outside the vocabulary \[0, 64\)"):
        model_config_from_hf(no_mask)
    assert model_config_from_hf(no_mask, overrides={"mask_token_id": 7}).mask_token_id == 7
    # A token id that is not a number names the file, which of the two files, and the field.
    with pytest.raises(ValueError, match=r"^my/config.json: generation_config eos_token_id='<eos>' "
                                         r"is not a token id \(an integer\)$"):
        model_config_from_hf(llama_config(4), {"eos_token_id": ["<eos>", 3]},
                                source="my/config.json")
    with pytest.raises(ValueError, match=r"^config.json: config pad_token_id=\[1\] is not a "
                                         r"token id"):
        model_config_from_hf(llama_config(4, pad_token_id=[[1]]))
    # A valid generation_config id is used; the config.json value behind it is not read.
    assert model_config_from_hf(llama_config(4, bos_token_id="x"),
                                   {"bos_token_id": [5, 6]}).bos_token_id == 5
    with pytest.raises(ValueError, match="n_kv_heads"):
        model_config_from_hf(olmo_config(3))


def test_bad_param_dtype_is_named(saved):
    directory, _ = saved
    with pytest.raises(ValueError, match="param_dtype: expected one of .* found 'int8'"):
        hf.import_hf(str(directory), param_dtype="int8")


# ------------------------------------------------------------------------------------------
# launch/convert.py end to end.


def run_convert(*args) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=one_device_xla_flags())
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "convert.py"), *args],
                            check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_launch_convert_import_then_export(tmp_path):
    ref = reference(2, seed=9)
    hf_dir = tmp_path / "hf"
    save_checkpoint(hf_dir, {to_llama_name(k): v for k, v in ref.state_dict().items()},
                    llama_config(2), dtype=torch.bfloat16)
    (hf_dir / "tokenizer.json").write_text("{}")   # copied as is; never parsed here
    ours = tmp_path / "ours"
    out = run_convert("--mode=import", f"--hf_dir={hf_dir}", f"--out={ours}")
    assert f"{2 + 9 * LAYERS + 1} tensors" in out

    from llada_jax.train.checkpoint import load_params
    config, _ = load_params(str(ours))
    assert config.data.tokenizer == f"hf:{hf_dir}"
    assert (config.model.d_model, config.model.n_kv_heads, config.model.mask_token_id) == (D, 2, MASK)

    exported = tmp_path / "exported"
    out = run_convert("--mode=export", f"--checkpoint={ours}", f"--out={exported}",
                      "--naming=llada", "--dtype=float32")
    assert f"{2 + 9 * LAYERS + 1} tensors" in out
    assert os.path.isfile(exported / "tokenizer.json")
    state = load_exported_state(exported)
    fresh = RefLLaDA(RefConfig(VOCAB, D, LAYERS, HEADS, 2, MLP, 500000.0, 1e-5))
    fresh.load_state_dict(state, strict=True)
    # bf16 in, fp32 out: exactly the bf16 values of the original weights.
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value.to(torch.bfloat16).float(), rtol=0, atol=0)
