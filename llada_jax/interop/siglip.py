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
like `VisionEncoder`'s (unboxed) params; export is the inverse. Tensors the config does not use
by design (the pooling head, the post-layernorm when `use_post_layernorm` is off, encoder layers
past `num_layers_used`) are skipped; anything else that does not fit is a `ValueError` naming the
tensor and the expected and found shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from llada_jax.interop.mapping import get, put
from llada_jax.interop.safetensors_io import DTYPES
from llada_jax.model.vision import VisionConfig, validate_vision

LLADA_V_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
HF_SIGLIP_VISION_PREFIX = "vision_model."
# Tried in this order when no prefix is given.
_CANDIDATE_PREFIXES = (LLADA_V_VISION_PREFIX, HF_SIGLIP_VISION_PREFIX, "")
_PROBE = "embeddings.patch_embedding.weight"

Params = dict[str, Any]

# --- the mapping tables --------------------------------------------------------------------------
# (Hugging Face name relative to the prefix, path in our params, transform kind)
_EMBEDDINGS = (
    ("embeddings.patch_embedding.weight", ("embeddings", "kernel"), "conv"),
    ("embeddings.patch_embedding.bias", ("embeddings", "bias"), "copy"),
    ("embeddings.position_embedding.weight", ("embeddings", "position_embedding"), "copy"),
)
# Relative to `encoder.layers.{i}.`; stacked along a leading axis under params["layers"].
_LAYER = (
    ("layer_norm1.weight", ("layer_norm1", "scale"), "copy"),
    ("layer_norm1.bias", ("layer_norm1", "bias"), "copy"),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "heads_in"),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), "heads_bias"),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "heads_in"),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), "heads_bias"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "heads_in"),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), "heads_bias"),
    ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), "heads_out"),
    ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), "copy"),
    ("layer_norm2.weight", ("layer_norm2", "scale"), "copy"),
    ("layer_norm2.bias", ("layer_norm2", "bias"), "copy"),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy"),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy"),
)
_POST_LAYERNORM = (
    ("post_layernorm.weight", ("post_layernorm", "scale"), "copy"),
    ("post_layernorm.bias", ("post_layernorm", "bias"), "copy"),
)
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _hf_shape(name: str, cfg: VisionConfig) -> tuple[int, ...]:
    """Shape of a Hugging Face tensor (name relative to the prefix, layer part stripped)."""
    w, m, p, c = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.num_channels
    table = {
        "embeddings.patch_embedding.weight": (w, c, p, p),
        "embeddings.patch_embedding.bias": (w,),
        "embeddings.position_embedding.weight": (cfg.num_patches, w),
        "mlp.fc1.weight": (m, w),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (w, m),
    }
    if name in table:
        return table[name]
    if name.endswith(".weight") and "_proj" in name:
        return (w, w)
    return (w,)   # layer norms and the remaining biases


def _to_params(kind: str, t: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    h, hd, w = cfg.n_heads, cfg.head_dim, cfg.width
    if kind == "copy":
        return t
    if kind == "conv":          # torch OIHW [width, C, p, p] -> [p, p, C, width]
        return t.transpose(2, 3, 1, 0)
    if kind == "linear":        # torch [out, in] -> [in, out]
        return t.T
    if kind == "heads_in":      # [heads*hd, width] -> [width, heads, hd] (head-major split)
        return t.T.reshape(w, h, hd)
    if kind == "heads_bias":
        return t.reshape(h, hd)
    if kind == "heads_out":     # [width, heads*hd] -> [heads, hd, width]
        return t.T.reshape(h, hd, w)
    raise AssertionError(kind)


def _to_hf(kind: str, a: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    w = cfg.width
    if kind == "copy":
        return a
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "linear":
        return a.T
    if kind == "heads_in":
        return a.reshape(w, w).T
    if kind == "heads_bias":
        return a.reshape(w)
    if kind == "heads_out":
        return a.reshape(w, w).T
    raise AssertionError(kind)


def shape_error(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> ValueError:
    return ValueError(f"tensor {name}: expected shape {expected} (Hugging Face layout), "
                      f"found {found}")


def listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    used, skipped, unexpected = [], [], []
    wanted = {prefix + n for n, _, _ in _EMBEDDINGS}
    post = {prefix + n for n, _, _ in _POST_LAYERNORM}
    layer_names = {n for n, _, _ in _LAYER}
    for name in names:
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix):]
        match = _LAYER_KEY.match(rel)
        if name in wanted:
            used.append(name)
        elif name in post:
            (used if cfg.use_post_layernorm else skipped).append(name)
        elif rel.startswith("head."):
            skipped.append(name)
        elif match and match.group(2) in layer_names:
            i = int(match.group(1))
            if i < cfg.num_layers_used:
                used.append(name)
            elif i < cfg.n_layers:
                skipped.append(name)
            else:
                unexpected.append(name)
        else:
            unexpected.append(name)
    return used, skipped, unexpected


# --- vision tower -------------------------------------------------------------------------------
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
    out_dtype = DTYPES[dtype or cfg.param_dtype]
    _, _, unexpected = split_vision_keys(tensors.keys(), cfg, prefix)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) under prefix {prefix!r} for a {cfg.n_layers}-layer "
                         f"SigLIP vision tower: {listing(unexpected)}")

    missing: list[str] = []

    def fetch(rel: str, shape_name: str) -> np.ndarray | None:
        name = prefix + rel
        if name not in tensors:
            missing.append(name)
            return None
        t = np.asarray(tensors[name])
        expected = _hf_shape(shape_name, cfg)
        if tuple(t.shape) != expected:
            raise shape_error(name, expected, tuple(t.shape))
        return t

    params: Params = {}
    for rel, path, kind in _EMBEDDINGS + (_POST_LAYERNORM if cfg.use_post_layernorm else ()):
        t = fetch(rel, rel)
        if t is not None:
            put(params, path, _to_params(kind, t, cfg).astype(out_dtype))
    for rel, path, kind in _LAYER:
        per_layer = [fetch(f"encoder.layers.{i}.{rel}", rel) for i in range(cfg.num_layers_used)]
        if all(t is not None for t in per_layer):
            stacked = np.stack([_to_params(kind, t, cfg).astype(out_dtype) for t in per_layer])
            put(params, ("layers", *path), stacked)
    if missing:
        raise ValueError(f"missing tensor(s) for the vision tower (prefix {prefix!r}, "
                         f"{cfg.num_layers_used} layers used): {listing(missing)}")
    return params


def export_vision(params: Mapping[str, Any], cfg: VisionConfig,
                  prefix: str = HF_SIGLIP_VISION_PREFIX, dtype: str | None = None
                  ) -> dict[str, np.ndarray]:
    """`VisionEncoder` params -> Hugging Face names (the inverse of `import_vision`).

    Only what the params hold is written: `num_layers_used` layers, and the post-layernorm when
    the config has one. dtype: of the returned arrays (default: that of the params).
    """
    validate_vision(cfg)
    out_dtype = None if dtype is None else DTYPES[dtype]
    out: dict[str, np.ndarray] = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = array if out_dtype is None else array.astype(out_dtype)

    for rel, path, kind in _EMBEDDINGS + (_POST_LAYERNORM if cfg.use_post_layernorm else ()):
        put(prefix + rel, _to_hf(kind, np.asarray(get(params, path)), cfg))
    for rel, path, kind in _LAYER:
        stacked = np.asarray(get(params, ("layers", *path)))
        if stacked.shape[0] != cfg.num_layers_used:
            raise ValueError(f"params layers/{'/'.join(path)}: expected {cfg.num_layers_used} "
                             f"stacked layers, found {stacked.shape[0]}")
        for i in range(cfg.num_layers_used):
            put(f"{prefix}encoder.layers.{i}.{rel}", _to_hf(kind, stacked[i], cfg))
    return out


