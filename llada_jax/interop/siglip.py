"""SigLIP / SigLIP2 vision tower weights: Hugging Face layout <-> `VisionEncoder` params.

Conversion is a mapping table plus a few array transforms (transpose a Linear, split heads,
reorder a conv kernel, stack layers), so the table is the documentation of the layout:

* Hugging Face `SiglipVisionModel` (the fixed-resolution SigLIP2 checkpoints such as
  `google/siglip2-so400m-patch14-384` are `model_type: siglip`, same names as SigLIP). Key names
  relative to the vision prefix: `embeddings.patch_embedding.{weight,bias}`,
  `embeddings.position_embedding.weight`, `encoder.layers.{i}.{layer_norm1,layer_norm2}`,
  `encoder.layers.{i}.self_attn.{q,k,v,out}_proj`, `encoder.layers.{i}.mlp.{fc1,fc2}`,
  `post_layernorm`, and the pooling head `head.*` (never used here). The prefix is
  `vision_model.` in the hub's full `SiglipModel` checkpoints, nothing in transformers 5's own
  `SiglipVisionModel.state_dict()`, and `model.vision_tower.vision_tower.vision_model.` in
  LLaDA-V checkpoints.
* LLaDA-V checkpoints keep 26 of the 27 layers and no head (see `interop.llada_v`).

Import takes a mapping of names to numpy arrays and returns a nested dict of numpy arrays shaped
like `VisionEncoder`'s (unboxed) params; export is the inverse. Both run the in-memory table
engine of `interop.mapping` (`import_tensors` / `export_tensors`), as LLaDA-V's projector table
does (`interop.llada_v`); expected shapes follow from the module's own abstract params.
Tensors the config does not use by design (the pooling head, the post-layernorm when
`use_post_layernorm` is off, encoder layers past `num_layers_used`) are skipped; anything else
that does not fit is a `ValueError` naming the tensor and the expected and found shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.interop.mapping import (
    TableRow,
    export_tensors,
    get,
    import_tensors,
    listing,
    table_names,
)
from llada_jax.model.vision import VisionConfig, VisionEncoder, validate_vision

LLADA_V_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
HF_SIGLIP_VISION_PREFIX = "vision_model."
# Tried in this order when no prefix is given.
_CANDIDATE_PREFIXES = (LLADA_V_VISION_PREFIX, HF_SIGLIP_VISION_PREFIX, "")
_PROBE = "embeddings.patch_embedding.weight"

Params = dict[str, Any]

# --- the mapping table ---------------------------------------------------------------------------
_EMBEDDINGS = (
    ("embeddings.patch_embedding.weight", ("embeddings", "kernel"), "conv"),
    ("embeddings.patch_embedding.bias", ("embeddings", "bias"), None),
    ("embeddings.position_embedding.weight", ("embeddings", "position_embedding"), None),
)
# Relative to `encoder.layers.{i}.`; stacked along a leading axis under params["layers"].
_LAYER = (
    ("layer_norm1.weight", ("layer_norm1", "scale"), None),
    ("layer_norm1.bias", ("layer_norm1", "bias"), None),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), 1),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), "flat"),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), 1),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), "flat"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), 1),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), "flat"),
    ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), 2),
    ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), None),
    ("layer_norm2.weight", ("layer_norm2", "scale"), None),
    ("layer_norm2.bias", ("layer_norm2", "bias"), None),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), 1),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), None),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), 1),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), None),
)
_POST_LAYERNORM = (
    ("post_layernorm.weight", ("post_layernorm", "scale"), None),
    ("post_layernorm.bias", ("post_layernorm", "bias"), None),
)


def _table(use_post_layernorm: bool) -> tuple[TableRow, ...]:
    """The tower's rows in file order: embeddings, post-layernorm (if used), the layers."""
    return (*_EMBEDDINGS, *(_POST_LAYERNORM if use_post_layernorm else ()),
            *((f"encoder.layers.{{i}}.{rel}", ("layers", *path), kind)
              for rel, path, kind in _LAYER))


# --- vision tower -------------------------------------------------------------------------------
def detect_vision_prefix(names: Iterable[str]) -> str:
    """The prefix under which a checkpoint keeps its SigLIP vision tower."""
    names = set(names)
    for prefix in _CANDIDATE_PREFIXES:
        if prefix + _PROBE in names:
            return prefix
    tried = ", ".join(repr(p + _PROBE) for p in _CANDIDATE_PREFIXES)
    raise ValueError(f"no SigLIP vision tower found: none of {tried} is in the checkpoint; "
                     "pass prefix= explicitly")


def import_vision(tensors: Mapping[str, Any], cfg: VisionConfig, prefix: str | None = None,
                  dtype: str | None = None) -> Params:
    """Hugging Face SigLIP vision tensors -> `VisionEncoder` params (nested dict of numpy arrays).

    tensors: name -> array (numpy, or anything `np.asarray` accepts). prefix: where the tower
    lives (`None`: detected; see `detect_vision_prefix`). dtype: of the returned arrays
    (default `cfg.param_dtype`). Raises ValueError for missing or unexpected tensors and for
    shape mismatches, naming the tensor.
    """
    validate_vision(cfg)
    if prefix is None:
        prefix = detect_vision_prefix(tensors.keys())
    # Every name of the full tower is known (those the config skips by design: the layers past
    # num_layers_used, the post-layernorm when unused), and so is the pooling head `head.*`.
    # Names outside `prefix` are not ours (a LLaDA-V checkpoint also holds the language model).
    known = table_names(_table(True), prefix, cfg.n_layers)
    unexpected = [name for name in tensors if name.startswith(prefix) and name not in known
                  and not name[len(prefix):].startswith("head.")]
    if unexpected:
        raise ValueError(f"unexpected tensor(s) under prefix {prefix!r} for a {cfg.n_layers}-layer "
                         f"SigLIP vision tower: {listing(unexpected)}")
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    abstract = jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0), pixels)["params"]
    return import_tensors(tensors, _table(cfg.use_post_layernorm), abstract, prefix,
                          dtype or cfg.param_dtype,
                          f"tensor(s) for the vision tower (prefix {prefix!r}, "
                          f"{cfg.num_layers_used} layers used)")


def export_vision(params: Mapping[str, Any], cfg: VisionConfig,
                  prefix: str = HF_SIGLIP_VISION_PREFIX, dtype: str | None = None
                  ) -> dict[str, np.ndarray]:
    """`VisionEncoder` params -> Hugging Face names (the inverse of `import_vision`).

    Only what the params hold is written: `num_layers_used` layers, and the post-layernorm when
    the config has one. dtype: of the returned arrays (default: that of the params).
    """
    validate_vision(cfg)
    table = _table(cfg.use_post_layernorm)
    for rel, path, _ in table:
        found = len(get(params, path))
        if "{i}" in rel and found != cfg.num_layers_used:
            raise ValueError(f"params {'/'.join(path)}: expected {cfg.num_layers_used} stacked "
                             f"layers, found {found}")
    return export_tensors(params, table, prefix, dtype)
