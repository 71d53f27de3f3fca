"""LLaDA2.x MoE (inclusionAI/LLaDA2.0-mini, ``model_type: llada2_moe``): key table and config.json.

Layout: ``model.word_embeddings``; per layer ``attention.query_key_value`` (one fused
``[(H + 2 K) * head_dim, d]`` weight, rows q | k | v, each head-major), ``attention.dense`` (the
output projection), ``attention.{query,key}_layernorm`` (RMSNorm over head_dim, applied
unconditionally by the model class), ``{input,post_attention}_layernorm``; the first
``first_k_dense_replace`` layers have the dense ``mlp.{gate,up,down}_proj``, the others the router
``mlp.gate.weight`` ``[E, d]`` with its ``mlp.gate.expert_bias`` ``[E]`` (a buffer: selection
only), the experts ``mlp.experts.{j}.{gate,up,down}_proj`` and the shared experts
``mlp.shared_experts.{gate,up,down}_proj``; ``model.norm``, ``lm_head``. Router: sigmoid in
float32, group-limited top-k on the biased scores, unbiased weights renormalised (k > 1) and
times ``routed_scaling_factor``. Partial rotary: ``partial_rotary_factor`` of head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llada_jax.config import ModelConfig
from llada_jax.interop import llada, llada_moe
from llada_jax.interop.mapping import TensorRule

_L = "model.layers.{i}."
_QKV = _L + "attention.query_key_value.weight"   # fused: the q, k, v rules below share it
_PER_LAYER = (
    (("attn_norm", "scale"), _L + "input_layernorm.weight", None),
    (("attn", "q_proj", "kernel"), _QKV, 1),
    (("attn", "k_proj", "kernel"), _QKV, 1),
    (("attn", "v_proj", "kernel"), _QKV, 1),
    (("attn", "attn_out", "kernel"), _L + "attention.dense.weight", 2),
    (("attn", "q_norm", "scale"), _L + "attention.query_layernorm.weight", None),
    (("attn", "k_norm", "scale"), _L + "attention.key_layernorm.weight", None),
    (("ff_norm", "scale"), _L + "post_attention_layernorm.weight", None),
)
_DENSE_FFN = (
    (("ff_proj", "kernel"), _L + "mlp.gate_proj.weight", 1),
    (("up_proj", "kernel"), _L + "mlp.up_proj.weight", 1),
    (("ff_out", "kernel"), _L + "mlp.down_proj.weight", 1),
)
_MOE_FFN = (
    (("moe", "router", "kernel"), _L + "mlp.gate.weight", 1),
    (("moe", "expert_bias"), _L + "mlp.gate.expert_bias", None),
    (("moe", "wi_gate"), _L + "mlp.experts.{j}.gate_proj.weight", 1),
    (("moe", "wi_up"), _L + "mlp.experts.{j}.up_proj.weight", 1),
    (("moe", "wo"), _L + "mlp.experts.{j}.down_proj.weight", 1),
    (("moe", "shared", "ff_proj", "kernel"), _L + "mlp.shared_experts.gate_proj.weight", 1),
    (("moe", "shared", "up_proj", "kernel"), _L + "mlp.shared_experts.up_proj.weight", 1),
    (("moe", "shared", "ff_out", "kernel"), _L + "mlp.shared_experts.down_proj.weight", 1),
)
LAYOUTS = {"llada2": (
    TensorRule(("wte",), "model.word_embeddings.weight"),
    *llada_moe.layer_rules(_PER_LAYER, _DENSE_FFN, _MOE_FFN),
    TensorRule(("ln_f", "scale"), "model.norm.weight"),
    TensorRule(("lm_head", "kernel"), "lm_head.weight", 1, tied_to="model.word_embeddings.weight"),
)}


def matches(hf_config: Mapping) -> bool:
    return hf_config.get("model_type") == "llada2_moe"


def naming_of(hf_config: Mapping, keys: Sequence[str], hf_dir: str) -> str:
    return "llada2"


tied = llada.tied


def model_config_from_hf(hf_config: Mapping, generation_config: Mapping | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a LLaDA2 config.json (ids as in `llada_moe.finish_moe_config`)."""
    c = hf_config
    for field in ("use_qkv_bias", "use_bias", "rope_scaling"):
        if c.get(field):
            llada.reject(source, field, c[field], "false/null (the released LLaDA2.0)")
    fields = llada_moe.moe_fields(c, source)
    fields.update(
        n_layers=int(llada.require(c, "num_hidden_layers", source)),
        mlp_hidden_size=int(llada.require(c, "intermediate_size", source)),
        expert_mlp_hidden_size=int(llada.require(c, "moe_intermediate_size", source)),
        num_shared_experts=int(c.get("num_shared_experts") or 0),
        first_k_dense=int(c.get("first_k_dense_replace") or 0), router="sigmoid_grouped",
        router_groups=int(c.get("n_group") or 1), router_top_groups=int(c.get("topk_group") or 1),
        normalize_top_k=True,   # the model class renormalises whenever k > 1
        qk_norm=True)
    return llada_moe.finish_moe_config(fields, c, generation_config, overrides, source, "LLaDA2")


def hf_config_dict(config: ModelConfig, naming: str, dtype: str) -> dict:
    return {
        **llada_moe.moe_config_dict(config, "LLaDA2MoeModelLM", "llada2_moe", dtype),
        "intermediate_size": config.mlp_hidden_size,
        "moe_intermediate_size": config.expert_mlp_hidden_size,
        "num_shared_experts": config.num_shared_experts,
        "first_k_dense_replace": config.first_k_dense, "n_group": config.router_groups,
        "topk_group": config.router_top_groups, "norm_topk_prob": True,
        "score_function": "sigmoid", "use_qk_norm": True, "use_qkv_bias": False,
        "use_bias": False,
    }


def check_exportable(config: ModelConfig, naming: str) -> None:
    """The layout stores a sigmoid_grouped MoE with QK-norm and renormalised top-k weights."""
    if not (config.is_moe and config.router == "sigmoid_grouped" and config.qk_norm
            and (config.normalize_top_k or config.experts_per_token == 1)):
        raise ValueError(
            f"cannot export this model in the 'llada2' layout: it needs num_experts > 0, "
            f"router='sigmoid_grouped', qk_norm and normalize_top_k (found num_experts="
            f"{config.num_experts}, router={config.router!r}, qk_norm={config.qk_norm}, "
            f"normalize_top_k={config.normalize_top_k})")
