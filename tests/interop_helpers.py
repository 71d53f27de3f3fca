"""Test helpers for interop that are not part of the library: a config.json of any family as a
ModelConfig, reading a whole safetensors file or a SigLIP tower from a directory of them, and
assembling stage-1 LLaDA-V params from separate towers."""

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.interop import hf, mapping, safetensors_io, siglip
from llada_jax.model.multimodal import LLaDAV, Projector
from llada_jax.model.vision import VisionConfig


def read_safetensors(path: str, select: Callable[[str], bool] | None = None
                     ) -> dict[str, np.ndarray]:
    """The checked tensors of one safetensors file whose name passes `select`."""
    names = [n for n in safetensors_io.read_header(path)[0] if select is None or select(n)]
    with contextlib.closing(safetensors_io.ShardReader(os.path.dirname(path))) as reader:
        return {name: reader.read(name, os.path.basename(path)) for name in names}


def model_config_from_hf(hf_config: Mapping, generation_config: Mapping | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a config.json dict of any family: the `model_config_from_hf` of the
    family `hf.family_of_config` picks for it, as `hf.inspect_hf_checkpoint` does."""
    return hf.family_of_config(hf_config).model_config_from_hf(hf_config, generation_config,
                                                               overrides, source)


def split_vision_keys(names: Iterable[str], cfg: VisionConfig,
                      prefix: str) -> tuple[list[str], list[str], list[str]]:
    """Sorts the names under `prefix` into (used by `cfg`'s tower, skipped by design,
    unexpected), as `siglip.import_vision` sees them.

    Skipped by design: the attention-pooling head, the post-layernorm when the config does not
    use it, and encoder layers in [num_layers_used, n_layers). Names outside `prefix` are not
    returned at all (a LLaDA-V checkpoint also holds the language model).
    """
    used_names = mapping.table_names(siglip._table(cfg.use_post_layernorm), prefix,
                                     cfg.num_layers_used)
    known = mapping.table_names(siglip._table(True), prefix, cfg.n_layers)
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


def import_vision_from_safetensors(directory: str | os.PathLike[str], cfg: VisionConfig,
                                   prefix: str | None = None, dtype: str | None = None) -> dict:
    """`siglip.import_vision` on every *.safetensors file of a directory (no index needed);
    reads only the tensors under the tower's prefix."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    paths = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
             if f.endswith(".safetensors")]
    if not paths:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    if prefix is None:
        names = [n for path in paths for n in safetensors_io.read_header(path)[0]]
        prefix = siglip.detect_vision_prefix(names)
    tensors = {}
    for path in paths:
        tensors.update(read_safetensors(path, lambda n: n.startswith(prefix)))
    return siglip.import_vision(tensors, cfg, prefix, dtype)


def llada_v_init_params(language_params: Mapping[str, Any], vision_params: Mapping[str, Any],
                        model_cfg: Any, vision: VisionConfig, seed: int = 0) -> dict[str, Any]:
    """`LLaDAV` params for stage 1 from separate checkpoints: a LLaDA language tower
    (`interop.hf.import_hf`), a SigLIP vision tower (`siglip.import_vision` /
    `import_vision_from_safetensors`) and a freshly initialised projector (from `seed`).
    Shapes are checked against the configs; ValueError names the part."""
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



def expected_hf_shapes(config: ModelConfig, naming: str) -> dict[str, tuple[int, ...]]:
    """Every HF key of the `naming` layout for `config`, with its tensor shape."""
    abstract = mapping.abstract_params(config)
    return {key: t.shape for t in mapping.hf_tensors(hf.family_of(naming).LAYOUTS[naming], config)
            for key, *_ in t.instances(abstract)}
