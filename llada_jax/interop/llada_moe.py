"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B, ``model_type: llada_moe``): key table and config.json.

Layout (Llama names plus experts): ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,
o}_proj``, ``self_attn.{q,k}_norm`` (RMSNorm over head_dim), ``{input,post_attention}_layernorm``,
the router ``mlp.gate`` ``[E, d]`` and the experts ``mlp.experts.{j}.{gate,up,down}_proj``,
``model.norm``, ``lm_head``. Router: float32 softmax over the E logits, top-k, no
renormalisation (``norm_topk_prob`` false). Layers listed 0 in ``moe_layer_freq`` have the dense
FFN (``mlp.{gate,up,down}_proj`` of ``dense_intermediate_size``); we support them as leading
layers (our ``first_k_dense``). Shared experts (``shared_expert_intermediate_size``) and an expert
bias are config options of the model class that the released model does not use; their key
names are not published, so such configs are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llada_jax.config import ModelConfig
from llada_jax.interop import llada
from llada_jax.interop.mapping import TensorRule

MASK_ID, EOS_ID = 156895, 156892   # the released tokenizer's <|mdm_mask|> and <|endoftext|>

_L = "model.layers.{i}."
_PER_LAYER = (   # (our path under the stack, HF key, num_in_dims), for dense and MoE layers
    (("attn_norm", "scale"), _L + "input_layernorm.weight", None),
    (("attn", "q_proj", "kernel"), _L + "self_attn.q_proj.weight", 1),
    (("attn", "k_proj", "kernel"), _L + "self_attn.k_proj.weight", 1),
    (("attn", "v_proj", "kernel"), _L + "self_attn.v_proj.weight", 1),
    (("attn", "attn_out", "kernel"), _L + "self_attn.o_proj.weight", 2),
    (("attn", "q_norm", "scale"), _L + "self_attn.q_norm.weight", None),
    (("attn", "k_norm", "scale"), _L + "self_attn.k_norm.weight", None),
    (("ff_norm", "scale"), _L + "post_attention_layernorm.weight", None),
)
_DENSE_FFN = (
    (("ff_proj", "kernel"), _L + "mlp.gate_proj.weight", 1),
    (("up_proj", "kernel"), _L + "mlp.up_proj.weight", 1),
    (("ff_out", "kernel"), _L + "mlp.down_proj.weight", 1),
)
_MOE_FFN = (
    (("moe", "router", "kernel"), _L + "mlp.gate.weight", 1),
    (("moe", "wi_gate"), _L + "mlp.experts.{j}.gate_proj.weight", 1),
    (("moe", "wi_up"), _L + "mlp.experts.{j}.up_proj.weight", 1),
    (("moe", "wo"), _L + "mlp.experts.{j}.down_proj.weight", 1),
)


def layer_rules(per_layer: Sequence, dense_ffn: Sequence, moe_ffn: Sequence
                ) -> tuple[TensorRule, ...]:
    """Rules of the leading dense layers (``dense_blocks``) and the MoE layers (``blocks``)."""
    return (*(TensorRule(("dense_blocks", *p), k, n) for p, k, n in (*per_layer, *dense_ffn)),
            *(TensorRule(("blocks", *p), k, n) for p, k, n in (*per_layer, *moe_ffn)))


LAYOUTS = {"llada_moe": (
    TensorRule(("wte",), "model.embed_tokens.weight"),
    *layer_rules(_PER_LAYER, _DENSE_FFN, _MOE_FFN),
    TensorRule(("ln_f", "scale"), "model.norm.weight"),
    TensorRule(("lm_head", "kernel"), "lm_head.weight", 1, tied_to="model.embed_tokens.weight"),
)}


def matches(hf_config: Mapping) -> bool:
    return hf_config.get("model_type") == "llada_moe"


def naming_of(hf_config: Mapping, keys: Sequence[str], hf_dir: str) -> str:
    return "llada_moe"


tied = llada.tied


def rotary_dim(c: Mapping, head_dim: int, source: str) -> int:
    """Our rotary_dim (0: the whole head) from ``partial_rotary_factor``."""
    factor = float(c.get("partial_rotary_factor") or 1.0)
    dims = int(head_dim * factor)
    if not 0 < factor <= 1 or dims % 2:
        llada.reject(source, "partial_rotary_factor", factor,
                     f"a factor in (0, 1] giving an even number of the {head_dim} head dims")
    return 0 if dims == head_dim else dims


def moe_fields(c: Mapping, source: str) -> dict:
    """The fields both MoE families read alike: the Llama-style fields (tying included), the
    experts, their scaling and the partial rotary."""
    fields = llada.llama_attention_fields(c, source)
    fields.update(num_experts=int(llada.require(c, "num_experts", source)),
                  experts_per_token=int(llada.require(c, "num_experts_per_tok", source)),
                  routed_scaling=float(c.get("routed_scaling_factor") or 1.0),
                  rotary_dim=rotary_dim(c, fields["head_dim"], source))
    return fields


def finish_moe_config(fields: dict, c: Mapping, generation_config: Mapping | None,
                      overrides: Mapping[str, Any] | None, source: str, family: str
                      ) -> ModelConfig:
    """`llada.finish_config` with the ids of the released MoE tokenizer (mask 156895, EOS =
    pad 156892 when not given; the MoE families publish no BOS, so EOS stands in)."""
    return llada.finish_config(fields, c, generation_config, overrides, source,
                               {"mask_token_id": MASK_ID, "bos_token_id": EOS_ID,
                                "eos_token_id": EOS_ID}, family)


def moe_config_dict(config: ModelConfig, architecture: str, model_type: str, dtype: str) -> dict:
    """The config.json fields both MoE families write alike."""
    return {
        "architectures": [architecture], "model_type": model_type, "torch_dtype": dtype,
        **llada.llama_attention_dict(config), "num_hidden_layers": config.n_layers,
        "num_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
        "routed_scaling_factor": config.routed_scaling,
        "partial_rotary_factor": (config.rotary_dim or config.head_dim) / config.head_dim,
        **llada.token_ids_dict(config),
    }


def model_config_from_hf(hf_config: Mapping, generation_config: Mapping | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a LLaDA-MoE config.json (ids as in `finish_moe_config`)."""
    c = hf_config
    for field in ("attention_bias", "clip_qkv", "rope_scaling", "shared_expert_intermediate_size",
                  "moe_router_enable_expert_bias"):
        if c.get(field):
            llada.reject(source, field, c[field], "false/null (the released LLaDA-MoE)")
    if c.get("moe_router_score_function", "softmax") != "softmax":
        llada.reject(source, "moe_router_score_function", c["moe_router_score_function"],
                     "'softmax'")
    n_layers = int(llada.require(c, "num_hidden_layers", source))
    freq = list(c.get("moe_layer_freq") or [1] * n_layers)
    first_k_dense = freq.index(1) if 1 in freq else n_layers
    if freq != [0] * first_k_dense + [1] * (n_layers - first_k_dense):
        llada.reject(source, "moe_layer_freq", freq, "dense layers (0) only before MoE layers (1)")
    fields = moe_fields(c, source)
    fields.update(
        n_layers=n_layers,
        mlp_hidden_size=int(llada.require(c, "dense_intermediate_size", source)),
        expert_mlp_hidden_size=int(llada.require(c, "expert_intermediate_size", source)),
        first_k_dense=first_k_dense, router="softmax",
        normalize_top_k=bool(c.get("norm_topk_prob")), qk_norm=bool(c.get("qk_layernorm")))
    return finish_moe_config(fields, c, generation_config, overrides, source, "LLaDA-MoE")


def hf_config_dict(config: ModelConfig, naming: str, dtype: str) -> dict:
    return {
        **moe_config_dict(config, "LLaDAMoEModelLM", "llada_moe", dtype),
        "dense_intermediate_size": config.mlp_hidden_size,
        "expert_intermediate_size": config.expert_mlp_hidden_size,
        "shared_expert_intermediate_size": None,
        "moe_layer_freq": [0] * config.first_k_dense + [1] * config.num_moe_layers,
        "qk_layernorm": config.qk_norm, "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False, "norm_topk_prob": config.normalize_top_k,
    }


def check_exportable(config: ModelConfig, naming: str) -> None:
    """The layout stores a softmax-routed MoE without shared experts."""
    if not config.is_moe or config.router != "softmax" or config.num_shared_experts:
        raise ValueError(
            f"cannot export this model in the 'llada_moe' layout: it needs num_experts > 0, "
            f"router='softmax' and no shared experts (found num_experts={config.num_experts}, "
            f"router={config.router!r}, num_shared_experts={config.num_shared_experts})")
