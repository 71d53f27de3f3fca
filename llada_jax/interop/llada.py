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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llada_jax.config import ModelConfig, validate_model
from llada_jax.interop.mapping import TensorRule

logger = logging.getLogger(__name__)

# LLaDA's special ids (REFERENCE.md section 1), used when a config.json does not give them.
LLADA_MASK_ID, LLADA_BOS_ID, LLADA_EOS_ID = 126336, 126080, 126081

_T, _B, _L = "model.transformer.", "model.transformer.blocks.{i}.", "model.layers.{i}."
# (our param path, llada key, llama key, num_in_dims); every key ends in ".weight".
_TABLE = (
    (("wte",), _T + "wte", "model.embed_tokens", None),
    (("blocks", "attn_norm", "scale"), _B + "attn_norm", _L + "input_layernorm", None),
    (("blocks", "attn", "q_proj", "kernel"), _B + "q_proj", _L + "self_attn.q_proj", 1),
    (("blocks", "attn", "k_proj", "kernel"), _B + "k_proj", _L + "self_attn.k_proj", 1),
    (("blocks", "attn", "v_proj", "kernel"), _B + "v_proj", _L + "self_attn.v_proj", 1),
    (("blocks", "attn", "attn_out", "kernel"), _B + "attn_out", _L + "self_attn.o_proj", 2),
    (("blocks", "ff_norm", "scale"), _B + "ff_norm", _L + "post_attention_layernorm", None),
    (("blocks", "ff_proj", "kernel"), _B + "ff_proj", _L + "mlp.gate_proj", 1),
    (("blocks", "up_proj", "kernel"), _B + "up_proj", _L + "mlp.up_proj", 1),
    (("blocks", "ff_out", "kernel"), _B + "ff_out", _L + "mlp.down_proj", 1),
    (("ln_f", "scale"), _T + "ln_f", "model.norm", None),
    (("lm_head", "kernel"), _T + "ff_out", "lm_head", 1),   # tied: read the embedding
)
LAYOUTS: dict[str, tuple[TensorRule, ...]] = {
    naming: tuple(TensorRule(path, keys[n] + ".weight", num_in,
                             tied_to=_TABLE[0][1 + n] + ".weight" if path[0] == "lm_head" else None)
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


def _first_id(value: Any, where: str) -> int | None:
    """A token id of config.json or generation_config.json (a list gives its first), or None;
    `where` names the field in the message refusing a value that is not a number."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} is not a token id (an integer)") from None


def model_config_from_hf(hf_config: Mapping, generation_config: Mapping | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config dict, OLMo-style or Llama-style.

    Token ids come from `generation_config` (bos/eos), then `hf_config`, then LLaDA's ids
    (mask 126336, BOS 126080, EOS 126081); an id outside the vocabulary (LLaDA-V's config.json
    carries Llama-3's BOS 128000) falls back to LLaDA's id with a warning. `overrides` sets
    ModelConfig fields last (e.g. ``{"dtype": "bfloat16", "remat_policy": "full"}``).
    """
    if "d_model" in hf_config:
        fields = _olmo_fields(hf_config, source)
    elif "hidden_size" in hf_config:   # LLaDA-V's re-saved tower
        fields = llama_attention_fields(hf_config, source, _DENSE_LLAMA_FIELDS)
    else:
        raise ValueError(f"{source}: neither 'd_model' (LLaDA/OLMo style) nor 'hidden_size' "
                         f"(Llama style) found; is this a LLaDA config?")
    return finish_config(fields, hf_config, generation_config, overrides, source,
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
    overrides = overrides or {}
    for name, default in default_ids.items():
        if name in overrides:
            continue
        # The first id given, read lazily: a later file's value is not looked at.
        given = ((where, _first_id(value, f"{source}: {where} {name}")) for where, value in
                 (("generation_config", generation.get(name)), ("config", c.get(name))))
        where, value = next(((w, v) for w, v in given if v is not None), (None, None))
        if value is not None and 0 <= value < vocab:
            fields[name] = value
            continue
        if value is not None:
            logger.warning("%s: %s %s=%d is outside the vocabulary [0, %d); using %d instead",
                           source, where, name, value, vocab, default)
        if not 0 <= default < vocab:
            raise ValueError(f"{source}: {name} is not given and {family}'s {default} is outside "
                             f"the vocabulary [0, {vocab}); add it to config.json or pass it in "
                             f"overrides")
        fields[name] = default
    pad = _first_id(c.get("pad_token_id"), f"{source}: config pad_token_id")
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


# config.json <-> ModelConfig, one table per style walked both ways: (our field, config.json
# key, type), in reading order. `read_fields` reads each field (refusing a missing or null one
# unless the style derives it), `written_fields` writes them back.
_OLMO_FIELDS = (
    ("d_model", "d_model", int), ("n_heads", "n_heads", int), ("n_kv_heads", "n_kv_heads", int),
    ("mlp_hidden_size", "mlp_hidden_size", int), ("vocab_size", "vocab_size", int),
    ("n_layers", "n_layers", int), ("rope_theta", "rope_theta", float),
    ("rms_norm_eps", "rms_norm_eps", float), ("max_sequence_length", "max_sequence_length", int),
    ("tie_embeddings", "weight_tying", bool))
# The fields every Llama-style config.json has (the MoE families' too).
_LLAMA_FIELDS = (
    ("d_model", "hidden_size", int), ("n_heads", "num_attention_heads", int),
    ("n_kv_heads", "num_key_value_heads", int), ("head_dim", "head_dim", int),
    ("vocab_size", "vocab_size", int), ("max_sequence_length", "max_position_embeddings", int),
    ("rope_theta", "rope_theta", float), ("rms_norm_eps", "rms_norm_eps", float),
    ("tie_embeddings", "tie_word_embeddings", bool))
_DENSE_LLAMA_FIELDS = (("n_layers", "num_hidden_layers", int),
                       ("mlp_hidden_size", "intermediate_size", int))
# OLMo-style fields whose one supported value the export writes and the import requires.
_OLMO_CHOICES = {"layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama"}
_OLMO_OFF = ("include_bias", "include_qkv_bias", "alibi", "scale_logits", "input_emb_norm",
             "attention_layer_norm")


def read_fields(c: Mapping, table: Sequence, source: str,
                derived: Mapping[str, Callable[[Any, dict], Any]]) -> dict:
    """The fields of `table` from config.json `c`: `derived[field](value, fields read so far)`
    for a field the style derives or defaults (value: None when missing), else the value,
    refused when missing or null; each converted to its type."""
    fields: dict[str, Any] = {}
    for ours, key, kind in table:
        value = derived[ours](c.get(key), fields) if ours in derived else require(c, key, source)
        fields[ours] = None if value is None else kind(value)
    return fields


def written_fields(config: ModelConfig, table: Sequence) -> dict:
    """The config.json fields of `table` for `config` (what `read_fields` reads back)."""
    return {key: getattr(config, ours) for ours, key, _ in table}


def _shared_derivations(c: Mapping, source: str) -> dict[str, Callable[[Any, dict], Any]]:
    """Derivations of both styles: the sequence length defaults to 4096, rope_theta may sit in
    ``rope_parameters`` (newer transformers configs), and either tying key ties."""
    def rope_theta(value: Any, fields: dict) -> Any:
        if value is None:
            value = (c.get("rope_parameters") or {}).get("rope_theta")
        return require({"rope_theta": value}, "rope_theta", source)

    return {"max_sequence_length": lambda value, fields: value or 4096,
            "rope_theta": rope_theta, "tie_embeddings": lambda value, fields: tied(c)}


def _refuse(c: Mapping, source: str, choices: Mapping[str, str], off: Sequence[str]) -> None:
    """Refuses a field of `choices` set to another value than its one supported value, and a
    field of `off` switched on."""
    for field, supported in choices.items():
        if c.get(field) is not None and c[field] != supported:
            reject(source, field, c[field], repr(supported))
    for field in off:
        if c.get(field):
            reject(source, field, c[field], "false")


def _olmo_fields(c: Mapping, source: str) -> dict:
    """Fields of the released LLaDA (OLMo-style) config.json, after refusing what we lack."""
    _refuse(c, source, _OLMO_CHOICES, _OLMO_OFF)
    if c.get("rope") is False:
        reject(source, "rope", False, "true (rotary embeddings)")
    if c.get("clip_qkv") is not None:
        reject(source, "clip_qkv", c["clip_qkv"], "null")

    def vocab_size(value: Any, fields: dict) -> Any:
        embedding_size = c.get("embedding_size")
        value = int(require(c, "vocab_size", source))
        if embedding_size is not None and embedding_size < value:
            raise ValueError(f"{source}: embedding_size={embedding_size} is smaller than "
                             f"vocab_size={value}")
        # The embedding (and LM head) has embedding_size rows.
        return value if embedding_size is None else embedding_size

    return {**read_fields(c, _OLMO_FIELDS, source, {
        **_shared_derivations(c, source), "vocab_size": vocab_size,
        "n_kv_heads": lambda value, fields: value if value is not None else (
            1 if c.get("multi_query_attention") else fields["n_heads"]),
        "mlp_hidden_size": lambda value, fields: value if value is not None else (
            int(require(c, "mlp_ratio", source)) * fields["d_model"])}), "head_dim": None}


def llama_attention_fields(c: Mapping, source: str, more: Sequence = ()) -> dict:
    """The fields every Llama-style config.json has (`_LLAMA_FIELDS`), and those of the table
    `more`, after refusing what we lack; head_dim defaults to hidden_size / num_attention_heads."""
    _refuse(c, source, {"hidden_act": "silu"}, ("attention_bias", "mlp_bias"))
    if c.get("rope_scaling") is not None:
        reject(source, "rope_scaling", c["rope_scaling"], "null (plain RoPE)")
    rope_type = (c.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        reject(source, "rope_parameters.rope_type", rope_type, "'default'")

    def head_dim(value: Any, fields: dict) -> Any:
        d_model, n_heads = fields["d_model"], fields["n_heads"]
        if value is None and n_heads > 0 and d_model % n_heads == 0:
            return d_model // n_heads
        return value

    return read_fields(c, (*_LLAMA_FIELDS, *more), source, {
        **_shared_derivations(c, source), "head_dim": head_dim,
        "n_kv_heads": lambda value, fields: value or fields["n_heads"]})


def llama_attention_dict(config: ModelConfig) -> dict:
    """The Llama-style config.json fields `llama_attention_fields` reads, and the one value it
    accepts of those it checks (plain RoPE, SiLU, no attention bias)."""
    return {**written_fields(config, _LLAMA_FIELDS), "rope_scaling": None, "hidden_act": "silu",
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
    if naming == "llada":
        fields = {
            **written_fields(config, _OLMO_FIELDS),
            "mlp_ratio": max(1, config.mlp_hidden_size // config.d_model),
            "embedding_size": config.vocab_size, **_OLMO_CHOICES,
            "rope": True, "rope_full_precision": True, "layer_norm_with_affine": True,
            "block_group_size": 1, "alibi_bias_max": 8.0, "multi_query_attention": None,
            "clip_qkv": None, "init_fn": "mitchell", "init_std": config.init_std,
            "init_device": "meta", "init_cutoff_factor": None, "precision": "amp_bf16",
            **dict.fromkeys((*_OLMO_OFF, "bias_for_layer_norm",
                             "attention_layer_norm_with_affine", "flash_attention"), False),
            **dict.fromkeys(("attention_dropout", "residual_dropout", "embedding_dropout"), 0.0),
        }
    else:
        fields = {**llama_attention_dict(config), **written_fields(config, _DENSE_LLAMA_FIELDS),
                  "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1}
    return {"architectures": ["LLaDAModelLM"],
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "model_type": "llada", "torch_dtype": dtype, **token_ids_dict(config), **fields}


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

