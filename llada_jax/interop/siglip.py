"""SigLIP / SigLIP2 vision weights and the LLaDA-V projector: Hugging Face layout <-> params.

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
* LLaDA-V: the reference code (LLaVA-NeXT's layout, `train/llava/model/...` of ML-GSAI/LLaDA-V)
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

Import takes a mapping of names to numpy arrays (or a safetensors directory) and returns a nested
dict of numpy arrays shaped like `VisionEncoder`'s (unboxed) params; export is the inverse.
Tensors the config does not use by design (the pooling head, the post-layernorm when
`use_post_layernorm` is off, encoder layers past `num_layers_used`) are skipped; anything else that
does not fit is a `ValueError` naming the tensor and the expected and found shapes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from llada_jax.model.vision import VisionConfig, validate_vision

LLADA_V_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
HF_SIGLIP_VISION_PREFIX = "vision_model."
LLADA_V_PREFIX = "model."      # of `mm_projector.*` and `image_newline` in LLaDA-V checkpoints
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


# --- helpers ------------------------------------------------------------------------------------
def _np_dtype(name: str | None) -> Any:
    if name is None:
        return None
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _shape_error(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> ValueError:
    return ValueError(f"tensor {name}: expected shape {expected} (Hugging Face layout), "
                      f"found {found}")


def _listing(names: Iterable[str], limit: int = 12) -> str:
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
    out_dtype = _np_dtype(dtype or cfg.param_dtype)
    _, _, unexpected = split_vision_keys(tensors.keys(), cfg, prefix)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) under prefix {prefix!r} for a {cfg.n_layers}-layer "
                         f"SigLIP vision tower: {_listing(unexpected)}")

    missing: list[str] = []

    def fetch(rel: str, shape_name: str) -> np.ndarray | None:
        name = prefix + rel
        if name not in tensors:
            missing.append(name)
            return None
        t = np.asarray(tensors[name])
        expected = _hf_shape(shape_name, cfg)
        if tuple(t.shape) != expected:
            raise _shape_error(name, expected, tuple(t.shape))
        return t

    params: Params = {}
    for rel, path, kind in _EMBEDDINGS + (_POST_LAYERNORM if cfg.use_post_layernorm else ()):
        t = fetch(rel, rel)
        if t is not None:
            _set(params, path, _to_params(kind, t, cfg).astype(out_dtype))
    for rel, path, kind in _LAYER:
        per_layer = [fetch(f"encoder.layers.{i}.{rel}", rel) for i in range(cfg.num_layers_used)]
        if all(t is not None for t in per_layer):
            stacked = np.stack([_to_params(kind, t, cfg).astype(out_dtype) for t in per_layer])
            _set(params, ("layers",) + path, stacked)
    if missing:
        raise ValueError(f"missing tensor(s) for the vision tower (prefix {prefix!r}, "
                         f"{cfg.num_layers_used} layers used): {_listing(missing)}")
    return params


def export_vision(params: Mapping[str, Any], cfg: VisionConfig,
                  prefix: str = HF_SIGLIP_VISION_PREFIX, dtype: str | None = None
                  ) -> dict[str, np.ndarray]:
    """`VisionEncoder` params -> Hugging Face names (the inverse of `import_vision`).

    Only what the params hold is written: `num_layers_used` layers, and the post-layernorm when
    the config has one. dtype: of the returned arrays (default: that of the params).
    """
    validate_vision(cfg)
    out_dtype = _np_dtype(dtype)
    out: dict[str, np.ndarray] = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = array if out_dtype is None else array.astype(out_dtype)

    for rel, path, kind in _EMBEDDINGS + (_POST_LAYERNORM if cfg.use_post_layernorm else ()):
        put(prefix + rel, _to_hf(kind, np.asarray(_get(params, path)), cfg))
    for rel, path, kind in _LAYER:
        stacked = np.asarray(_get(params, ("layers",) + path))
        if stacked.shape[0] != cfg.num_layers_used:
            raise ValueError(f"params layers/{'/'.join(path)}: expected {cfg.num_layers_used} "
                             f"stacked layers, found {stacked.shape[0]}")
        for i in range(cfg.num_layers_used):
            put(f"{prefix}encoder.layers.{i}.{rel}", _to_hf(kind, stacked[i], cfg))
    return out


# --- projector and newline ----------------------------------------------------------------------
def projector_keys(prefix: str = LLADA_V_PREFIX) -> dict[str, tuple[str, ...]]:
    """LLaDA-V name -> path in the `Projector` params."""
    return {
        f"{prefix}mm_projector.0.weight": ("linear_1", "kernel"),
        f"{prefix}mm_projector.0.bias": ("linear_1", "bias"),
        f"{prefix}mm_projector.2.weight": ("linear_2", "kernel"),
        f"{prefix}mm_projector.2.bias": ("linear_2", "bias"),
        f"{prefix}image_newline": ("image_newline",),
    }


def import_projector(tensors: Mapping[str, Any], vision_width: int, d_model: int,
                     prefix: str = LLADA_V_PREFIX, dtype: str = "float32") -> Params:
    """LLaDA-V `mm_projector` (mlp2x_gelu) and `image_newline` -> `Projector` params."""
    expected = {
        "linear_1/kernel": (d_model, vision_width), "linear_1/bias": (d_model,),
        "linear_2/kernel": (d_model, d_model), "linear_2/bias": (d_model,),
        "image_newline": (d_model,),
    }
    keys = projector_keys(prefix)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"missing projector tensor(s): {_listing(missing)}")
    params: Params = {}
    for name, path in keys.items():
        t = np.asarray(tensors[name])
        want = expected["/".join(path)]
        if tuple(t.shape) != want:
            raise _shape_error(name, want, tuple(t.shape))
        if path[-1] == "kernel":
            t = t.T                   # torch Linear [out, in] -> [in, out]
        _set(params, path, t.astype(_np_dtype(dtype)))
    return params


def export_projector(params: Mapping[str, Any], prefix: str = LLADA_V_PREFIX,
                     dtype: str | None = None) -> dict[str, np.ndarray]:
    """`Projector` params -> LLaDA-V names (the inverse of `import_projector`)."""
    out = {}
    for name, path in projector_keys(prefix).items():
        a = np.asarray(_get(params, path))
        if path[-1] == "kernel":
            a = a.T
        out[name] = a if dtype is None else a.astype(_np_dtype(dtype))
    return out


def import_llada_v_multimodal(tensors: Mapping[str, Any], cfg: VisionConfig, d_model: int,
                              dtype: str | None = None) -> Params:
    """The vision side of a LLaDA-V checkpoint: {"vision_tower": ..., "projector": ...}."""
    return {
        "vision_tower": import_vision(tensors, cfg, LLADA_V_VISION_PREFIX, dtype),
        "projector": import_projector(tensors, cfg.width, d_model, LLADA_V_PREFIX,
                                      dtype or cfg.param_dtype),
    }


def export_llada_v_multimodal(params: Mapping[str, Any], cfg: VisionConfig,
                              dtype: str | None = None) -> dict[str, np.ndarray]:
    """Inverse of `import_llada_v_multimodal`, with LLaDA-V's names."""
    out = export_vision(params["vision_tower"], cfg, LLADA_V_VISION_PREFIX, dtype)
    out.update(export_projector(params["projector"], LLADA_V_PREFIX, dtype))
    return out


# --- safetensors --------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_safetensors(path: str | os.PathLike[str],
                     select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file whose name passes `select`, as numpy arrays.

    A small reader of the format (8-byte header length, JSON header, raw little-endian data)
    over a memory map, so only the selected tensors are read, and bfloat16 works (the numpy
    backend of the `safetensors` package has no bfloat16).
    """
    path = os.fspath(path)
    header, offset = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
    out = {}
    for name, info in header.items():
        if select is not None and not select(name):
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.array(data[begin:end].view(dtype).reshape(info["shape"]))
    return out


def _safetensors_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    return [os.path.join(directory, f) for f in files]


def load_safetensors_dir(directory: str | os.PathLike[str],
                         prefixes: Iterable[str] = ("",)) -> dict[str, np.ndarray]:
    """Tensors whose name starts with one of `prefixes`, from every *.safetensors of a directory."""
    directory = os.fspath(directory)
    prefixes = tuple(prefixes)
    out: dict[str, np.ndarray] = {}
    for path in _safetensors_files(directory):
        for name, t in read_safetensors(path, lambda n: n.startswith(prefixes)).items():
            if name in out:
                raise ValueError(f"tensor {name} appears in more than one shard of {directory}")
            out[name] = t
    return out


def import_vision_from_safetensors(directory: str | os.PathLike[str], cfg: VisionConfig,
                                   prefix: str | None = None, dtype: str | None = None) -> Params:
    """`import_vision` on a safetensors checkpoint directory; reads only the vision tensors."""
    directory = os.fspath(directory)
    if prefix is None:
        names = [n for path in _safetensors_files(directory) for n in _read_header(path)[0]]
        prefix = detect_vision_prefix(names)
    return import_vision(load_safetensors_dir(directory, (prefix,)), cfg, prefix, dtype)
