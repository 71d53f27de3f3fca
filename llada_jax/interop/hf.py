"""Hugging Face LLaDA checkpoints <-> llada_jax params (import and export), tensor by tensor.

Two key layouts of the same language tower are understood (REFERENCE.md section 1):

* ``llada``: the released LLaDA-8B-Base/-Instruct layout, ``model.transformer.blocks.{i}.q_proj``
  ... with an OLMo-style ``config.json`` (``d_model``, ``n_heads``, ...);
* ``llama``: LLaDA-V's re-saved tower, ``model.layers.{i}.self_attn.q_proj`` ... with a Llama-style
  ``config.json`` (``hidden_size``, ``num_attention_heads``, ...).

The conversion is data: `PARAM_RULES` says, for every parameter of our scanned tree, under which
key it is stored in each layout and how many leading dims of our kernel are inputs. Everything
else follows from three small hooks: PyTorch stores linear weights ``[out, in]`` (transpose), heads
are split head-major from the output dim (a row-major reshape), and our block params are stacked
over layers (one HF tensor per layer).

Import reads one tensor at a time with ``safetensors.safe_open`` and fills one stacked host buffer
per parameter, which goes straight onto its target sharding and is dropped, so host memory peaks
at about one stacked parameter, never two copies of the model. Every tensor is checked as it
streams: a damaged shard file (truncated, padded), a CRC-32 mismatch (our exports record one per
tensor in the shard header) or a NaN/inf is a ValueError naming the shard file and the tensor.

Export pulls one layer slice at a time off the devices and streams it into the shard files,
written into ``DIR.tmp-XXXX`` and renamed into place only once complete; what the target layout
cannot express, or a directory it must not replace, is refused before anything is written.

This module knows nothing about training checkpoints (`llada_jax.train.checkpoint`) or tokenizers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES, ModelConfig, validate_model
from llada_jax.model.transformer import Transformer

logger = logging.getLogger(__name__)

NAMINGS = ("llada", "llama")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")

# LLaDA's special ids (REFERENCE.md section 1), used when a config.json does not give them.
LLADA_MASK_ID, LLADA_BOS_ID, LLADA_EOS_ID = 126336, 126080, 126081

# safetensors dtype names <-> numpy dtypes. Floating dtypes are converted; anything else (ints,
# bools, float8 variants) cannot become model weights.
_SAFETENSORS_FLOATS = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                       "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                         "BF16": 2, "I16": 2, "U16": 2}   # everything else: 1 byte
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}
_SAFETENSORS_NAME = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
                     np.dtype(np.float16): "F16"}

# Logical axis name of our params -> the config field that sizes it (for error messages).
_AXIS_FIELDS = {"embed": "d_model", "norm": "d_model", "heads": "n_heads",
                "kv_heads": "n_kv_heads", "head_dim": "head_dim", "mlp": "mlp_hidden_size",
                "vocab": "vocab_size", "layers": "n_layers"}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one of our parameters lives in a Hugging Face checkpoint.

    path: the parameter's path in our tree (``blocks/...`` params are stacked over layers).
    llada_key / llama_key: the HF key in each layout; ``{i}`` is the layer index.
    num_in_dims: for kernels, how many leading dims (after the layer axis) are inputs; the HF
      tensor is then ``[prod(out dims), prod(in dims)]``. None: stored with our shape as is.
    """

    path: tuple[str, ...]
    llada_key: str
    llama_key: str
    num_in_dims: int | None = None

    @property
    def stacked(self) -> bool:
        return self.path[0] == "blocks"

    def key(self, naming: str, layer: int | None = None) -> str:
        template = self.llada_key if naming == "llada" else self.llama_key
        return template.format(i=layer) if self.stacked else template


_T, _L = "model.transformer.", "model.layers.{i}."
PARAM_RULES: tuple[TensorRule, ...] = (
    TensorRule(("wte",), _T + "wte.weight", "model.embed_tokens.weight"),
    TensorRule(("blocks", "attn_norm", "scale"), _T + "blocks.{i}.attn_norm.weight",
               _L + "input_layernorm.weight"),
    TensorRule(("blocks", "attn", "q_proj", "kernel"), _T + "blocks.{i}.q_proj.weight",
               _L + "self_attn.q_proj.weight", 1),
    TensorRule(("blocks", "attn", "k_proj", "kernel"), _T + "blocks.{i}.k_proj.weight",
               _L + "self_attn.k_proj.weight", 1),
    TensorRule(("blocks", "attn", "v_proj", "kernel"), _T + "blocks.{i}.v_proj.weight",
               _L + "self_attn.v_proj.weight", 1),
    TensorRule(("blocks", "attn", "attn_out", "kernel"), _T + "blocks.{i}.attn_out.weight",
               _L + "self_attn.o_proj.weight", 2),
    TensorRule(("blocks", "ff_norm", "scale"), _T + "blocks.{i}.ff_norm.weight",
               _L + "post_attention_layernorm.weight"),
    TensorRule(("blocks", "ff_proj", "kernel"), _T + "blocks.{i}.ff_proj.weight",
               _L + "mlp.gate_proj.weight", 1),
    TensorRule(("blocks", "up_proj", "kernel"), _T + "blocks.{i}.up_proj.weight",
               _L + "mlp.up_proj.weight", 1),
    TensorRule(("blocks", "ff_out", "kernel"), _T + "blocks.{i}.ff_out.weight",
               _L + "mlp.down_proj.weight", 1),
    TensorRule(("ln_f", "scale"), _T + "ln_f.weight", "model.norm.weight"),
    TensorRule(("lm_head", "kernel"), _T + "ff_out.weight", "lm_head.weight", 1),
)
_WTE_RULE, _LM_HEAD_RULE = PARAM_RULES[0], PARAM_RULES[-1]

# Buffers some PyTorch checkpoints carry that are not parameters (recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------
# Hooks: one HF tensor <-> one (per-layer) slice of our parameter.


def hf_from_param(x: Any, rule: TensorRule) -> Any:
    """Our (per-layer) parameter slice -> the HF tensor (numpy or jax arrays alike)."""
    if rule.num_in_dims is None:
        return x
    in_size = math.prod(x.shape[:rule.num_in_dims])
    return x.reshape(in_size, -1).T      # [in, out] -> PyTorch [out, in]


def param_from_hf(w: Any, rule: TensorRule, shape: Sequence[int]) -> Any:
    """The HF tensor -> our (per-layer) parameter slice of `shape` (heads split head-major)."""
    if rule.num_in_dims is None:
        return w.reshape(shape)
    return w.T.reshape(shape)


def _read_into(out: np.ndarray, w: np.ndarray, rule: TensorRule) -> None:
    """Writes `param_from_hf(w)` into the (contiguous) slot `out` without an extra copy."""
    if rule.num_in_dims is None:
        np.copyto(out, w.reshape(out.shape), casting="unsafe")
    else:
        in_size = math.prod(out.shape[:rule.num_in_dims])
        np.copyto(out.reshape(in_size, -1), w.T, casting="unsafe")


# ----------------------------------------------------------------------------------------------
# Shapes: what our config expects, from jax.eval_shape (nothing is allocated).


@functools.lru_cache(maxsize=16)
def abstract_params(config: ModelConfig) -> dict:
    """Our param tree as boxed `ShapeDtypeStruct`s with logical axis names (no allocation)."""
    init = functools.partial(Transformer(config).init, jax.random.key(0),
                             jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _tree_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _tree_paths(value, (*prefix, name))
        else:
            yield (*prefix, name)


def _dims(box: Any, stacked: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, logical names) of one (per-layer, when stacked) slice of a boxed parameter."""
    shape, names = tuple(box.value.shape), tuple(box.names)
    return (shape[1:], names[1:]) if stacked else (shape, names)


def _hf_shape(rule: TensorRule, config: ModelConfig) -> tuple[tuple[int, ...], str]:
    """The HF tensor shape a config implies for `rule`, and how it follows from the config."""
    shape, names = _dims(_get(abstract_params(config), rule.path), rule.stacked)
    if rule.num_in_dims is None:   # stored as is: one HF dim per dim of ours
        groups = [((s,), (n,)) for s, n in zip(shape, names, strict=True)]
    else:                          # PyTorch [out, in]: rows are our output dims, flattened
        k = rule.num_in_dims
        groups = [(shape[k:], names[k:]), (shape[:k], names[:k])]
    hf_shape, parts = [], []
    for sizes, axis_names in groups:
        size = math.prod(sizes)
        hf_shape.append(size)
        fields = "*".join(_AXIS_FIELDS[n] for n in axis_names)
        values = "*".join(str(s) for s in sizes)
        parts.append(f"{fields}={size}" if len(sizes) == 1 else f"{fields}={values}={size}")
    return tuple(hf_shape), "[" + ", ".join(parts) + "]"


def expected_hf_shapes(config: ModelConfig, naming: str) -> dict[str, tuple[int, ...]]:
    """Every HF key of the `naming` layout for `config`, with its tensor shape."""
    _check_naming(naming)
    out = {}
    for rule in PARAM_RULES:
        shape, _ = _hf_shape(rule, config)
        for layer in (range(config.n_layers) if rule.stacked else [None]):
            out[rule.key(naming, layer)] = shape
    return out


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise ValueError(f"naming: expected one of {NAMINGS}, found {naming!r}")


# ----------------------------------------------------------------------------------------------
# config.json (either flavour) -> ModelConfig.


def _require(hf_config: Mapping, field: str, source: str) -> Any:
    if hf_config.get(field) is None:
        raise ValueError(f"{source}: field {field!r} is missing (needed to build the model)")
    return hf_config[field]


def _reject(source: str, field: str, found: Any, supported: str) -> None:
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
    elif "hidden_size" in c:
        fields = _llama_fields(c, source)
    else:
        raise ValueError(f"{source}: neither 'd_model' (LLaDA/OLMo style) nor 'hidden_size' "
                         f"(Llama style) found; is this a LLaDA config?")
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

    generation = generation_config or {}
    vocab = fields["vocab_size"]
    ids = {
        "mask_token_id": [("config", c.get("mask_token_id"))],
        "bos_token_id": [("generation_config", generation.get("bos_token_id")),
                         ("config", c.get("bos_token_id"))],
        "eos_token_id": [("generation_config", generation.get("eos_token_id")),
                         ("config", c.get("eos_token_id"))],
    }
    defaults = {"mask_token_id": LLADA_MASK_ID, "bos_token_id": LLADA_BOS_ID,
                "eos_token_id": LLADA_EOS_ID}
    overrides = dict(overrides or {})
    for name, candidates in ids.items():
        if name not in overrides:
            fields[name] = _pick_id(name, candidates, defaults[name], vocab, source)
    pad = _first_id(c.get("pad_token_id"))
    if pad is None or not 0 <= pad < vocab:
        pad = overrides.get("eos_token_id", fields.get("eos_token_id"))   # LLaDA pads with EOS
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


def _pick_id(name: str, candidates, default: int, vocab: int, source: str) -> int:
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
        raise ValueError(f"{source}: {name} is not given and LLaDA's {default} is outside the "
                         f"vocabulary [0, {vocab}); add it to config.json or pass it in overrides")
    return default


def _rope_theta(c: Mapping, source: str) -> float:
    if c.get("rope_theta") is not None:
        return float(c["rope_theta"])
    parameters = c.get("rope_parameters") or {}   # newer transformers configs
    if parameters.get("rope_theta") is not None:
        return float(parameters["rope_theta"])
    raise ValueError(f"{source}: field 'rope_theta' is missing (needed to build the model)")


def _olmo_fields(c: Mapping, source: str) -> dict:
    """Fields of the released LLaDA (OLMo-style) config.json, after refusing what we lack."""
    checks = {"block_type": ("llama",), "layer_norm_type": ("rms",),
              "activation_type": ("silu",)}
    for field, allowed in checks.items():
        if c.get(field) is not None and c[field] not in allowed:
            _reject(source, field, c[field], " or ".join(map(repr, allowed)))
    for field in ("include_bias", "include_qkv_bias", "alibi", "scale_logits", "input_emb_norm",
                  "attention_layer_norm"):
        if c.get(field):
            _reject(source, field, c[field], "false")
    if c.get("rope") is False:
        _reject(source, "rope", False, "true (rotary embeddings)")
    if c.get("clip_qkv") is not None:
        _reject(source, "clip_qkv", c["clip_qkv"], "null")
    d_model = int(_require(c, "d_model", source))
    n_heads = int(_require(c, "n_heads", source))
    n_kv_heads = c.get("n_kv_heads")
    if n_kv_heads is None:
        n_kv_heads = 1 if c.get("multi_query_attention") else n_heads
    mlp = c.get("mlp_hidden_size")
    if mlp is None:
        mlp = int(_require(c, "mlp_ratio", source)) * d_model
    vocab = int(_require(c, "vocab_size", source))
    embedding_size = c.get("embedding_size")
    if embedding_size is not None:
        if embedding_size < vocab:
            raise ValueError(f"{source}: embedding_size={embedding_size} is smaller than "
                             f"vocab_size={vocab}")
        vocab = int(embedding_size)   # the embedding (and LM head) has embedding_size rows
    return {"d_model": d_model, "n_layers": int(_require(c, "n_layers", source)),
            "n_heads": n_heads, "n_kv_heads": int(n_kv_heads), "head_dim": None,
            "mlp_hidden_size": int(mlp), "vocab_size": vocab,
            "rope_theta": _rope_theta(c, source),
            "rms_norm_eps": float(_require(c, "rms_norm_eps", source)),
            "max_sequence_length": int(c.get("max_sequence_length") or 4096)}


def _llama_fields(c: Mapping, source: str) -> dict:
    """Fields of a Llama-style config.json (LLaDA-V's re-saved tower)."""
    if c.get("hidden_act") not in (None, "silu"):
        _reject(source, "hidden_act", c["hidden_act"], "'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field):
            _reject(source, field, c[field], "false")
    if c.get("rope_scaling") is not None:
        _reject(source, "rope_scaling", c["rope_scaling"], "null (plain RoPE)")
    rope_type = (c.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        _reject(source, "rope_parameters.rope_type", rope_type, "'default'")
    n_heads = int(_require(c, "num_attention_heads", source))
    head_dim = c.get("head_dim")
    return {"d_model": int(_require(c, "hidden_size", source)),
            "n_layers": int(_require(c, "num_hidden_layers", source)),
            "n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
            "head_dim": None if head_dim is None else int(head_dim),
            "mlp_hidden_size": int(_require(c, "intermediate_size", source)),
            "vocab_size": int(_require(c, "vocab_size", source)),
            "rope_theta": _rope_theta(c, source),
            "rms_norm_eps": float(_require(c, "rms_norm_eps", source)),
            "max_sequence_length": int(c.get("max_position_embeddings") or 4096)}


def _tied(hf_config: Mapping) -> bool:
    return bool(hf_config.get("weight_tying") or hf_config.get("tie_word_embeddings"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# Inspecting a checkpoint directory: which tensors, where, which dtype and shape (headers only).


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors checkpoint, as its header describes it (no data read)."""

    key: str
    shard: str
    dtype: str            # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * _SAFETENSORS_ITEMSIZE.get(self.dtype, 1)


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A validated Hugging Face checkpoint directory: config, layout and tensor headers."""

    directory: str
    naming: str
    hf_config: dict
    config: ModelConfig
    tied_embeddings: bool
    tensors: dict[str, StoredTensor]

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tensors.values())


def list_tensors(hf_dir: str) -> dict[str, StoredTensor]:
    """Key -> StoredTensor for every tensor of a safetensors checkpoint (sharded or single)."""
    from safetensors import safe_open

    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        weight_map = None
    else:
        found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "no such directory"
        raise FileNotFoundError(f"{hf_dir}: expected {INDEX_FILE} or {SINGLE_FILE} (only "
                                f"safetensors checkpoints are supported), found {found}")
    by_shard: dict[str, list[str]] = {}
    if weight_map is None:
        by_shard[SINGLE_FILE] = []
    else:
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
    tensors = {}
    for shard, keys in by_shard.items():
        path = os.path.join(hf_dir, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard file {path} is missing; {INDEX_FILE} lists "
                                    f"{len(keys)} tensor(s) in it, e.g. {keys[0]!r}")
        try:
            handle = safe_open(path, framework="numpy")
        except Exception as e:   # SafetensorError: truncated, padded or garbled header
            raise ValueError(f"shard file {path} is damaged: {e}") from None
        with handle as f:
            present = set(f.keys())
            for key in (keys or sorted(present)):
                if key not in present:
                    raise ValueError(f"tensor {key!r}: {INDEX_FILE} says it is in {shard}, "
                                     f"but that file does not contain it")
                view = f.get_slice(key)
                tensors[key] = StoredTensor(key, shard, view.get_dtype(),
                                            tuple(int(s) for s in view.get_shape()))
    return tensors


def _detect_naming(keys: Sequence[str], hf_dir: str) -> str:
    if any(k.startswith("model.transformer.") for k in keys):
        return "llada"
    if any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys):
        return "llama"
    raise ValueError(f"{hf_dir}: cannot tell the key layout: no 'model.transformer.*' (LLaDA) "
                     f"or 'model.layers.*' (Llama) tensors; found e.g. {sorted(keys)[:3]}")


def inspect_hf_checkpoint(hf_dir: str, overrides: Mapping[str, Any] | None = None,
                          skip_prefixes: Sequence[str] = ()) -> HFCheckpoint:
    """Parses config.json and the tensor headers and checks them against each other.

    Raises before any tensor data is read: FileNotFoundError for a missing config.json or shard;
    ValueError naming the tensor for a missing, unexpected, wrongly shaped or non-float tensor
    (a shape message says which config fields imply the expected shape). Keys starting with
    one of `skip_prefixes` are ignored (e.g. ``model.vision_tower.`` of a full LLaDA-V
    checkpoint).
    """
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found (a Hugging Face checkpoint directory "
                                f"needs config.json)")
    hf_config = _read_json(config_path)
    generation_path = os.path.join(hf_dir, "generation_config.json")
    generation = _read_json(generation_path) if os.path.isfile(generation_path) else None
    config = model_config_from_hf(hf_config, generation, overrides, source=config_path)
    tensors = {k: t for k, t in list_tensors(hf_dir).items()
               if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(tuple(skip_prefixes))}
    naming = _detect_naming(list(tensors), hf_dir)
    tied = _tied(hf_config)
    expected = expected_hf_shapes(config, naming)
    if tied and _LM_HEAD_RULE.key(naming) not in tensors:
        del expected[_LM_HEAD_RULE.key(naming)]   # the LM head is the embedding

    problems = []
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) that config.json implies: "
                        f"{_some(missing)}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) for a {config.n_layers}-layer "
                        f"'{naming}' checkpoint: {_some(unexpected)}")
    explanations = {r: _hf_shape(r, config)[1] for r in PARAM_RULES}
    for rule in PARAM_RULES:
        for layer in (range(config.n_layers) if rule.stacked else [None]):
            key = rule.key(naming, layer)
            if key not in tensors or key not in expected:
                continue
            stored = tensors[key]
            if stored.shape != expected[key]:
                problems.append(f"tensor {key!r} has shape {list(stored.shape)}, but config.json "
                                f"implies {list(expected[key])} = {explanations[rule]}")
            if stored.dtype not in _SAFETENSORS_FLOATS:
                problems.append(f"tensor {key!r} has dtype {stored.dtype}, which cannot be "
                                f"converted to weights (expected one of "
                                f"{sorted(_SAFETENSORS_FLOATS)})")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8
                                else [])
        raise ValueError(f"{hf_dir} does not match its config.json:\n  - " + "\n  - ".join(shown))
    return HFCheckpoint(hf_dir, naming, hf_config, config, tied, tensors)


def _some(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------
# Import.


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence | None = None) -> dict:
    """The target sharding of every parameter: the logical specs mapped by `rules` on `mesh`.

    Without a mesh every parameter goes to the first local device.
    """
    abstract = abstract_params(config)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, nn.unbox(abstract))
    rules = DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, tuple(rules))


def _check_divisible(abstract: Mapping, shardings: Mapping) -> None:
    """Refuses, before anything is read, a mesh that cannot split a parameter evenly."""
    for rule in PARAM_RULES:
        sharding = _get(shardings, rule.path)
        if not isinstance(sharding, NamedSharding):
            continue
        box = _get(abstract, rule.path)
        spec = tuple(sharding.spec) + (None,) * (len(box.value.shape) - len(sharding.spec))
        for size, name, axes in zip(box.value.shape, box.names, spec, strict=True):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % parts:
                raise ValueError(
                    f"cannot shard {'/'.join(rule.path)}: its '{name}' dim "
                    f"({_AXIS_FIELDS.get(name, name)}={size}) is split over mesh axes "
                    f"{list(axes)} of {parts} devices, which does not divide it")


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto `sharding`; every device (of every process) gets just its slice."""
    array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return array.block_until_ready()


# Shard metadata entry our exports write per tensor: "llada_jax.crc32:<key>" -> 8 hex digits of
# the CRC-32 of the tensor's bytes. Hugging Face checkpoints carry no checksum; when a shard has
# one, import verifies it, so a payload changed after the export is caught.
CRC32_PREFIX = "llada_jax.crc32:"
_FINITE_CHUNK = 1 << 22   # elements per finiteness check (bounds the temporary arrays)
# Float dtype -> (unsigned view, exponent mask).
_EXPONENT_BITS = {np.dtype(ml_dtypes.bfloat16): (np.uint16, np.uint16(0x7F80)),
                  np.dtype(np.float16): (np.uint16, np.uint16(0x7C00)),
                  np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
                  np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0000000000000))}


def tensor_crc32(array: np.ndarray) -> str:
    """The CRC-32 of a tensor's (little-endian, C-order) bytes, as 8 hex digits."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(data.data) & 0xFFFFFFFF:08x}"


def check_tensor(array: np.ndarray, key: str, path: str, crc32: str | None = None) -> None:
    """Refuses a tensor whose bytes do not match the recorded checksum or that holds NaN/inf.

    Every message names the shard file and the tensor, so a damaged file is found at once.
    """
    if crc32 is not None and tensor_crc32(array) != crc32:
        raise ValueError(f"shard file {path}: tensor {key!r} is corrupted (CRC-32 "
                         f"{tensor_crc32(array)} does not match the {crc32} recorded at export)")
    exponent = _EXPONENT_BITS.get(np.dtype(array.dtype))
    if exponent is None:   # integers, bools: nothing to check
        return
    # NaN and inf are the floats whose exponent bits are all ones: an integer test on the raw
    # bits is several times faster than np.isfinite (much more so for bfloat16).
    uint, mask = exponent
    flat = np.ascontiguousarray(array).reshape(-1)
    bits = flat.view(uint)
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = bits[start:start + _FINITE_CHUNK]
        bad = (chunk & mask) == mask
        if bad.any():
            first = start + int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(first, array.shape))
            raise ValueError(f"shard file {path}: tensor {key!r} holds a non-finite value "
                             f"({float(flat[first])} at index {list(index)}); the file is "
                             f"damaged or the model diverged")


class _ShardReader:
    """Opens shard files lazily and reads one tensor at a time (numpy, bf16 via ml_dtypes)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._handles: dict[str, Any] = {}

    def read(self, stored: StoredTensor) -> np.ndarray:
        """The tensor, after checking its checksum (when the shard has one) and finiteness."""
        from safetensors import safe_open

        path = os.path.join(self.directory, stored.shard)
        if stored.shard not in self._handles:
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:   # changed on disk since it was inspected
                raise ValueError(f"shard file {path} is damaged: {e}") from None
            self._handles[stored.shard] = (handle, handle.metadata() or {})
        handle, metadata = self._handles[stored.shard]
        w = handle.get_tensor(stored.key)
        check_tensor(w, stored.key, path, metadata.get(CRC32_PREFIX + stored.key))
        return w

    def close(self) -> None:
        # Dropping the handles unmaps the files.
        self._handles.clear()


def import_hf(hf_dir: str, *, mesh: jax.sharding.Mesh | None = None,
              rules: Sequence | None = None, param_dtype: str | None = None,
              overrides: Mapping[str, Any] | None = None,
              skip_prefixes: Sequence[str] = ()) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face LLaDA checkpoint directory as (ModelConfig, params).

    params is our scanned tree (``params['blocks']['attn']['q_proj']['kernel']`` is
    ``[n_layers, d_model, n_heads, head_dim]``), each leaf placed on its sharding on `mesh`
    (logical rules `rules`, default the project's table) or on the first device without a mesh.
    `param_dtype`: None keeps the checkpoint's float dtype when all tensors share one (else
    float32); "float32"/"bfloat16"/"float16" casts. The returned config's `param_dtype` says
    which. Host memory peaks at about one stacked parameter plus one HF tensor.
    """
    checkpoint = inspect_hf_checkpoint(hf_dir, overrides, skip_prefixes)
    if param_dtype is None:
        stored = {t.dtype for t in checkpoint.tensors.values()}
        param_dtype = {"BF16": "bfloat16", "F16": "float16"}.get(stored.pop(), "float32") \
            if len(stored) == 1 else "float32"
    if param_dtype not in _DTYPES:
        raise ValueError(f"param_dtype: expected one of {sorted(_DTYPES)} or None, found "
                         f"{param_dtype!r}")
    config = dataclasses.replace(checkpoint.config, param_dtype=param_dtype)
    return config, load_params_from_checkpoint(checkpoint, config, mesh, rules)


def load_params_from_checkpoint(checkpoint: HFCheckpoint, config: ModelConfig,
                                mesh: jax.sharding.Mesh | None = None,
                                rules: Sequence | None = None) -> dict:
    """Streams the tensors of an inspected checkpoint into params of `config.param_dtype`."""
    dtype = _DTYPES[config.param_dtype]
    shardings = param_shardings(config, mesh, rules)
    abstract = abstract_params(config)
    _check_divisible(abstract, shardings)
    reader = _ShardReader(checkpoint.directory)
    params: dict = {}
    try:
        for rule in PARAM_RULES:
            shape = tuple(_get(abstract, rule.path).value.shape)
            source = rule
            if rule is _LM_HEAD_RULE and rule.key(checkpoint.naming) not in checkpoint.tensors:
                source = _WTE_RULE  # tied embeddings: the LM head is wte, stored [vocab, d] too
            host = np.empty(shape, dtype)   # the one stacked host buffer of this parameter
            for layer in (range(config.n_layers) if rule.stacked else [None]):
                w = reader.read(checkpoint.tensors[source.key(checkpoint.naming, layer)])
                _read_into(host if layer is None else host[layer], w, rule)
                del w
            # Unmap the shard files: their pages read so far would otherwise stay in this
            # process's resident set until the end (file-backed, but counted all the same).
            reader.close()
            _set(params, rule.path, _place(host, _get(shardings, rule.path)))
            del host   # the devices hold it now
    finally:
        reader.close()
    return params


# ----------------------------------------------------------------------------------------------
# Export.


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    directory: str
    num_tensors: int
    num_bytes: int
    num_shards: int


def hf_config_dict(config: ModelConfig, naming: str, dtype: str) -> dict:
    """config.json for `config` in the released LLaDA (OLMo-style) or the Llama-style flavour."""
    _check_naming(naming)
    common = {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada",
        "torch_dtype": dtype,
        "use_cache": False,
        "mask_token_id": config.mask_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
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
            "layer_norm_with_affine": True, "bias_for_layer_norm": False,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": False,
            "activation_type": "silu", "block_type": "llama", "block_group_size": 1,
            "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
            "alibi": False, "alibi_bias_max": 8.0, "multi_query_attention": None,
            "input_emb_norm": False, "scale_logits": False, "clip_qkv": None,
            "flash_attention": False, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "embedding_dropout": 0.0, "init_fn": "mitchell", "init_std": config.init_std,
            "init_device": "meta", "init_cutoff_factor": None, "precision": "amp_bf16",
        }
    else:
        fields = {
            "hidden_size": config.d_model, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
            "num_hidden_layers": config.n_layers,
            "intermediate_size": config.mlp_hidden_size, "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_sequence_length,
            "rope_theta": config.rope_theta, "rope_scaling": None,
            "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "initializer_range": config.init_std,
            "pretraining_tp": 1,
        }
    return {**common, **fields}


def _plan_shards(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[int]]:
    """Greedy split of (key, bytes) entries, in order, into shards of at most max_shard_bytes
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for n, (_, num_bytes) in enumerate(entries):
        if shards[-1] and size + num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += num_bytes
    return shards


def write_safetensors(path: str | None, tensors: Sequence[tuple[str, np.dtype, tuple[int, ...],
                                                                Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str]) -> None:
    """Streams tensors into one safetensors file, calling each producer only when its turn comes.

    The header (names, dtypes, shapes, offsets) is known from the shapes alone, so only one
    tensor is ever held in memory. The header's metadata also records each tensor's CRC-32
    (`CRC32_PREFIX` + name): written as placeholders of the same width first, filled in once the
    data is written, so import can detect a payload changed later. `path=None` runs the
    producers without writing (other processes of a multi-host export, which must join the same
    collectives).
    """
    def header_blob(crcs: Mapping[str, str]) -> bytes:
        meta = dict(metadata)
        meta.update({CRC32_PREFIX + name: crcs.get(name, "0" * 8) for name, *_ in tensors})
        header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        for name, dtype, shape, _ in tensors:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _SAFETENSORS_NAME[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)   # the data starts 8-byte aligned

    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is big-endian")
    blob = header_blob({})
    crcs = {}
    with open(path if path is not None else os.devnull, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in tensors:
            array = np.ascontiguousarray(produce())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: produced {array.dtype}{list(array.shape)}, "
                                 f"planned {np.dtype(dtype)}{list(shape)}")
            crcs[name] = tensor_crc32(array)
            f.write(array.reshape(-1).view(np.uint8).data)
        if path is not None:
            final = header_blob(crcs)
            if len(final) != len(blob):   # cannot happen: the checksums have a fixed width
                raise RuntimeError(f"{path}: the header changed size while being completed")
            f.seek(8)
            f.write(final)
        f.flush()
        if path is not None:
            os.fsync(f.fileno())   # a full disk shows up here, not after the rename


@functools.lru_cache(maxsize=64)
def _host_slice_fn(rule: TensorRule, dtype: str, mesh: jax.sharding.Mesh | None) -> Callable:
    """A jitted (param, layer) -> HF tensor of that layer in `dtype`.

    On a mesh the result is replicated, so every process can copy it to its host whole (the
    layer index is an argument: one compilation per parameter, not per layer).
    """
    def slice_layer(x, layer):
        if rule.stacked:
            x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
        return hf_from_param(x, rule).astype(_DTYPES[dtype])

    if mesh is not None:
        return jax.jit(slice_layer, out_shardings=NamedSharding(mesh, P()))
    return jax.jit(slice_layer)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_shards[0].data)   # replicated: every host holds it all


def _check_params(params: Mapping, config: ModelConfig) -> None:
    abstract = abstract_params(config)
    expected = {path: tuple(_get(abstract, path).value.shape)
                for path in (r.path for r in PARAM_RULES)}
    found = set(_tree_paths(params))
    unexpected = sorted("/".join(p) for p in found - set(expected))
    if unexpected:
        raise ValueError(f"params have parameter(s) the language tower does not: {unexpected}")
    for path, shape in expected.items():
        if path not in found:
            raise ValueError(f"params lack {'/'.join(path)} (expected shape {list(shape)})")
        leaf = _get(params, path)
        if tuple(leaf.shape) != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {list(leaf.shape)}, but the "
                             f"config implies {list(shape)}")


def export_hf(params: Mapping, config: ModelConfig, out_dir: str, *, naming: str = "llada",
              dtype: str = "bfloat16", max_shard_bytes: int = 2 * 1024 ** 3,
              tokenizer_dir: str | None = None, code_dir: str | None = None,
              overwrite: bool = False) -> ExportSummary:
    """Writes params as a Hugging Face checkpoint directory in the released layout.

    naming "llada" (``model.transformer.*``, OLMo-style config.json) or "llama"
    (``model.layers.*``, Llama-style config.json); weights ``[out, in]`` in `dtype`; safetensors
    shards of at most `max_shard_bytes` plus ``model.safetensors.index.json``,
    ``generation_config.json``, the tokenizer files of `tokenizer_dir` and the ``*.py`` remote
    code files of `code_dir` (``configuration_llada.py`` / ``modeling_llada.py``) when given.
    Everything is written into ``OUT.tmp-XXXX`` and renamed to `out_dir` at the end; on error
    (a full disk included) the temporary directory is removed, so a directory named `out_dir`
    is always complete. An existing non-empty `out_dir` is replaced only with `overwrite` and
    only when it is a previous export (`check_replaceable`); the 'llada' layout refuses a
    head_dim other than d_model / n_heads (`check_exportable`). Both checks run before anything
    is written. Each shard records the CRC-32 of its tensors, which import verifies.
    In a multi-process run every process must call this; process 0 writes.
    """
    _check_naming(naming)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, found {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive number, found {max_shard_bytes}")
    params = nn.unbox(dict(params))
    if set(params) == {"params"}:
        params = params["params"]
    _check_params(params, config)
    check_exportable(config, naming)
    out_dir = os.path.abspath(out_dir)
    check_replaceable(out_dir, overwrite)
    for source in (tokenizer_dir, code_dir):
        if source is not None and not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: no such directory")
    target = _DTYPES[dtype]

    entries = []   # (key, shape, producer) in file order: wte, layer by layer, ln_f, lm_head

    def producer(rule: TensorRule, layer: int | None) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            param = _get(params, rule.path)
            if not isinstance(param, jax.Array):
                param = jnp.asarray(param)
            sharding = param.sharding
            mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
            return _to_host(_host_slice_fn(rule, dtype, mesh)(param, jnp.int32(layer or 0)))
        return produce

    # File order: embedding, then layer by layer (a shard holds whole layers), norm, LM head.
    order = [(_WTE_RULE, None)]
    order += [(r, i) for i in range(config.n_layers) for r in PARAM_RULES if r.stacked]
    order += [(r, None) for r in PARAM_RULES if not r.stacked and r is not _WTE_RULE]
    for rule, layer in order:
        shape, _ = _hf_shape(rule, config)
        entries.append((rule.key(naming, layer), shape, producer(rule, layer)))
    sizes = [(key, math.prod(shape) * target.itemsize) for key, shape, _ in entries]
    shards = _plan_shards(sizes, max_shard_bytes)
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]

    writer = jax.process_index() == 0
    parent = os.path.dirname(out_dir)
    if writer:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent) \
        if writer else None
    try:
        weight_map = {}
        for name, members in zip(names, shards, strict=True):
            tensors = [(entries[n][0], target, entries[n][1], entries[n][2]) for n in members]
            write_safetensors(os.path.join(tmp, name) if writer else None, tensors,
                              {"format": "pt"})
            weight_map.update({entries[n][0]: name for n in members})
        total = sum(size for _, size in sizes)
        if writer:
            _write_json(os.path.join(tmp, INDEX_FILE),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
            _write_json(os.path.join(tmp, "config.json"), hf_config_dict(config, naming, dtype))
            _write_json(os.path.join(tmp, "generation_config.json"),
                        {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                         "eos_token_id": config.eos_token_id,
                         "pad_token_id": config.pad_token_id})
            if tokenizer_dir is not None:
                copied = [f for f in TOKENIZER_FILES
                          if os.path.isfile(os.path.join(tokenizer_dir, f))]
                if not copied:
                    raise FileNotFoundError(f"{tokenizer_dir}: none of the tokenizer files "
                                            f"{TOKENIZER_FILES} found")
                for f in copied:
                    shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
            if code_dir is not None:
                for f in sorted(os.listdir(code_dir)):
                    if f.endswith(".py"):
                        shutil.copy2(os.path.join(code_dir, f), os.path.join(tmp, f))
            replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(out_dir, len(entries), total, len(shards))


def check_exportable(config: ModelConfig, naming: str) -> None:
    """Refuses, before anything is written, a model the `naming` layout's config cannot express
    (special token ids outside the vocabulary, or head_dim below).

    The released LLaDA config.json (OLMo style) has no head_dim: its model class builds q_proj
    as [d_model, d_model] and splits heads as d_model / n_heads, so another head_dim would
    write a checkpoint that neither that class nor our importer can load. The Llama-style
    config.json carries `head_dim` (our importer and transformers' Llama-family configs read
    it; LLaDA-V's own modeling code requires d_model / n_heads as well).
    """
    _check_naming(naming)
    for field in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, field)
        if not 0 <= value < config.vocab_size:
            raise ValueError(f"cannot export {field}={value}: outside the vocabulary [0, "
                             f"{config.vocab_size}), so the checkpoint could not be loaded back")
    if naming == "llada" and config.n_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"cannot export head_dim={config.head_dim} with n_heads={config.n_heads} and "
            f"d_model={config.d_model} in the 'llada' layout: its config.json has no head_dim "
            f"(the released model class uses d_model / n_heads = "
            f"{config.d_model / config.n_heads:g}); use --naming=llama, whose config.json "
            f"records head_dim")


# What an export writes into its directory; `--overwrite` replaces a directory only when it
# holds nothing else (a previous export), never unrelated files.
_EXPORT_FILE_PATTERNS = ("model-*.safetensors", SINGLE_FILE, INDEX_FILE, "config.json",
                         "generation_config.json", *TOKENIZER_FILES, "*.py")


def _is_export_file(directory: str, name: str) -> bool:
    return os.path.isfile(os.path.join(directory, name)) and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in _EXPORT_FILE_PATTERNS)


def check_replaceable(out_dir: str, overwrite: bool) -> None:
    """Refuses an `out_dir` an export must not replace, before anything is written.

    A missing or empty directory is fine. A non-empty one needs `overwrite` and must be a
    previous export: config.json, safetensors weights, and only files an export writes.
    """
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite / overwrite=True to "
                              f"replace a previous export)")
    unrelated = [e for e in entries if not _is_export_file(out_dir, e)]
    is_export = "config.json" in entries and (INDEX_FILE in entries or SINGLE_FILE in entries)
    if unrelated or not is_export:
        why = (f"it holds files an export does not write: {_some(unrelated)}" if unrelated
               else "it has no config.json and safetensors index")
        raise FileExistsError(f"refusing to overwrite {out_dir}: it is not a previous export "
                              f"({why}); choose another output directory")


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` to `out_dir` (rename is atomic within one filesystem).

    An existing `out_dir` was checked by `check_replaceable` (empty, or a previous export): it
    is moved aside, the new directory renamed in, and only then the old one deleted.
    """
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-",
                           dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
