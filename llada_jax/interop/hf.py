"""Hugging Face checkpoints of the language tower <-> llada_jax params: the entry points.

`import_hf` / `export_hf` / `inspect_hf_checkpoint` find the model family of a checkpoint (one
table file each: `interop/llada.py` for LLaDA-8B, iLLaDA and LLaDA-V's Llama-named tower,
`interop/llada_moe.py` for LLaDA-MoE, `interop/llada2.py` for LLaDA2.x) and run
the generic streamed conversion of `interop.mapping` over its table, with the file handling of
`interop.safetensors_io`. Adding a family means adding its table file to `FAMILIES`.

Import reads one tensor at a time and fills one stacked host buffer per parameter, which goes
straight onto its target sharding, so host memory peaks at about one stacked parameter; every
tensor is checked as it streams (size, CRC-32 of our exports, finiteness). Export pulls one
layer slice at a time off the devices into shard files written into ``DIR.tmp-XXXX`` and renamed
into place only once complete; what the target layout cannot express, or a directory it must not
replace, is refused before anything is written.

This module knows nothing about training checkpoints (`llada_jax.train.checkpoint`) or tokenizers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax

from llada_jax.config import ModelConfig
from llada_jax.interop import llada, llada2, llada_moe, mapping
from llada_jax.interop import safetensors_io as io
from llada_jax.interop.safetensors_io import INDEX_FILE, list_tensors  # noqa: F401 (re-exported)

# Model families, most specific first: the first whose `matches(config.json)` holds reads it.
FAMILIES: tuple[ModuleType, ...] = (llada_moe, llada2, llada)
NAMINGS = tuple(naming for family in FAMILIES for naming in family.LAYOUTS)
# Buffers some PyTorch checkpoints carry that are not parameters (recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_naming(config: ModelConfig) -> str:
    """The layout a model is released in: LLaDA2 for the sigmoid router, LLaDA-MoE for the
    softmax one, the released LLaDA layout for a dense model."""
    if config.is_moe:
        return "llada2" if config.router == "sigmoid_grouped" else "llada_moe"
    return "llada"


def family_of(naming: str) -> ModuleType:
    for family in FAMILIES:
        if naming in family.LAYOUTS:
            return family
    raise ValueError(f"naming: expected one of {NAMINGS}, found {naming!r}")


def family_of_config(hf_config: Mapping) -> ModuleType:
    """The family whose table reads this config.json (LLaDA, the last, reads any other)."""
    return next(family for family in FAMILIES if family.matches(hf_config))


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A validated Hugging Face checkpoint directory: config, layout and tensor headers."""

    naming: str
    hf_config: dict
    config: ModelConfig
    tied_embeddings: bool
    tensors: dict[str, io.StoredTensor]

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tensors.values())


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
    hf_config = io.read_json(config_path)
    generation_path = os.path.join(hf_dir, "generation_config.json")
    generation = io.read_json(generation_path) if os.path.isfile(generation_path) else None
    family = family_of_config(hf_config)
    config = family.model_config_from_hf(hf_config, generation, overrides, source=config_path)
    tensors = {k: t for k, t in list_tensors(hf_dir).items()
               if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(tuple(skip_prefixes))}
    naming = family.naming_of(hf_config, list(tensors), hf_dir)
    tied = family.tied(hf_config)
    problems = mapping.check_tensors(tensors, family.LAYOUTS[naming], config, tied, naming)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8
                                else [])
        raise ValueError(f"{hf_dir} does not match its config.json:\n  - " + "\n  - ".join(shown))
    return HFCheckpoint(naming, hf_config, config, tied, tensors)


def import_hf(hf_dir: str, *, mesh: jax.sharding.Mesh | None = None,
              rules: Sequence | None = None, param_dtype: str | None = None,
              overrides: Mapping[str, Any] | None = None,
              skip_prefixes: Sequence[str] = ()) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face checkpoint directory as (ModelConfig, params).

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
    if param_dtype not in io.DTYPES:
        raise ValueError(f"param_dtype: expected one of {sorted(io.DTYPES)} or None, found "
                         f"{param_dtype!r}")
    config = dataclasses.replace(checkpoint.config, param_dtype=param_dtype)
    layout = family_of(checkpoint.naming).LAYOUTS[checkpoint.naming]
    return config, mapping.load_params(hf_dir, checkpoint.tensors, layout, config, mesh, rules)


def check_exportable(config: ModelConfig, naming: str) -> None:
    """Refuses, before anything is written, a model the `naming` layout cannot express: special
    token ids outside the vocabulary, or what the family's config.json lacks."""
    family = family_of(naming)
    for field in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, field)
        if not 0 <= value < config.vocab_size:
            raise ValueError(f"cannot export {field}={value}: outside the vocabulary [0, "
                             f"{config.vocab_size}), so the checkpoint could not be loaded back")
    family.check_exportable(config, naming)


def export_plan(params: Mapping, config: ModelConfig, naming: str, dtype: str
                ) -> tuple[list, dict[str, Any]]:
    """(planned tensors in file order, {config.json, generation_config.json}) of an export,
    after every check that needs no file (see `export_hf`)."""
    family = family_of(naming)
    if dtype not in io.DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(io.DTYPES)}, found {dtype!r}")
    params = nn.unbox(dict(params))
    if set(params) == {"params"}:
        params = params["params"]
    mapping.check_params(params, config)
    check_exportable(config, naming)
    tensors = mapping.planned_tensors(params, family.LAYOUTS[naming], config, dtype)
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    return tensors, {"config.json": family.hf_config_dict(config, naming, dtype),
                     "generation_config.json": generation}


def export_hf(params: Mapping, config: ModelConfig, out_dir: str, *, naming: str = "llada",
              dtype: str = "bfloat16", max_shard_bytes: int = 2 * 1024 ** 3,
              tokenizer_dir: str | None = None, code_dir: str | None = None,
              overwrite: bool = False) -> io.ExportSummary:
    """Writes params as a Hugging Face checkpoint directory in the `naming` layout.

    naming "llada" (``model.transformer.*``, OLMo-style config.json) or "llama"
    (``model.layers.*``, Llama-style config.json); weights ``[out, in]`` in `dtype`; safetensors
    shards of at most `max_shard_bytes` plus ``model.safetensors.index.json``,
    ``generation_config.json``, the tokenizer files of `tokenizer_dir` and the ``*.py`` remote
    code files of `code_dir` (``configuration_llada.py`` / ``modeling_llada.py``) when given.
    Written by `safetensors_io.write_export`: staged, renamed into place when complete; an
    existing non-empty `out_dir` is replaced only with `overwrite` and only when it is a previous
    export. What the layout cannot express is refused first (`check_exportable`). Each shard
    records the CRC-32 of its tensors, which import verifies.
    In a multi-process run every process must call this; process 0 writes.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive number, found {max_shard_bytes}")
    tensors, json_files = export_plan(params, config, naming, dtype)
    return io.write_export(out_dir, io.plan_shards(tensors, max_shard_bytes), json_files,
                           tokenizer_dir=tokenizer_dir, code_dir=code_dir, overwrite=overwrite)
