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
engine of this module (`import_tensors` / `export_tensors`), which LLaDA-V's projector table
(`interop.llada_v`) shares; expected shapes follow from the module's own abstract params.
Tensors the config does not use by design (the pooling head, the post-layernorm when
`use_post_layernorm` is off, encoder layers past `num_layers_used`) are skipped; anything else
that does not fit is a `ValueError` naming the tensor and the expected and found shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.interop.mapping import get, put
from llada_jax.interop.safetensors_io import DTYPES
from llada_jax.model.vision import VisionConfig, VisionEncoder, validate_vision

LLADA_V_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
HF_SIGLIP_VISION_PREFIX = "vision_model."
# Tried in this order when no prefix is given.
_CANDIDATE_PREFIXES = (LLADA_V_VISION_PREFIX, HF_SIGLIP_VISION_PREFIX, "")
_PROBE = "embeddings.patch_embedding.weight"

Params = dict[str, Any]
# One row of an in-memory table: (Hugging Face name relative to the prefix, path in our params,
# kind). A name with ``{i}`` is one tensor per layer of a param stacked on a leading axis.
# kind: how many leading dims of our kernel are inputs of the PyTorch Linear ``[out, in]``
# (heads split head-major), None: stored as is, "flat": our [heads, head_dim] is one HF vector,
# "conv": our [p, p, C, width] is the PyTorch OIHW kernel [width, C, p, p].
TableRow = tuple[str, tuple[str, ...], int | str | None]

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


# --- the in-memory table engine ------------------------------------------------------------------
def _to_hf(a: Any, kind: int | str | None) -> Any:
    """Our (per-layer) param slice -> the HF tensor (numpy or jax alike)."""
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "flat":
        return a.reshape(-1)
    return a if kind is None else a.reshape(math.prod(a.shape[:kind]), -1).T


def _from_hf(t: np.ndarray, kind: int | str | None, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor -> our param slice of `shape` (the inverse of `_to_hf`)."""
    if kind == "conv":
        return t.transpose(2, 3, 1, 0)
    return (t if kind in (None, "flat") else t.T).reshape(shape)


def shape_error(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> ValueError:
    return ValueError(f"tensor {name}: expected shape {expected} (Hugging Face layout), "
                      f"found {found}")


def listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def import_tensors(tensors: Mapping[str, Any], table: Sequence[TableRow], abstract: Mapping,
                   prefix: str, dtype: str, missing_what: str) -> Params:
    """HF tensors (name -> array) -> our params by `table`, shaped like the (unboxed) abstract
    params `abstract`, in `dtype`. A wrong shape is a ValueError naming the tensor; missing
    tensors are one ValueError "missing {missing_what}: names"."""
    params: Params = {}
    missing: list[str] = []
    for rel, path, kind in table:
        shape = tuple(get(abstract, path).shape)
        slice_shape = shape[1:] if "{i}" in rel else shape
        expected = jax.eval_shape(lambda a, kind=kind: _to_hf(a, kind),
                                  jax.ShapeDtypeStruct(slice_shape, jnp.float32)).shape
        slices = []
        for i in range(shape[0]) if "{i}" in rel else [0]:
            name = prefix + rel.format(i=i)
            if name not in tensors:
                missing.append(name)
                continue
            t = np.asarray(tensors[name])
            if tuple(t.shape) != expected:
                raise shape_error(name, expected, tuple(t.shape))
            slices.append(_from_hf(t, kind, slice_shape).astype(DTYPES[dtype]))
        if slices and "{i}" in rel:
            put(params, path, np.stack(slices))
        elif slices:
            put(params, path, slices[0])
    if missing:
        raise ValueError(f"missing {missing_what}: {listing(missing)}")
    return params


def export_tensors(params: Mapping[str, Any], table: Sequence[TableRow], prefix: str,
                   dtype: str | None = None) -> dict[str, np.ndarray]:
    """Our params -> HF name -> array by `table` (the inverse of `import_tensors`), in table
    order, layer by layer within a row; dtype: of the arrays (default: that of the params)."""
    out = {}
    for rel, path, kind in table:
        param = np.asarray(get(params, path))
        for i, a in enumerate(param) if "{i}" in rel else [(0, param)]:
            hf = _to_hf(a, kind)
            out[prefix + rel.format(i=i)] = hf if dtype is None else hf.astype(DTYPES[dtype])
    return out


def _names(table: Sequence[TableRow], prefix: str, layers: int) -> set[str]:
    return {prefix + rel.format(i=i) for rel, _, _ in table
            for i in (range(layers) if "{i}" in rel else [0])}


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


def split_vision_keys(names: Iterable[str], cfg: VisionConfig,
                      prefix: str) -> tuple[list[str], list[str], list[str]]:
    """Sorts the names under `prefix` into (used, skipped by design, unexpected).

    Skipped by design: the attention-pooling head, the post-layernorm when the config does not
    use it, and encoder layers in [num_layers_used, n_layers). Names outside `prefix` are not
    returned at all (a LLaDA-V checkpoint also holds the language model).
    """
    used_names = _names(_table(cfg.use_post_layernorm), prefix, cfg.num_layers_used)
    known = _names(_table(True), prefix, cfg.n_layers)
    used, skipped, unexpected = [], [], []
    for name in names:
        if not name.startswith(prefix):
            continue
        if name in used_names:
            used.append(name)
        elif name in known or name[len(prefix):].startswith("head."):
            skipped.append(name)
        else:
            unexpected.append(name)
    return used, skipped, unexpected


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
    _, _, unexpected = split_vision_keys(tensors.keys(), cfg, prefix)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) under prefix {prefix!r} for a {cfg.n_layers}-layer "
                         f"SigLIP vision tower: {listing(unexpected)}")
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    abstract = jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0), pixels)["params"]
    return import_tensors(tensors, _table(cfg.use_post_layernorm), nn.unbox(abstract), prefix,
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
