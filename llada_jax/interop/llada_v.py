"""LLaDA-V checkpoints: the Llama-named language tower, the SigLIP vision tower and the projector.

A composition of `interop.llada` (the ``llama`` layout of the language tower) and
`interop.siglip` (the vision tower under `LLADA_V_VISION_PREFIX`), plus the projector table.

The reference code (LLaVA-NeXT's layout, `train/llava/model/...` of ML-GSAI/LLaDA-V)
builds `LlavaLLaDAModelLM.model = LlavaLLaDAModel`, whose `LlavaMetaModel` holds
`vision_tower = SigLipVisionTower` (`multimodal_encoder/siglip_encoder.py`), whose
`vision_tower = SigLipVisionModel`, whose `vision_model = SigLipVisionTransformer`: hence
`model.vision_tower.vision_tower.vision_model.*`. That tower deletes its last encoder layer
(`del ...encoder.layers[-1:]`) and replaces the head by an identity, so a LLaDA-V checkpoint
holds 26 layers, a post-layernorm it never uses, and no head. The projector is
`model.mm_projector = nn.Sequential(Linear, GELU, Linear)` (`mlp2x_gelu`, keys
`model.mm_projector.0.*` and `model.mm_projector.2.*`) and the newline vector is the parameter
`model.image_newline` ("unpad" patch merge). Checkpoint-reading code of other projects confirms
these names (e.g. converters reading `model.vision_tower.vision_tower.vision_model.post_layernorm`
and `model.mm_projector.0.weight`).

An export is written once (`safetensors_io.write_export`): the language shards, one more shard
`VISION_SHARD` for the vision side, one index, one config.json with the LLaVA fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.data.images import grid_resolutions
from llada_jax.interop import hf
from llada_jax.interop import safetensors_io as io
from llada_jax.interop.mapping import export_tensors, import_tensors
from llada_jax.interop.siglip import LLADA_V_VISION_PREFIX, Params, export_vision, import_vision
from llada_jax.model.multimodal import LLaDAV, Projector
from llada_jax.model.vision import VisionConfig, validate_vision

LLADA_V_PREFIX = "model."      # of `mm_projector.*` and `image_newline` in LLaDA-V checkpoints
# The projector (mlp2x_gelu) and newline: LLaDA-V name relative to `LLADA_V_PREFIX`, our path in
# the `Projector` params, kind (as in `mapping.TableRow`).
_PROJECTOR = (
    ("mm_projector.0.weight", ("linear_1", "kernel"), 1),
    ("mm_projector.0.bias", ("linear_1", "bias"), None),
    ("mm_projector.2.weight", ("linear_2", "kernel"), 1),
    ("mm_projector.2.bias", ("linear_2", "bias"), None),
    ("image_newline", ("image_newline",), None),
)


def import_projector(tensors: Mapping[str, Any], vision_width: int, d_model: int,
                     dtype: str = "float32") -> Params:
    """LLaDA-V `mm_projector` (mlp2x_gelu) and `image_newline` -> `Projector` params."""
    abstract = jax.eval_shape(Projector(d_model).init, jax.random.key(0),
                              jnp.zeros((1, vision_width)))["params"]
    return import_tensors(tensors, _PROJECTOR, abstract, LLADA_V_PREFIX, dtype,
                          "projector tensor(s)")


def export_projector(params: Mapping[str, Any], dtype: str | None = None) -> dict[str, np.ndarray]:
    """`Projector` params -> LLaDA-V names (the inverse of `import_projector`)."""
    return export_tensors(params, _PROJECTOR, LLADA_V_PREFIX, dtype)


def import_llada_v_multimodal(tensors: Mapping[str, Any], cfg: VisionConfig, d_model: int,
                              dtype: str | None = None) -> Params:
    """The vision side of a LLaDA-V checkpoint: {"vision_tower": ..., "projector": ...}."""
    return {
        "vision_tower": import_vision(tensors, cfg, LLADA_V_VISION_PREFIX, dtype),
        "projector": import_projector(tensors, cfg.width, d_model, dtype or cfg.param_dtype),
    }


def export_llada_v_multimodal(params: Mapping[str, Any], cfg: VisionConfig,
                              dtype: str | None = None) -> dict[str, np.ndarray]:
    """Inverse of `import_llada_v_multimodal`, with LLaDA-V's names."""
    return {**export_vision(params["vision_tower"], cfg, LLADA_V_VISION_PREFIX, dtype),
            **export_projector(params["projector"], dtype)}


# --- whole LLaDA-V checkpoints ------------------------------------------------------------------
# Tensors of a LLaDA-V checkpoint that are not the language tower.
LLADA_V_MULTIMODAL_PREFIXES = (LLADA_V_VISION_PREFIX, LLADA_V_PREFIX + "mm_projector.",
                               LLADA_V_PREFIX + "image_newline")
VISION_SHARD = "model-vision.safetensors"
# config.json field where our exports record the tower's architecture (LLaDA-V's own config only
# names the tower, `mm_vision_tower`; without this field the so400m/14 defaults are assumed).
VISION_CONFIG_FIELD = "llada_jax_vision_config"


def llada_v_config_fields(vision: VisionConfig, image_aspect_ratio: str = "anyres_max_4",
                          max_grid: int = 6) -> dict[str, Any]:
    """The LLaVA / LLaDA-V fields of config.json that describe the vision side."""
    return {
        "architectures": ["LlavaLLaDAModelLM"],
        "mm_vision_tower": "google/siglip2-so400m-patch14-384",
        "mm_hidden_size": vision.width,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": vision.feature_layer,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": image_aspect_ratio,
        # The AnyRes candidate canvases, in the order the reference expands them.
        "image_grid_pinpoints": [list(r) for r in grid_resolutions(vision.image_size, max_grid)],
        VISION_CONFIG_FIELD: {k: v for k, v in dataclasses.asdict(vision).items()
                              if k not in ("dtype", "param_dtype", "remat_policy")},
    }


def vision_config_from_hf(hf_config: Mapping[str, Any]) -> VisionConfig:
    """The VisionConfig of a LLaDA-V config.json: our recorded architecture if present, else
    SigLIP2 so400m/14 at 384 px with the checkpoint's `mm_vision_select_layer`."""
    fields = dict(hf_config.get(VISION_CONFIG_FIELD) or {})
    if not fields and "mm_vision_select_layer" in hf_config:
        fields["feature_layer"] = int(hf_config["mm_vision_select_layer"])
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(VisionConfig)})
    if unknown:
        raise ValueError(f"config.json {VISION_CONFIG_FIELD}: unknown field(s) {unknown}")
    cfg = VisionConfig(**fields)
    validate_vision(cfg)
    return cfg


def export_llada_v(params: Mapping[str, Any], model_cfg: ModelConfig, vision: VisionConfig,
                   out_dir: str | os.PathLike[str], *, dtype: str = "bfloat16",
                   image_aspect_ratio: str = "anyres_max_4", max_grid: int = 6,
                   tokenizer_dir: str | None = None, overwrite: bool = False) -> io.ExportSummary:
    """Writes `LLaDAV` params as one LLaDA-V Hugging Face checkpoint directory.

    The language tower in the Llama layout (`model.layers.*`, `lm_head`, shards of at most 2 GiB),
    the vision tower and projector (`model.vision_tower.vision_tower.vision_model.*`,
    `model.mm_projector.*`, `model.image_newline`) in one more shard, `VISION_SHARD`, listed in
    the same index; config.json gets the LLaVA fields (`llada_v_config_fields`). Staged and
    renamed into place when complete; an existing directory is replaced only under the rules
    of `safetensors_io.check_replaceable`.
    """
    missing = [k for k in ("vision_tower", "projector", "language_model") if k not in params]
    if missing:
        raise ValueError(f"params: expected LLaDAV params with vision_tower, projector and "
                         f"language_model, missing {missing}")
    io.check_replaceable(os.path.abspath(os.fspath(out_dir)), overwrite)   # refused first
    language, json_files = hf.export_plan(params["language_model"], model_cfg, "llama", dtype)
    json_files["config.json"].update(llada_v_config_fields(vision, image_aspect_ratio, max_grid))
    multimodal = [(name, t.dtype, t.shape, lambda t=t: t)   # host arrays (export_tensors)
                  for name, t in export_llada_v_multimodal(params, vision, dtype).items()]
    shards = [*io.plan_shards(language, 2 * 1024 ** 3), (VISION_SHARD, multimodal)]
    return io.write_export(os.fspath(out_dir), shards, json_files, tokenizer_dir=tokenizer_dir,
                           overwrite=overwrite)


def import_llada_v(hf_dir: str | os.PathLike[str], *, mesh: Any = None, rules: Any = None,
                   param_dtype: str | None = None, vision: VisionConfig | None = None
                   ) -> tuple[ModelConfig, VisionConfig, dict[str, Any]]:
    """A LLaDA-V Hugging Face checkpoint -> (ModelConfig, VisionConfig, `LLaDAV` params).

    The language tower streams in through `hf.import_hf` (its Llama names; the vision tensors
    are skipped there), the vision tower and projector through `import_llada_v_multimodal`
    (only their tensors are read). `vision`: the tower's architecture (default: from config.json,
    see `vision_config_from_hf`). Params are placed on `mesh` by the logical rules (default: the
    project's table), or on the first device without a mesh; `param_dtype` as in `import_hf`.
    """
    hf_dir = os.fspath(hf_dir)
    model_cfg, language = hf.import_hf(hf_dir, mesh=mesh, rules=rules, param_dtype=param_dtype,
                                       skip_prefixes=LLADA_V_MULTIMODAL_PREFIXES)
    hf_config = io.read_json(os.path.join(hf_dir, "config.json"))
    vision = vision_config_from_hf(hf_config) if vision is None else vision
    vision = dataclasses.replace(vision, param_dtype=model_cfg.param_dtype)
    with contextlib.closing(io.ShardReader(hf_dir)) as reader:
        tensors = {key: reader.read(key, stored.shard)
                   for key, stored in io.list_tensors(hf_dir).items()
                   if key.startswith(LLADA_V_MULTIMODAL_PREFIXES)}
    host = import_llada_v_multimodal(tensors, vision, model_cfg.d_model, model_cfg.param_dtype)

    # The same shardings LLaDAV's own init gives these params.
    boxed = jax.eval_shape(lambda r: LLaDAV(model_cfg, vision).init(
        r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.key(0))
    shardings = io.param_shardings(boxed, mesh, rules)
    # The tables gave every tensor the shape of the module's own params.
    params = {group: jax.tree.map(io.place, host[group], shardings[group])
              for group in ("vision_tower", "projector")}
    return model_cfg, vision, {"language_model": language, **params}
