"""The dense LLaDA family: the key tables and config.json of the LLaDA-8B/iLLaDA and Llama layouts.

Two key layouts of the same language tower (REFERENCE.md section 1):

* ``llada``: the released LLaDA-8B-Base/-Instruct layout, ``model.transformer.blocks.{i}.q_proj``
  ... with an OLMo-style ``config.json`` (``d_model``, ``n_heads``, ...);
* ``llama``: LLaDA-V's re-saved tower, ``model.layers.{i}.self_attn.q_proj`` ... with a Llama-style
  ``config.json`` (``hidden_size``, ``num_attention_heads``, ...).

This module holds only what is particular to the family: the tables (`LAYOUTS`), config.json
<-> `ModelConfig`, and what the layouts cannot express (`check_exportable`). The streaming, the
checks and the files are `interop.mapping` and `interop.safetensors_io`; the entry points are
`interop.hf`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from llada_jax.config import ModelConfig, validate_model
from llada_jax.interop.mapping import TensorRule

logger = logging.getLogger(__name__)

# LLaDA's special ids (REFERENCE.md section 1), used when a config.json does not give them.
LLADA_MASK_ID, LLADA_BOS_ID, LLADA_EOS_ID = 126336, 126080, 126081

_T, _L = "model.transformer.", "model.layers.{i}."
# (our param path, llada key, llama key, num_in_dims)
_TABLE = (
    (("wte",), _T + "wte.weight", "model.embed_tokens.weight", None),
    (("blocks", "attn_norm", "scale"), _T + "blocks.{i}.attn_norm.weight",
     _L + "input_layernorm.weight", None),
    (("blocks", "attn", "q_proj", "kernel"), _T + "blocks.{i}.q_proj.weight",
     _L + "self_attn.q_proj.weight", 1),
    (("blocks", "attn", "k_proj", "kernel"), _T + "blocks.{i}.k_proj.weight",
     _L + "self_attn.k_proj.weight", 1),
    (("blocks", "attn", "v_proj", "kernel"), _T + "blocks.{i}.v_proj.weight",
     _L + "self_attn.v_proj.weight", 1),
    (("blocks", "attn", "attn_out", "kernel"), _T + "blocks.{i}.attn_out.weight",
     _L + "self_attn.o_proj.weight", 2),
    (("blocks", "ff_norm", "scale"), _T + "blocks.{i}.ff_norm.weight",
     _L + "post_attention_layernorm.weight", None),
    (("blocks", "ff_proj", "kernel"), _T + "blocks.{i}.ff_proj.weight",
     _L + "mlp.gate_proj.weight", 1),
    (("blocks", "up_proj", "kernel"), _T + "blocks.{i}.up_proj.weight",
     _L + "mlp.up_proj.weight", 1),
    (("blocks", "ff_out", "kernel"), _T + "blocks.{i}.ff_out.weight",
     _L + "mlp.down_proj.weight", 1),
    (("ln_f", "scale"), _T + "ln_f.weight", "model.norm.weight", None),
    (("lm_head", "kernel"), _T + "ff_out.weight", "lm_head.weight", 1),
)
LAYOUTS: dict[str, tuple[TensorRule, ...]] = {
    naming: tuple(TensorRule(path, keys[n], num_in, tied_to=_TABLE[0][1 + n]
                             if path == ("lm_head", "kernel") else None)
                  for path, *keys, num_in in _TABLE)
    for n, naming in enumerate(("llada", "llama"))}


def naming_of(hf_config: Mapping, keys: Sequence[str], hf_dir: str) -> str:
    """The layout of a checkpoint of this family, from its keys."""
    if any(k.startswith("model.transformer.") for k in keys):
        return "llada"
    if any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys):
        return "llama"
    raise ValueError(f"{hf_dir}: cannot tell the key layout: no 'model.transformer.*' (LLaDA) "
                     f"or 'model.layers.*' (Llama) tensors; found e.g. {sorted(keys)[:3]}")


def matches(hf_config: Mapping) -> bool:
    """Whether a config.json describes a model of this family (the fallback family)."""
    return True


def require(hf_config: Mapping, field: str, source: str) -> Any:
    if hf_config.get(field) is None:
        raise ValueError(f"{source}: field {field!r} is missing (needed to build the model)")
    return hf_config[field]


def reject(source: str, field: str, found: Any, supported: str) -> None:
    raise ValueError(f"{source}: {field}={found!r} is not supported by llada_jax "
                     f"(expected {supported})")


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def model_config_from_hf(hf_config: Mapping, generation_config: Mapping | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config dict, OLMo-style or Llama-style.

    Token ids come from `generation_config` (bos/eos), then `hf_config`, then LLaDA's ids
    (mask 126336, BOS 126080, EOS 126081); an id outside the vocabulary (LLaDA-V's config.json
    carries Llama-3's BOS 128000) falls back to LLaDA's id with a warning. `overrides` sets
    ModelConfig fields last (e.g. ``{"dtype": "bfloat16", "remat_policy": "full"}``).
    """
    c = hf_config
    if "d_model" in c:
        fields = _olmo_fields(c, source)
    elif "hidden_size" in c:   # LLaDA-V's re-saved tower
        fields = {**llama_attention_fields(c, source),
                  "n_layers": int(require(c, "num_hidden_layers", source)),
                  "mlp_hidden_size": int(require(c, "intermediate_size", source))}
    else:
        raise ValueError(f"{source}: neither 'd_model' (LLaDA/OLMo style) nor 'hidden_size' "
                         f"(Llama style) found; is this a LLaDA config?")
    fields["tie_embeddings"] = tied(c)
    return finish_config(fields, c, generation_config, overrides, source,
                         {"mask_token_id": LLADA_MASK_ID, "bos_token_id": LLADA_BOS_ID,
                          "eos_token_id": LLADA_EOS_ID}, "LLaDA")


def finish_config(fields: dict, c: Mapping, generation_config: Mapping | None,
                  overrides: Mapping[str, Any] | None, source: str, default_ids: Mapping,
                  family: str) -> ModelConfig:
    """The `ModelConfig` of architecture `fields` read from config.json `c` by a family:
    sizes checked, head_dim defaulted, token ids picked (`generation_config`, then `c`, then
    the family's `default_ids`), `overrides` applied last, and validated."""
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                 "vocab_size"):
        if not isinstance(fields[name], int) or fields[name] <= 0:
            raise ValueError(f"{source}: {name} must be a positive integer, found "
                             f"{fields[name]!r}")
    if fields["head_dim"] is None:
        if fields["d_model"] % fields["n_heads"]:
            raise ValueError(f"{source}: hidden size {fields['d_model']} is not divisible by "
                             f"the number of heads {fields['n_heads']}")
        fields["head_dim"] = fields["d_model"] // fields["n_heads"]

    # generation_config.json gives bos/eos (before config.json); the mask id only config.json.
    generation = {k: v for k, v in (generation_config or {}).items() if k != "mask_token_id"}
    vocab = fields["vocab_size"]
    overrides = dict(overrides or {})
    for name, default in default_ids.items():
        if name not in overrides:
            candidates = [("generation_config", generation.get(name)), ("config", c.get(name))]
            fields[name] = _pick_id(name, candidates, default, vocab, source, family)
    pad = _first_id(c.get("pad_token_id"))
    if pad is None or not 0 <= pad < vocab:
        pad = overrides.get("eos_token_id", fields.get("eos_token_id"))   # pad with EOS
    fields["pad_token_id"] = pad

    fields.update(overrides)
    try:
        config = ModelConfig(**fields)
    except TypeError as e:
        raise ValueError(f"overrides: {e}") from None
    try:
        validate_model(config)
    except ValueError as e:
        raise ValueError(f"{source} describes a model llada_jax cannot build: {e}") from None
    return config


def _pick_id(name: str, candidates, default: int, vocab: int, source: str,
             family: str) -> int:
    for where, value in candidates:
        value = _first_id(value)
        if value is None:
            continue
        if 0 <= value < vocab:
            return value
        logger.warning("%s: %s %s=%d is outside the vocabulary [0, %d); using %d instead",
                       source, where, name, value, vocab, default)
        break
    if not 0 <= default < vocab:
        raise ValueError(f"{source}: {name} is not given and {family}'s {default} is outside the "
                         f"vocabulary [0, {vocab}); add it to config.json or pass it in overrides")
    return default


def _rope_theta(c: Mapping, source: str) -> float:
    theta = c.get("rope_theta")
    if theta is None:   # newer transformers configs keep it in rope_parameters
        theta = (c.get("rope_parameters") or {}).get("rope_theta")
    return float(require({"rope_theta": theta}, "rope_theta", source))


def _olmo_fields(c: Mapping, source: str) -> dict:
    """Fields of the released LLaDA (OLMo-style) config.json, after refusing what we lack."""
    checks = {"block_type": ("llama",), "layer_norm_type": ("rms",),
              "activation_type": ("silu",)}
    for field, allowed in checks.items():
        if c.get(field) is not None and c[field] not in allowed:
            reject(source, field, c[field], " or ".join(map(repr, allowed)))
    for field in ("include_bias", "include_qkv_bias", "alibi", "scale_logits", "input_emb_norm",
                  "attention_layer_norm"):
        if c.get(field):
            reject(source, field, c[field], "false")
    if c.get("rope") is False:
        reject(source, "rope", False, "true (rotary embeddings)")
    if c.get("clip_qkv") is not None:
        reject(source, "clip_qkv", c["clip_qkv"], "null")
    d_model = int(require(c, "d_model", source))
    n_heads = int(require(c, "n_heads", source))
    n_kv_heads = c.get("n_kv_heads")
    if n_kv_heads is None:
        n_kv_heads = 1 if c.get("multi_query_attention") else n_heads
    mlp = c.get("mlp_hidden_size")
    if mlp is None:
        mlp = int(require(c, "mlp_ratio", source)) * d_model
    vocab = int(require(c, "vocab_size", source))
    embedding_size = c.get("embedding_size")
    if embedding_size is not None:
        if embedding_size < vocab:
            raise ValueError(f"{source}: embedding_size={embedding_size} is smaller than "
                             f"vocab_size={vocab}")
        vocab = int(embedding_size)   # the embedding (and LM head) has embedding_size rows
    return {"d_model": d_model, "n_layers": int(require(c, "n_layers", source)),
            "n_heads": n_heads, "n_kv_heads": int(n_kv_heads), "head_dim": None,
            "mlp_hidden_size": int(mlp), "vocab_size": vocab,
            "rope_theta": _rope_theta(c, source),
            "rms_norm_eps": float(require(c, "rms_norm_eps", source)),
            "max_sequence_length": int(c.get("max_sequence_length") or 4096)}


def llama_attention_fields(c: Mapping, source: str) -> dict:
    """The fields every Llama-style config.json has (sizes, heads, RoPE, norms), after refusing
    what we lack; head_dim defaults to hidden_size / num_attention_heads."""
    if c.get("hidden_act") not in (None, "silu"):
        reject(source, "hidden_act", c["hidden_act"], "'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field):
            reject(source, field, c[field], "false")
    if c.get("rope_scaling") is not None:
        reject(source, "rope_scaling", c["rope_scaling"], "null (plain RoPE)")
    rope_type = (c.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        reject(source, "rope_parameters.rope_type", rope_type, "'default'")
    d_model = int(require(c, "hidden_size", source))
    n_heads = int(require(c, "num_attention_heads", source))
    head_dim = c.get("head_dim")
    if head_dim is None and n_heads > 0 and d_model % n_heads == 0:
        head_dim = d_model // n_heads
    return {"d_model": d_model, "n_heads": n_heads,
            "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
            "head_dim": None if head_dim is None else int(head_dim),
            "vocab_size": int(require(c, "vocab_size", source)),
            "rope_theta": _rope_theta(c, source),
            "rms_norm_eps": float(require(c, "rms_norm_eps", source)),
            "max_sequence_length": int(c.get("max_position_embeddings") or 4096)}


def llama_attention_dict(config: ModelConfig) -> dict:
    """The Llama-style config.json fields `llama_attention_fields` reads."""
    return {"hidden_size": config.d_model, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_sequence_length,
            "rope_theta": config.rope_theta, "rope_scaling": None,
            "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
            "attention_bias": False, "initializer_range": config.init_std}


def tied(hf_config: Mapping) -> bool:
    return bool(hf_config.get("weight_tying") or hf_config.get("tie_word_embeddings"))


def token_ids_dict(config: ModelConfig) -> dict:
    """The config.json fields of the special token ids (and ``use_cache``), of every family."""
    return {"use_cache": False, "mask_token_id": config.mask_token_id,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id}


def hf_config_dict(config: ModelConfig, naming: str, dtype: str) -> dict:
    """config.json for `config` in the released LLaDA (OLMo-style) or the Llama-style flavour."""
    common = {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada",
        "torch_dtype": dtype,
        **token_ids_dict(config),
    }
    if naming == "llada":
        fields = {
            "d_model": config.d_model, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "n_layers": config.n_layers,
            "mlp_hidden_size": config.mlp_hidden_size,
            "mlp_ratio": max(1, config.mlp_hidden_size // config.d_model),
            "vocab_size": config.vocab_size, "embedding_size": config.vocab_size,
            "max_sequence_length": config.max_sequence_length,
            "rope": True, "rope_theta": config.rope_theta, "rope_full_precision": True,
            "rms_norm_eps": config.rms_norm_eps, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "activation_type": "silu", "block_type": "llama",
            "block_group_size": 1, "weight_tying": config.tie_embeddings,
            "alibi_bias_max": 8.0, "multi_query_attention": None, "clip_qkv": None,
            "init_fn": "mitchell", "init_std": config.init_std, "init_device": "meta",
            "init_cutoff_factor": None, "precision": "amp_bf16",
            **dict.fromkeys(("bias_for_layer_norm", "attention_layer_norm",
                             "attention_layer_norm_with_affine", "include_bias",
                             "include_qkv_bias", "alibi", "input_emb_norm", "scale_logits",
                             "flash_attention"), False),
            **dict.fromkeys(("attention_dropout", "residual_dropout", "embedding_dropout"), 0.0),
        }
    else:
        fields = {**llama_attention_dict(config), "num_hidden_layers": config.n_layers,
                  "intermediate_size": config.mlp_hidden_size, "attention_dropout": 0.0,
                  "mlp_bias": False, "tie_word_embeddings": config.tie_embeddings,
                  "pretraining_tp": 1}
    return {**common, **fields}


def check_exportable(config: ModelConfig, naming: str) -> None:
    """Refuses, before anything is written, what the dense layouts cannot express: experts,
    QK-norm or partial rotary, and (``llada``) a head_dim other than d_model / n_heads.

    The released LLaDA config.json (OLMo style) has no head_dim: its model class builds q_proj
    as [d_model, d_model] and splits heads as d_model / n_heads, so another head_dim would
    write a checkpoint that neither that class nor our importer can load. The Llama-style
    config.json carries `head_dim` (our importer and transformers' Llama-family configs read
    it; LLaDA-V's own modeling code requires d_model / n_heads as well).
    """
    if config.is_moe or config.qk_norm or config.rotary_dim:
        raise ValueError(f"cannot export this model in the dense '{naming}' layout: it has "
                         f"num_experts={config.num_experts}, qk_norm={config.qk_norm}, "
                         f"rotary_dim={config.rotary_dim}; use --naming=llada_moe or llada2")
    if naming == "llada" and config.n_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"cannot export head_dim={config.head_dim} with n_heads={config.n_heads} and "
            f"d_model={config.d_model} in the 'llada' layout: its config.json has no head_dim "
            f"(the released model class uses d_model / n_heads = "
            f"{config.d_model / config.n_heads:g}); use --naming=llama, whose config.json "
            f"records head_dim")

