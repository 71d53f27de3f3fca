"""Mixture of experts, QK-norm, partial rotary and tied embeddings against the independent PyTorch
reference (tests/moe_torch_reference.py), plus routing edge cases, router statistics and the
parameter counts of the full-size presets."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llada_jax.config import ModelConfig, validate_model
from llada_jax.model.moe import MoE
from llada_jax.model.transformer import Transformer
from tests.moe_torch_reference import MoERefConfig, random_reference, router_losses

LAYOUTS = {
    # LLaDA-MoE: softmax router, no renormalisation, QK-norm, every layer MoE.
    "llada_moe": dict(n_kv_heads=4, num_experts=8, experts_per_token=2, router="softmax",
                      qk_norm=True),
    # LLaDA2: GQA, layer 0 dense, sigmoid grouped router with bias, a shared expert, partial RoPE.
    "llada2": dict(n_kv_heads=2, num_experts=8, experts_per_token=3, num_shared_experts=1,
                   first_k_dense=1, router="sigmoid_grouped", router_groups=4,
                   router_top_groups=2, routed_scaling=2.5, normalize_top_k=True, qk_norm=True,
                   rotary_dim=4),
    # iLLaDA: dense, GQA, tied embeddings.
    "illada": dict(n_kv_heads=2, tie_embeddings=True),
}


def tiny(layout: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, head_dim=8, mlp_hidden_size=40,
                expert_mlp_hidden_size=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                max_sequence_length=64, mask_token_id=5, eos_token_id=2, bos_token_id=1,
                pad_token_id=2)
    base.update(LAYOUTS[layout])
    base.update(overrides)
    if not base.get("num_experts"):
        base.pop("expert_mlp_hidden_size")
    config = ModelConfig(**base)
    validate_model(config)
    return config


def ref_config(layout: str, c: ModelConfig) -> MoERefConfig:
    return MoERefConfig(
        layout=layout, vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers,
        n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
        mlp_hidden_size=c.mlp_hidden_size, num_experts=c.num_experts,
        experts_per_token=c.experts_per_token, expert_mlp_hidden_size=c.expert_mlp_hidden_size,
        num_shared_experts=c.num_shared_experts, first_k_dense=c.first_k_dense,
        n_group=c.router_groups, topk_group=c.router_top_groups, routed_scaling=c.routed_scaling,
        qk_norm=c.qk_norm, rotary_dim=c.rotary_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps)


def _t(w: torch.Tensor) -> np.ndarray:
    return w.detach().numpy().astype(np.float32)


def swiglu_params(mlp) -> dict:
    return {"ff_proj": {"kernel": _t(mlp.gate_proj.weight).T},
            "up_proj": {"kernel": _t(mlp.up_proj.weight).T},
            "ff_out": {"kernel": _t(mlp.down_proj.weight).T}}


def moe_params(mlp, c: ModelConfig) -> dict:
    gate = mlp.gate.weight
    out = {"router": {"kernel": _t(gate).T},
           "wi_gate": np.stack([_t(e.gate_proj.weight).T for e in mlp.experts]),
           "wi_up": np.stack([_t(e.up_proj.weight).T for e in mlp.experts]),
           "wo": np.stack([_t(e.down_proj.weight).T for e in mlp.experts])}
    if c.router == "sigmoid_grouped":
        out["expert_bias"] = _t(mlp.gate.expert_bias)
    if c.num_shared_experts:
        out["shared"] = swiglu_params(mlp.shared_experts)
    return out


def layer_params(layout: str, layer, c: ModelConfig) -> dict:
    """One reference layer in the param tree of our Block (kernels [in, out])."""
    d, h, kv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    if layout == "illada":
        attn = {"q_proj": layer.q_proj.weight, "k_proj": layer.k_proj.weight,
                "v_proj": layer.v_proj.weight, "attn_out": layer.attn_out.weight}
        out = {"attn_norm": {"scale": _t(layer.attn_norm.weight)},
               "ff_norm": {"scale": _t(layer.ff_norm.weight)},
               "ff_proj": {"kernel": _t(layer.ff_proj.weight).T},
               "up_proj": {"kernel": _t(layer.up_proj.weight).T},
               "ff_out": {"kernel": _t(layer.ff_out.weight).T}}
        norms = {}
    else:
        if layout == "llada2":
            a = layer.attention
            q, k, v = torch.split(a.query_key_value.weight, [h * hd, kv * hd, kv * hd], dim=0)
            attn = {"q_proj": q, "k_proj": k, "v_proj": v, "attn_out": a.dense.weight}
            norms = {"q_norm": a.query_layernorm.weight, "k_norm": a.key_layernorm.weight}
        else:
            a = layer.self_attn
            attn = {"q_proj": a.q_proj.weight, "k_proj": a.k_proj.weight,
                    "v_proj": a.v_proj.weight, "attn_out": a.o_proj.weight}
            norms = {"q_norm": a.q_norm.weight, "k_norm": a.k_norm.weight} if c.qk_norm else {}
        out = {"attn_norm": {"scale": _t(layer.input_layernorm.weight)},
               "ff_norm": {"scale": _t(layer.post_attention_layernorm.weight)}}
        if hasattr(layer.mlp, "experts"):
            out["moe"] = moe_params(layer.mlp, c)
        else:
            out.update(swiglu_params(layer.mlp))
    shapes = {"q_proj": (d, h, hd), "k_proj": (d, kv, hd), "v_proj": (d, kv, hd)}
    out["attn"] = {name: {"kernel": _t(w).T.reshape(shapes[name]) if name in shapes
                          else _t(w).T.reshape(h, hd, d)} for name, w in attn.items()}
    out["attn"].update({name: {"scale": _t(w)} for name, w in norms.items()})
    return out


def stack(layers: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def params_from_reference(layout: str, ref, c: ModelConfig) -> dict:
    if layout == "illada":
        tr = ref.model.transformer
        return {"wte": _t(tr.wte.weight), "ln_f": {"scale": _t(tr.ln_f.weight)},
                "blocks": stack([layer_params(layout, b, c) for b in tr.blocks])}
    m = ref.model
    embed = m.word_embeddings if layout == "llada2" else m.embed_tokens
    layers = [layer_params(layout, layer, c) for layer in m.layers]
    k = c.first_k_dense
    params = {"wte": _t(embed.weight), "ln_f": {"scale": _t(m.norm.weight)},
              "lm_head": {"kernel": _t(ref.lm_head.weight).T}, "blocks": stack(layers[k:])}
    if k:
        params["dense_blocks"] = stack(layers[:k])
    return params


def check_shapes(model: nn.Module, params: dict, *args) -> None:
    created = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args)))["params"]
    assert jax.tree.structure(created) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), created, params)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_whole_model_logits_match_torch_reference(layout):
    c = tiny(layout)
    ref = random_reference(ref_config(layout, c), seed=1, bias_scale=0.05)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.vocab_size, size=(2, 12))
    key_mask = np.ones((2, 12), bool)
    key_mask[1, 9:] = False
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens), torch.from_numpy(key_mask)).numpy()
    params = params_from_reference(layout, ref, c)
    model = Transformer(c)
    check_shapes(model, params, tokens)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                                  attention_mask=jnp.asarray(key_mask))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
    if c.tie_embeddings:
        assert "lm_head" not in params


def _block_case(layout, seed=2, **overrides):
    c = tiny(layout, **overrides)
    ref = random_reference(ref_config(layout, c), seed=seed, bias_scale=0.05)
    layer = ref.model.layers[c.first_k_dense]
    params = moe_params(layer.mlp, c)
    return c, layer.mlp, params


def _run_block(c, params, x):
    out, stats = jax.jit(MoE(c).apply)({"params": params}, jnp.asarray(x))
    return np.asarray(out), jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize("layout", ["llada_moe", "llada2"])
def test_moe_block_output_gradient_and_stats_match_torch(layout):
    c, mlp, params = _block_case(layout)
    x = np.random.default_rng(1).normal(size=(3, 7, c.d_model)).astype(np.float32)
    check_shapes(MoE(c), params, x)
    xt = torch.from_numpy(x)
    expected = mlp(xt)
    out, stats = _run_block(c, params, x)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-5, atol=1e-5)

    # Gradients through the sorted dispatch and ragged_dot equal the reference's loop.
    probe = np.random.default_rng(2).normal(size=out.shape).astype(np.float32)
    (expected * torch.from_numpy(probe)).sum().backward()

    def loss(p):
        return jnp.sum(MoE(c).apply({"params": p}, jnp.asarray(x))[0] * probe)

    grads = jax.jit(jax.grad(loss))(params)
    np.testing.assert_allclose(
        grads["wi_gate"], np.stack([_t(e.gate_proj.weight.grad).T for e in mlp.experts]),
        rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        grads["wo"], np.stack([_t(e.down_proj.weight.grad).T for e in mlp.experts]),
        rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["router"]["kernel"], _t(mlp.gate.weight.grad).T,
                               rtol=1e-4, atol=1e-5)
    if layout == "llada2":  # the bias only steers the choice: no gradient reaches it
        np.testing.assert_array_equal(grads["expert_bias"], 0)

    # Router statistics: every assignment counted once, losses as the official formulas.
    tokens = x.reshape(-1, c.d_model)
    with torch.no_grad():
        chosen, _, logits = mlp.route(torch.from_numpy(tokens))
    load = np.bincount(chosen.numpy().reshape(-1), minlength=c.num_experts)
    np.testing.assert_array_equal(stats.load, load)
    assert stats.load.sum() == tokens.shape[0] * c.experts_per_token   # nothing dropped
    balance, z = router_losses(logits, chosen, c.num_experts, softmax=c.router == "softmax")
    np.testing.assert_allclose(stats.aux_loss, balance.item(), rtol=1e-5)
    np.testing.assert_allclose(stats.z_loss, z.item(), rtol=1e-5)


def test_softmax_router_ties_go_to_the_lowest_experts():
    """A zero router gives every expert probability 1/E: the first k experts are chosen, each
    with weight 1/E (no renormalisation)."""
    c, mlp, params = _block_case("llada_moe")
    params["router"]["kernel"] = np.zeros_like(params["router"]["kernel"])
    with torch.no_grad():
        mlp.gate.weight.zero_()
    x = np.random.default_rng(3).normal(size=(2, 5, c.d_model)).astype(np.float32)
    out, stats = _run_block(c, params, x)
    np.testing.assert_array_equal(stats.load, [10, 10] + [0] * (c.num_experts - 2))
    # First principles: sum over experts 0, 1 of SwiGLU_e(x) / E.
    tokens = torch.from_numpy(x.reshape(-1, c.d_model))
    with torch.no_grad():
        by_hand = sum(mlp.experts[e](tokens) for e in range(2)) / c.num_experts
        np.testing.assert_allclose(out.reshape(-1, c.d_model), by_hand.numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(out, mlp(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.aux_loss, c.experts_per_token, rtol=1e-6)  # E * 2 * 1/E


@pytest.mark.parametrize("layout", ["llada_moe", "llada2"])
def test_all_tokens_routed_to_one_expert(layout):
    """Every token picks expert 5 first (its router column dominates, or a huge bias); the
    grouped matmul then has one group of all T rows and empty ones."""
    c, mlp, params = _block_case(layout)
    x = np.abs(np.random.default_rng(4).normal(size=(2, 6, c.d_model))).astype(np.float32)
    kernel = params["router"]["kernel"]
    if layout == "llada_moe":
        kernel[:] = 0.0
        kernel[:, 5] = 1.0              # logit of expert 5 = sum(x) > 0, the others 0 (ties)
        expected_load = {5: 12, 0: 12}  # then the lowest of the tied rest
    else:
        params["expert_bias"] = np.zeros(c.num_experts, np.float32)
        params["expert_bias"][5] = 10.0  # chosen whatever the sigmoid scores
        with torch.no_grad():
            mlp.gate.expert_bias.copy_(torch.from_numpy(params["expert_bias"]))
        expected_load = {5: 12}
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.from_numpy(kernel.T.copy()))
    out, stats = _run_block(c, params, x)
    for expert, count in expected_load.items():
        assert stats.load[expert] == count
    assert stats.load.sum() == 12 * c.experts_per_token
    with torch.no_grad():
        np.testing.assert_allclose(out, mlp(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_grouped_router_only_chooses_from_the_best_groups():
    """Groups of 2 experts scored by their top-2 sum: with biases making groups 1 and 3 the best
    two, no token may use an expert of groups 0 or 2, whatever its own score."""
    c, _, params = _block_case("llada2")
    params["expert_bias"] = np.array([0, 0, 5, 5, -5, 9, 4, 4], np.float32)  # group 2 has 9-5=4
    x = np.random.default_rng(5).normal(size=(2, 8, c.d_model)).astype(np.float32)
    _, stats = _run_block(c, params, x)
    # group sums: g0 = 0, g1 = 10, g2 = 4, g3 = 8 (plus sigmoid scores < 2): best g1, g3
    assert stats.load[[0, 1, 4, 5]].sum() == 0
    assert stats.load.sum() == 16 * c.experts_per_token


def test_partial_rotary_leaves_the_tail_unrotated():
    from llada_jax.model.layers import rotary_embedding

    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 5, 2, 8)), jnp.float32)
    pos = jnp.arange(5)[None]
    out = rotary_embedding(x, pos, 100.0, rotary_dim=4)
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    np.testing.assert_allclose(out[..., :4], rotary_embedding(x[..., :4], pos, 100.0), rtol=1e-6)
    # rotary_dim = head_dim is the full rotation, bit-identical to the default.
    np.testing.assert_array_equal(rotary_embedding(x, pos, 100.0, 8), rotary_embedding(x, pos,
                                                                                        100.0))


@pytest.mark.parametrize("field,value,message", [
    ("experts_per_token", 9, r"config.model.experts_per_token: expected in \[1, num_experts=8\]"),
    ("router", "top1", r"config.model.router: expected one of"),
    ("router_groups", 3, r"config.model.router_groups: expected a positive divisor"),
    ("first_k_dense", 3, r"config.model.first_k_dense: expected less than n_layers=3"),
    ("rotary_dim", 5, r"config.model.rotary_dim: expected an even number"),
])
def test_bad_moe_fields_name_the_field(field, value, message):
    c = dataclasses.replace(tiny("llada2"), **{field: value})
    with pytest.raises(ValueError, match=message):
        validate_model(c)


def _count(config: ModelConfig) -> int:
    shapes = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def test_full_size_preset_parameter_counts():
    """eval_shape counts of the three presets against sums written out from the published
    architectures (per layer: attention, norms, router, experts)."""
    from configs.illada_8b import ILLADA_8B
    from configs.llada2_mini import LLADA2_MINI
    from configs.llada_moe_7b import LLADA_MOE_7B

    # LLaDA-MoE-7B-A1B: 16 x (attention 2048*128*64 + norms 2*2048 + qk 2*128 + router
    # 2048*64 + experts 64*3*2048*1024) + embeddings 2*157184*2048 + final norm 2048.
    layer = 2048 * 128 * 64 + 2 * 2048 + 2 * 128 + 2048 * 64
    moe_7b = 16 * (layer + 64 * 3 * 2048 * 1024) + 2 * 157184 * 2048 + 2048
    assert _count(LLADA_MOE_7B) == LLADA_MOE_7B.num_params == moe_7b == 7_356_880_896
    active = 16 * (layer + 8 * 3 * 2048 * 1024) + 157184 * 2048 + 2048   # head, not the lookup
    assert LLADA_MOE_7B.num_matmul_params == active == 1_397_823_488      # "1.4B active"
    # LLaDA2.0-mini: attention 2048*128*(32+8); layer 0 dense 3*2048*5120; 19 MoE layers with
    # router 2048*256, bias 256, 256 experts and 1 shared expert of 3*2048*512.
    common = 2048 * 128 * 40 + 2 * 2048 + 2 * 128
    mini = (common + 3 * 2048 * 5120
            + 19 * (common + 2048 * 256 + 256 + 257 * 3 * 2048 * 512)
            + 2 * 157184 * 2048 + 2048)
    assert _count(LLADA2_MINI) == LLADA2_MINI.num_params == mini == 16_255_643_392
    assert LLADA2_MINI.num_active_params == (
        common + 3 * 2048 * 5120 + 19 * (common + 2048 * 256 + 256 + 9 * 3 * 2048 * 512)
        + 2 * 157184 * 2048 + 2048) == 1_432_973_056
    # iLLaDA-8B: 32 x (attention 4096*128*(64+16) + SwiGLU 3*4096*14336 + norms) + one tied
    # table 155136*4096 + final norm.
    illada = 32 * (4096 * 128 * 80 + 3 * 4096 * 14336 + 2 * 4096) + 155136 * 4096 + 4096
    assert _count(ILLADA_8B) == ILLADA_8B.num_params == illada == 7_615_025_152
