"""MoE and tied checkpoint layouts (issue 16): LLaDA-MoE-7B-A1B, LLaDA2.0-mini and iLLaDA-8B.

Checkpoints here are written by the test itself with its own key names (taken from the issue's
facts and the public modeling code, not from the interop tables), its own fused QKV
(`torch.cat` of q, k, v rows) and its own per-expert tensors, so import is checked against files
it did not produce; round trips must be bit-identical; full-size config.json files map onto the
published architectures.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llada_jax.config import ModelConfig
from llada_jax.interop import hf
from llada_jax.model.transformer import Transformer
from tests.interop_helpers import expected_hf_shapes, model_config_from_hf
from tests.test_program_runner import one_device_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, D, HEADS, HEAD_DIM, MLP = 64, 32, 4, 8, 48
IDS = dict(mask_token_id=60, bos_token_id=59, eos_token_id=61, pad_token_id=61)
LLADA_MOE = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=HEADS, n_kv_heads=HEADS,
                        head_dim=HEAD_DIM, mlp_hidden_size=MLP, num_experts=4,
                        experts_per_token=2, expert_mlp_hidden_size=16, router="softmax",
                        qk_norm=True, rope_theta=50000.0, max_sequence_length=64, **IDS)
LLADA2 = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=3, n_heads=HEADS, n_kv_heads=2,
                     head_dim=HEAD_DIM, mlp_hidden_size=MLP, num_experts=8, experts_per_token=2,
                     expert_mlp_hidden_size=16, num_shared_experts=1, first_k_dense=1,
                     router="sigmoid_grouped", router_groups=4, router_top_groups=2,
                     routed_scaling=2.5, normalize_top_k=True, qk_norm=True, rotary_dim=4,
                     rope_theta=600000.0, rms_norm_eps=1e-6, max_sequence_length=64, **IDS)
ILLADA = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=HEADS, n_kv_heads=2,
                     head_dim=HEAD_DIM, mlp_hidden_size=MLP, tie_embeddings=True,
                     rope_theta=10000.0, max_sequence_length=64, **IDS)
LAYOUTS = [(LLADA_MOE, "llada_moe"), (LLADA2, "llada2"), (ILLADA, "llada"), (ILLADA, "llama")]


# The tiny configs as config.json files of each family, written by hand.
LLADA2_JSON = {"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"],
             "hidden_size": D, "num_hidden_layers": 3, "num_attention_heads": HEADS,
             "num_key_value_heads": 2, "head_dim": HEAD_DIM, "intermediate_size": MLP,
             "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
             "num_shared_experts": 1, "n_group": 4, "topk_group": 2,
             "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
             "partial_rotary_factor": 0.5, "rope_theta": 600000.0, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 64, "vocab_size": VOCAB, "use_qkv_bias": False,
             "use_bias": False, "tie_word_embeddings": False, **IDS}
LLADA_MOE_JSON = {"model_type": "llada_moe", "hidden_size": D, "num_hidden_layers": 2,
             "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
             "dense_intermediate_size": MLP, "expert_intermediate_size": 16,
             "num_experts": 4, "num_experts_per_tok": 2, "qk_layernorm": True,
             "moe_router_score_function": "softmax", "norm_topk_prob": None,
             "shared_expert_intermediate_size": None, "rope_theta": 50000.0,
             "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 64, "vocab_size": VOCAB, **IDS}
ILLADA_JSON = {"d_model": D, "n_heads": HEADS, "n_kv_heads": 2, "n_layers": 2,
               "mlp_hidden_size": MLP, "vocab_size": VOCAB, "embedding_size": VOCAB,
               "weight_tying": True, "max_sequence_length": 64, "rope_theta": 10000.0,
               "rms_norm_eps": 1e-5, **IDS}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def files_of(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("config,naming", LAYOUTS, ids=[n for _, n in LAYOUTS[:3]] + ["illama"])
def test_round_trip_is_bit_identical(tmp_path, config, naming):
    params = random_params(config, seed=1)
    first = tmp_path / "first"
    summary = hf.export_hf(params, config, str(first), naming=naming, dtype="float32",
                           max_shard_bytes=30_000)
    assert summary.num_shards > 1 and summary.num_bytes == 4 * config.num_params
    config_back, back = hf.import_hf(str(first))
    assert config_back == config
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, back)
    # Export of the import: the very same files, byte for byte.
    second = tmp_path / "second"
    hf.export_hf(back, config_back, str(second), naming=naming, dtype="float32",
                 max_shard_bytes=30_000)
    assert files_of(first) == files_of(second)


def t(rng, *shape) -> torch.Tensor:
    return torch.from_numpy(rng.normal(size=shape).astype(np.float32))


def write_checkpoint(directory, state: dict, config: dict) -> None:
    """Two safetensors shards, an index and config.json, as Hugging Face writes them."""
    directory.mkdir()
    keys = sorted(state)
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{n + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


def linear_kernel(w: torch.Tensor, *shape) -> np.ndarray:
    """PyTorch Linear [out, in] -> our kernel [in, *out dims] (heads head-major)."""
    return w.numpy().T.reshape(shape)


def test_llada2_checkpoint_from_the_facts(tmp_path):
    """LLaDA2.0-mini's layout, scaled down: fused query_key_value rows q | k | v, layer 0 dense,
    per-expert tensors, shared experts, expert_bias, QK-norm under their LLaDA2 names."""
    rng = np.random.default_rng(0)
    c = LLADA2
    q_rows, kv_rows = c.n_heads * HEAD_DIM, c.n_kv_heads * HEAD_DIM
    state = {"model.word_embeddings.weight": t(rng, VOCAB, D),
             "model.norm.weight": t(rng, D), "lm_head.weight": t(rng, VOCAB, D)}
    for i in range(3):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t(rng, D)
        state[p + "post_attention_layernorm.weight"] = t(rng, D)
        state[p + "attention.query_key_value.weight"] = torch.cat(
            [t(rng, q_rows, D), t(rng, kv_rows, D), t(rng, kv_rows, D)])
        state[p + "attention.dense.weight"] = t(rng, D, q_rows)
        state[p + "attention.query_layernorm.weight"] = t(rng, HEAD_DIM)
        state[p + "attention.key_layernorm.weight"] = t(rng, HEAD_DIM)
        if i == 0:
            for name, shape in (("gate_proj", (MLP, D)), ("up_proj", (MLP, D)),
                                ("down_proj", (D, MLP))):
                state[p + f"mlp.{name}.weight"] = t(rng, *shape)
            continue
        state[p + "mlp.gate.weight"] = t(rng, 8, D)
        state[p + "mlp.gate.expert_bias"] = t(rng, 8)
        for j in range(8):
            state[p + f"mlp.experts.{j}.gate_proj.weight"] = t(rng, 16, D)
            state[p + f"mlp.experts.{j}.up_proj.weight"] = t(rng, 16, D)
            state[p + f"mlp.experts.{j}.down_proj.weight"] = t(rng, D, 16)
        for name, shape in (("gate_proj", (16, D)), ("up_proj", (16, D)),
                            ("down_proj", (D, 16))):
            state[p + f"mlp.shared_experts.{name}.weight"] = t(rng, *shape)
    hf_config = LLADA2_JSON
    write_checkpoint(tmp_path / "hf", state, hf_config)
    config, params = hf.import_hf(str(tmp_path / "hf"))
    assert config == LLADA2
    np.testing.assert_array_equal(params["wte"], state["model.word_embeddings.weight"].numpy())
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state["lm_head.weight"].numpy().T)
    dense = params["dense_blocks"]
    np.testing.assert_array_equal(dense["ff_out"]["kernel"][0],
                                  state["model.layers.0.mlp.down_proj.weight"].numpy().T)
    for i in (1, 2):   # HF layer i is MoE layer i - 1 of `blocks`
        p, b = f"model.layers.{i}.", i - 1
        blocks, attn = params["blocks"], params["blocks"]["attn"]
        qkv = state[p + "attention.query_key_value.weight"]
        np.testing.assert_array_equal(attn["q_proj"]["kernel"][b],
                                      linear_kernel(qkv[:q_rows], D, HEADS, HEAD_DIM))
        np.testing.assert_array_equal(attn["k_proj"]["kernel"][b],
                                      linear_kernel(qkv[q_rows:q_rows + kv_rows], D, 2, HEAD_DIM))
        np.testing.assert_array_equal(attn["v_proj"]["kernel"][b],
                                      linear_kernel(qkv[q_rows + kv_rows:], D, 2, HEAD_DIM))
        np.testing.assert_array_equal(attn["attn_out"]["kernel"][b], linear_kernel(
            state[p + "attention.dense.weight"], HEADS, HEAD_DIM, D))
        np.testing.assert_array_equal(attn["k_norm"]["scale"][b],
                                      state[p + "attention.key_layernorm.weight"].numpy())
        moe = blocks["moe"]
        np.testing.assert_array_equal(moe["router"]["kernel"][b],
                                      state[p + "mlp.gate.weight"].numpy().T)
        np.testing.assert_array_equal(moe["expert_bias"][b],
                                      state[p + "mlp.gate.expert_bias"].numpy())
        for j in range(8):
            e = p + f"mlp.experts.{j}."
            np.testing.assert_array_equal(moe["wi_gate"][b, j],
                                          state[e + "gate_proj.weight"].numpy().T)
            np.testing.assert_array_equal(moe["wi_up"][b, j], state[e + "up_proj.weight"].numpy().T)
            np.testing.assert_array_equal(moe["wo"][b, j], state[e + "down_proj.weight"].numpy().T)
        np.testing.assert_array_equal(moe["shared"]["up_proj"]["kernel"][b],
                                      state[p + "mlp.shared_experts.up_proj.weight"].numpy().T)
    # Export writes exactly the tensors it read (fused again, split per expert).
    hf.export_hf(params, config, str(tmp_path / "out"), naming="llada2", dtype="float32")
    from safetensors.torch import load_file

    written = {}
    for name in os.listdir(tmp_path / "out"):
        if name.endswith(".safetensors"):
            written.update(load_file(str(tmp_path / "out" / name)))
    assert set(written) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)


def test_llada_moe_checkpoint_from_the_facts(tmp_path):
    rng = np.random.default_rng(1)
    state = {"model.embed_tokens.weight": t(rng, VOCAB, D), "model.norm.weight": t(rng, D),
             "lm_head.weight": t(rng, VOCAB, D)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[p + name + ".weight"] = t(rng, D)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = t(rng, D, D)
        state[p + "self_attn.q_norm.weight"] = t(rng, HEAD_DIM)
        state[p + "self_attn.k_norm.weight"] = t(rng, HEAD_DIM)
        state[p + "mlp.gate.weight"] = t(rng, 4, D)
        for j in range(4):
            state[p + f"mlp.experts.{j}.gate_proj.weight"] = t(rng, 16, D)
            state[p + f"mlp.experts.{j}.up_proj.weight"] = t(rng, 16, D)
            state[p + f"mlp.experts.{j}.down_proj.weight"] = t(rng, D, 16)
    hf_config = LLADA_MOE_JSON
    write_checkpoint(tmp_path / "hf", state, hf_config)
    config, params = hf.import_hf(str(tmp_path / "hf"))
    assert config == LLADA_MOE
    attn, moe = params["blocks"]["attn"], params["blocks"]["moe"]
    np.testing.assert_array_equal(attn["q_norm"]["scale"][1],
                                  state["model.layers.1.self_attn.q_norm.weight"].numpy())
    np.testing.assert_array_equal(attn["attn_out"]["kernel"][0], linear_kernel(
        state["model.layers.0.self_attn.o_proj.weight"], HEADS, HEAD_DIM, D))
    np.testing.assert_array_equal(moe["wo"][1, 3],
                                  state["model.layers.1.mlp.experts.3.down_proj.weight"].numpy().T)
    np.testing.assert_array_equal(moe["router"]["kernel"][0],
                                  state["model.layers.0.mlp.gate.weight"].numpy().T)

    # One expert tensor missing, one fused-free router of the wrong size: named.
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    state["model.layers.0.mlp.gate.weight"] = t(rng, 5, D)
    write_checkpoint(tmp_path / "broken", state, hf_config)
    with pytest.raises(ValueError, match=r"(?s)1 missing tensor.*'model\.layers\.1\.mlp\.experts"
                                         r"\.2\.up_proj\.weight'.*'model\.layers\.0\.mlp\.gate"
                                         r"\.weight' has shape \[5, 32\], but config.json implies "
                                         r"\[4, 32\]"):
        hf.import_hf(str(tmp_path / "broken"))


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    """iLLaDA: the OLMo layout with weight_tying and no model.transformer.ff_out."""
    params = random_params(ILLADA, seed=2)
    assert "lm_head" not in params
    hf.export_hf(params, ILLADA, str(tmp_path / "out"), naming="llada", dtype="float32")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["weight_tying"] is True
    keys = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())["weight_map"]
    assert "model.transformer.ff_out.weight" not in keys and len(keys) == 2 + 9 * 2
    # An untied model reads the tied checkpoint's embedding as its LM head.
    _, untied = hf.import_hf(str(tmp_path / "out"),
                             overrides={"tie_embeddings": False})
    np.testing.assert_array_equal(untied["lm_head"]["kernel"], np.asarray(params["wte"]).T)


# Full-size config.json files with the published numbers (issue 16's facts).
PUBLISHED = {
    "llada_moe_7b": {"model_type": "llada_moe", "hidden_size": 2048, "num_hidden_layers": 16,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
                     "vocab_size": 157184, "dense_intermediate_size": 8192,
                     "expert_intermediate_size": 1024, "num_experts": 64,
                     "num_experts_per_tok": 8, "qk_layernorm": True,
                     "moe_router_score_function": "softmax", "norm_topk_prob": False,
                     "rope_theta": 50000.0, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192, "tie_word_embeddings": False,
                     "mask_token_id": 156895, "eos_token_id": 156892, "pad_token_id": 156892},
    "llada2_mini": {"model_type": "llada2_moe", "hidden_size": 2048, "num_hidden_layers": 20,
                    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
                    "vocab_size": 157184, "intermediate_size": 5120,
                    "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
                    "num_shared_experts": 1, "n_group": 8, "topk_group": 4,
                    "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
                    "partial_rotary_factor": 0.5, "rope_theta": 600000.0, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 8192, "use_qkv_bias": False, "use_bias": False,
                    "tie_word_embeddings": False},
    "illada_8b": {"d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "n_layers": 32,
                  "mlp_hidden_size": 14336, "vocab_size": 155136, "embedding_size": 155136,
                  "weight_tying": True, "max_sequence_length": 8192, "rope_theta": 500000.0,
                  "rms_norm_eps": 1e-5, "mask_token_id": 5, "bos_token_id": 1,
                  "eos_token_id": 2},
}


def test_published_configs_map_onto_the_architectures():
    moe = model_config_from_hf(PUBLISHED["llada_moe_7b"])
    assert (moe.n_layers, moe.d_model, moe.n_heads, moe.n_kv_heads, moe.head_dim) == \
        (16, 2048, 16, 16, 128)
    assert (moe.num_experts, moe.experts_per_token, moe.expert_mlp_hidden_size,
            moe.num_shared_experts, moe.first_k_dense) == (64, 8, 1024, 0, 0)
    assert (moe.router, moe.normalize_top_k, moe.qk_norm, moe.rotary_dim,
            moe.tie_embeddings) == ("softmax", False, True, 0, False)
    assert (moe.mask_token_id, moe.eos_token_id, moe.pad_token_id, moe.rope_theta) == \
        (156895, 156892, 156892, 50000.0)
    shapes = expected_hf_shapes(moe, "llada_moe")
    assert len(shapes) == 3 + 16 * (8 + 1 + 64 * 3)   # embed, norm, head; per layer
    assert shapes["model.layers.15.mlp.experts.63.down_proj.weight"] == (2048, 1024)
    assert shapes["model.layers.0.mlp.gate.weight"] == (64, 2048)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (128,)

    mini = model_config_from_hf(PUBLISHED["llada2_mini"])
    assert (mini.n_layers, mini.n_heads, mini.n_kv_heads, mini.mlp_hidden_size) == \
        (20, 16, 4, 5120)
    assert (mini.num_experts, mini.experts_per_token, mini.expert_mlp_hidden_size,
            mini.num_shared_experts, mini.first_k_dense) == (256, 8, 512, 1, 1)
    assert (mini.router, mini.router_groups, mini.router_top_groups, mini.routed_scaling,
            mini.normalize_top_k) == ("sigmoid_grouped", 8, 4, 2.5, True)
    assert (mini.qk_norm, mini.rotary_dim, mini.rope_theta, mini.rms_norm_eps) == \
        (True, 64, 600000.0, 1e-6)
    shapes = expected_hf_shapes(mini, "llada2")
    assert shapes["model.layers.7.attention.query_key_value.weight"] == ((16 + 2 * 4) * 128, 2048)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (5120, 2048)
    assert "model.layers.0.mlp.gate.weight" not in shapes
    assert shapes["model.layers.19.mlp.gate.expert_bias"] == (256,)
    assert shapes["model.layers.1.mlp.shared_experts.down_proj.weight"] == (2048, 512)
    assert len(shapes) == 3 + 20 * 6 + 3 + 19 * (2 + 256 * 3 + 3)

    illada = model_config_from_hf(PUBLISHED["illada_8b"])
    assert (illada.n_layers, illada.d_model, illada.n_heads, illada.n_kv_heads,
            illada.mlp_hidden_size, illada.vocab_size) == (32, 4096, 32, 8, 14336, 155136)
    assert illada.tie_embeddings and illada.mask_token_id == 5
    assert "model.transformer.ff_out.weight" not in expected_hf_shapes(illada, "llada")


@pytest.mark.parametrize("config,naming", LAYOUTS, ids=[n for _, n in LAYOUTS[:3]] + ["illama"])
def test_written_config_json_reads_back(config, naming):
    written = hf.family_of(naming).hf_config_dict(config, naming, "bfloat16")
    assert model_config_from_hf(written) == config


def test_layouts_refuse_what_they_cannot_store(tmp_path):
    params = random_params(LLADA2)
    with pytest.raises(ValueError, match=r"cannot export this model in the dense 'llada' "
                                         r"layout: it has num_experts=8.*--naming=llada_moe"):
        hf.export_hf(params, LLADA2, str(tmp_path / "a"), naming="llada")
    with pytest.raises(ValueError, match=r"'llada_moe' layout: it needs .*router='softmax'"):
        hf.export_hf(params, LLADA2, str(tmp_path / "a"), naming="llada_moe")
    shared = dict(PUBLISHED["llada_moe_7b"], shared_expert_intermediate_size=1024)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=1024 is not supported"):
        model_config_from_hf(shared)
    assert not os.path.exists(tmp_path / "a")


def test_launch_convert_round_trips_llada2(tmp_path):
    """launch/convert.py imports a LLaDA2 checkpoint and exports it (layout chosen from the
    model) into the same tensors."""
    params = random_params(LLADA2, seed=5)
    hf.export_hf(params, LLADA2, str(tmp_path / "hf"), naming="llada2", dtype="float32")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=one_device_xla_flags())

    def convert(*args):
        result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "convert.py"),
                                 *args], capture_output=True, text=True, env=env, cwd=REPO,
                                timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    convert("--mode=import", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'ours'}")
    out = convert("--mode=export", f"--checkpoint={tmp_path / 'ours'}",
                  f"--out={tmp_path / 'back'}", "--dtype=float32")
    assert "'llada2' layout" in out
    before, after = files_of(tmp_path / "hf"), files_of(tmp_path / "back")
    assert [n for n in before if n.endswith(".safetensors")] == \
        [n for n in after if n.endswith(".safetensors")]
    for name in before:
        if name.endswith(".safetensors"):
            assert before[name] == after[name], name


REFERENCE_CASES = [("llada_moe", LLADA_MOE, LLADA_MOE_JSON), ("llada2", LLADA2, LLADA2_JSON),
                   ("illada", ILLADA, ILLADA_JSON)]


@pytest.mark.parametrize("layout,config,config_json", REFERENCE_CASES,
                         ids=[c[0] for c in REFERENCE_CASES])
def test_reference_checkpoint_imports_and_reloads_strictly(tmp_path, layout, config, config_json):
    """The PyTorch reference's own state_dict (its module names are the released keys) imports
    into a model with the reference's logits, and our export loads back into a fresh reference
    with load_state_dict(strict=True), every tensor unchanged."""
    from safetensors.torch import load_file

    from tests.moe_torch_reference import MoERefConfig, RefMoEModel, random_reference

    c = config
    ref_config = MoERefConfig(
        layout=layout, vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers,
        n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
        mlp_hidden_size=c.mlp_hidden_size, num_experts=c.num_experts,
        experts_per_token=c.experts_per_token, expert_mlp_hidden_size=c.expert_mlp_hidden_size,
        num_shared_experts=c.num_shared_experts, first_k_dense=c.first_k_dense,
        n_group=c.router_groups, topk_group=c.router_top_groups, routed_scaling=c.routed_scaling,
        qk_norm=c.qk_norm, rotary_dim=c.rotary_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps)
    ref = random_reference(ref_config, seed=3, bias_scale=0.05)
    state = ref.state_dict()
    write_checkpoint(tmp_path / "hf", state, config_json)
    imported_config, params = hf.import_hf(str(tmp_path / "hf"))
    assert imported_config == config
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 10))
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens)).numpy()
    logits = Transformer(config).apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)

    naming = "llada" if layout == "illada" else layout
    hf.export_hf(params, config, str(tmp_path / "out"), naming=naming, dtype="float32")
    written = {}
    for name in sorted(os.listdir(tmp_path / "out")):
        if name.endswith(".safetensors"):
            written.update(load_file(str(tmp_path / "out" / name)))
    fresh = RefMoEModel(ref_config)
    fresh.load_state_dict(written, strict=True)
    for key, value in state.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)
