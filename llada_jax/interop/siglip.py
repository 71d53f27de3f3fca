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
import math
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
            _set(params, ("layers", *path), stacked)
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
        stacked = np.asarray(_get(params, ("layers", *path)))
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
    header, offset, _ = _read_header_and_metadata(path)
    return header, offset


def _read_header_and_metadata(path: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """(header, offset of the data, `__metadata__`) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    return header, 8 + header_len, metadata


def read_safetensors(path: str | os.PathLike[str],
                     select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file whose name passes `select`, as numpy arrays.

    A small reader of the format (8-byte header length, JSON header, raw little-endian data)
    over a memory map, so only the selected tensors are read, and bfloat16 works (the numpy
    backend of the `safetensors` package has no bfloat16).
    """
    from llada_jax.interop.hf import CRC32_PREFIX, check_tensor

    path = os.fspath(path)
    header, offset, metadata = _read_header_and_metadata(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
    covered = max((info["data_offsets"][1] for info in header.values()), default=0)
    if covered != data.size:   # truncated, or bytes appended: the payload is not what it was
        raise ValueError(f"shard file {path} is damaged: its header describes {covered} bytes "
                         f"of tensor data, the file holds {data.size}")
    out = {}
    for name, info in header.items():
        if select is not None and not select(name):
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"shard file {path} is damaged: tensor {name!r} has "
                             f"{end - begin} bytes for shape {list(shape)} of {info['dtype']}")
        out[name] = np.array(data[begin:end].view(dtype).reshape(shape))
        check_tensor(out[name], name, path, metadata.get(CRC32_PREFIX + name))
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
    import dataclasses

    tile = vision.image_size
    return {
        "architectures": ["LlavaLLaDAModelLM"],
        "mm_vision_tower": "google/siglip2-so400m-patch14-384",
        "mm_hidden_size": vision.width,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": vision.feature_layer,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": image_aspect_ratio,
        "image_grid_pinpoints": [[i * tile, j * tile] for i in range(1, max_grid + 1)
                                 for j in range(1, max_grid + 1)],
        VISION_CONFIG_FIELD: {k: v for k, v in dataclasses.asdict(vision).items()
                              if k not in ("dtype", "param_dtype", "remat_policy")},
    }


def vision_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> VisionConfig:
    """The VisionConfig of a LLaDA-V config.json: our recorded architecture if present, else
    SigLIP2 so400m/14 at 384 px with the checkpoint's `mm_vision_select_layer`."""
    import dataclasses

    fields = dict(hf_config.get(VISION_CONFIG_FIELD) or {})
    if not fields and "mm_vision_select_layer" in hf_config:
        fields["feature_layer"] = int(hf_config["mm_vision_select_layer"])
    known = {f.name for f in dataclasses.fields(VisionConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.json {VISION_CONFIG_FIELD}: unknown field(s) {unknown}")
    fields.update(overrides)
    cfg = VisionConfig(**fields)
    validate_vision(cfg)
    return cfg


def export_llada_v(params: Mapping[str, Any], model_cfg: Any, vision: VisionConfig,
                   out_dir: str | os.PathLike[str], *, dtype: str = "bfloat16",
                   image_aspect_ratio: str = "anyres_max_4", max_grid: int = 6,
                   tokenizer_dir: str | None = None, overwrite: bool = False) -> Any:
    """Writes `LLaDAV` params as one LLaDA-V Hugging Face checkpoint directory.

    The language tower goes through `interop.hf.export_hf` with Llama names (`model.layers.*`,
    `lm_head`), the vision tower and projector (`model.vision_tower.vision_tower.vision_model.*`,
    `model.mm_projector.*`, `model.image_newline`) into one more shard, `model-vision.safetensors`,
    listed in the same index; config.json gets the LLaVA fields (`llada_v_config_fields`).
    Everything is written under a temporary name and renamed to `out_dir` when complete; an
    existing directory is replaced only under the rules of `hf.check_replaceable`.
    Returns hf.export_hf's summary, counting the vision shard too.
    """
    import dataclasses
    import shutil
    import tempfile

    import jax

    from llada_jax.interop import hf

    params = dict(params)
    missing = [k for k in ("vision_tower", "projector", "language_model") if k not in params]
    if missing:
        raise ValueError(f"params: expected LLaDAV params with vision_tower, projector and "
                         f"language_model, missing {missing}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    hf.check_exportable(model_cfg, "llama")
    hf.check_replaceable(out_dir, overwrite)   # an existing directory: a previous export only
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
    os.rmdir(staging)   # export_hf creates it (and refuses an existing directory)
    try:
        summary = hf.export_hf(params["language_model"], model_cfg, staging, naming="llama",
                               dtype=dtype, tokenizer_dir=tokenizer_dir)
        host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)),
                            {"vision_tower": params["vision_tower"],
                             "projector": params["projector"]})
        tensors = export_llada_v_multimodal(host, vision, dtype)
        if jax.process_index() == 0:
            hf.write_safetensors(
                os.path.join(staging, VISION_SHARD),
                [(name, t.dtype, t.shape, lambda t=t: t) for name, t in tensors.items()],
                {"format": "pt"})
            index_path = os.path.join(staging, hf.INDEX_FILE)
            with open(index_path) as f:
                index = json.load(f)
            index["weight_map"].update({name: VISION_SHARD for name in tensors})
            vision_bytes = sum(t.nbytes for t in tensors.values())
            index["metadata"]["total_size"] += vision_bytes
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
            config_path = os.path.join(staging, "config.json")
            with open(config_path) as f:
                config = json.load(f)
            config.update(llada_v_config_fields(vision, image_aspect_ratio, max_grid))
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
            hf.replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(summary, directory=out_dir,
                               num_tensors=summary.num_tensors + len(tensors),
                               num_bytes=summary.num_bytes + vision_bytes,
                               num_shards=summary.num_shards + 1)


def import_llada_v(hf_dir: str | os.PathLike[str], *, mesh: Any = None, rules: Any = None,
                   param_dtype: str | None = None, vision: VisionConfig | None = None
                   ) -> tuple[Any, VisionConfig, dict[str, Any]]:
    """A LLaDA-V Hugging Face checkpoint -> (ModelConfig, VisionConfig, `LLaDAV` params).

    The language tower streams in through `interop.hf.import_hf` (its Llama names; the vision
    tensors are skipped there), the vision tower and projector through `import_llada_v_multimodal`
    (only their tensors are read). `vision`: the tower's architecture (default: from config.json,
    see `vision_config_from_hf`). Params are placed on `mesh` by the logical rules (default: the
    project's table), or on the first device without a mesh; `param_dtype` as in `import_hf`.
    """
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES
    from llada_jax.interop import hf
    from llada_jax.model.multimodal import LLaDAV

    hf_dir = os.fspath(hf_dir)
    model_cfg, language = hf.import_hf(hf_dir, mesh=mesh, rules=rules, param_dtype=param_dtype,
                                       skip_prefixes=LLADA_V_MULTIMODAL_PREFIXES)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    vision = vision_config_from_hf(hf_config) if vision is None else vision
    vision = dataclasses.replace(vision, param_dtype=model_cfg.param_dtype)
    tensors = load_safetensors_dir(hf_dir, LLADA_V_MULTIMODAL_PREFIXES)
    host = import_llada_v_multimodal(tensors, vision, model_cfg.d_model, model_cfg.param_dtype)

    # The same shardings LLaDAV's own init gives these params.
    model = LLaDAV(model_cfg, vision)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"],
                           jax.random.key(0))
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
    else:
        rules = tuple(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = {"language_model": language}
    for group in ("vision_tower", "projector"):
        expected = jax.tree.map(lambda a: a.shape, nn.unbox(boxed[group]))
        found = jax.tree.map(lambda a: a.shape, host[group])
        if expected != found:
            raise ValueError(f"{hf_dir}: the {group} tensors do not fit the vision config "
                             f"{vision}: expected shapes {expected}, found {found}")
        params[group] = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i, a=a: a[i]),
            host[group], shardings[group])
    return model_cfg, vision, params


def llada_v_init_params(language_params: Mapping[str, Any], vision_params: Mapping[str, Any],
                        model_cfg: Any, vision: VisionConfig, seed: int = 0) -> dict[str, Any]:
    """`LLaDAV` params for stage 1 from separate checkpoints: a LLaDA language tower
    (`interop.hf.import_hf`), a SigLIP vision tower (`import_vision` /
    `import_vision_from_safetensors`) and a freshly initialised projector (from `seed`).
    Shapes are checked against the configs; ValueError names the part."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llada_jax.model.multimodal import LLaDAV, Projector

    model = LLaDAV(model_cfg, vision)
    abstract = nn.unbox(jax.eval_shape(
        lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.key(0)))
    parts = {"language_model": language_params, "vision_tower": vision_params}
    for name, tree in parts.items():
        expected = jax.tree.map(lambda a: tuple(a.shape), abstract[name])
        found = jax.tree.map(lambda a: tuple(np.shape(a)), dict(tree))
        if expected != found:
            raise ValueError(f"{name} params do not fit the config: expected shapes {expected}, "
                             f"found {found}")
    projector = nn.unbox(Projector(model_cfg.d_model, param_dtype=model_cfg.param_dtype).init(
        jax.random.key(seed), jnp.zeros((1, vision.width)))["params"])
    projector = jax.tree.map(np.asarray, projector)
    return {"vision_tower": dict(vision_params), "projector": projector,
            "language_model": dict(language_params)}
