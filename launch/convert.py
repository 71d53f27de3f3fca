"""Converts Hugging Face LLaDA checkpoints to llada_jax params checkpoints and back.

Import (released LLaDA-8B layout or LLaDA-V's Llama-named tower, bf16 or fp32 shards):

    python launch/convert.py --mode=import --hf_dir=/ckpt/LLaDA-8B-Instruct --out=/ckpt/llada_jax
        [--config=configs/llada_8b.py] [--param_dtype=bfloat16]

writes a params checkpoint (`save_params`) whose config is the base preset (`--config`, default
`configs/llada_8b.py` when present, else the library defaults) with the model section taken from
the HF config.json (compute dtype, remat and attention backend stay the preset's), and
`data.tokenizer = 'hf:HF_DIR'` when the directory has a tokenizer.json. Params are placed on the
preset's mesh over all devices while they stream in.

A whole LLaDA-V checkpoint (keys `model.vision_tower.*`, `model.mm_projector.*`,
`model.image_newline` beside the Llama-named tower) is detected and imported with its vision tower
and projector; the written config then has `vision.enabled` and the tower's architecture.

Export (a params checkpoint or a trainer workdir; LLaDA-V params export as a LLaDA-V checkpoint):

    python launch/convert.py --mode=export --checkpoint=/runs/sft --out=/ckpt/hf_export \\
        --naming=llada --dtype=bfloat16 [--step=N] [--tokenizer_dir=DIR] [--code_dir=DIR]

writes safetensors shards + index + config.json + generation_config.json (+ tokenizer files,
by default from the checkpoint's `data.tokenizer = 'hf:DIR'`), loadable by PyTorch users.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from llada_jax import config as config_lib
from llada_jax.interop import hf, siglip

_MODE = flags.DEFINE_enum("mode", None, ["import", "export"], "conversion direction",
                          required=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: Hugging Face checkpoint directory")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "export: params checkpoint or trainer workdir")
_STEP = flags.DEFINE_integer("step", None, "export: trainer step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "directory to write", required=True)
_NAMING = flags.DEFINE_enum("naming", "llada", list(hf.NAMINGS),
                            "export: key layout (llada: model.transformer.*, "
                            "llama: model.layers.*)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "export: dtype of the written weights")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["bfloat16", "float32", "float16"],
                                 "import: dtype of the params (default: the checkpoint's)")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "export: maximum shard size in GiB")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                     "export: copy tokenizer files from here (default: the "
                                     "checkpoint's data.tokenizer when it is hf:DIR)")
_CODE_DIR = flags.DEFINE_string("code_dir", None, "export: copy *.py remote code from here "
                                "(configuration_llada.py, modeling_llada.py)")
_SKIP_PREFIXES = flags.DEFINE_list("skip_prefixes", [],
                                   "import: ignore tensors whose key starts with one of these "
                                   "(e.g. model.vision_tower.,model.mm_projector. of a full "
                                   "LLaDA-V checkpoint)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "export: replace an existing --out directory")
_CONFIG = config_flags.DEFINE_config_file("config", None, "import: base config preset")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields of the model section that describe how to run the network, not what it is: they come
# from the base preset, everything else from config.json.
RUNTIME_FIELDS = ("dtype", "remat_policy", "attention_backend")


def base_config():
    """`--config`, else configs/llada_8b.py when the repository has it, else the defaults."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    preset = os.path.join(REPO, "configs", "llada_8b.py")
    if os.path.isfile(preset):
        import importlib.util

        spec = importlib.util.spec_from_file_location("llada_8b_preset", preset)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    return config_lib.default_config()


def run_import() -> None:
    from llada_jax import parallel
    from llada_jax.train.checkpoint import save_params

    if not _HF_DIR.value:
        raise app.UsageError("--mode=import needs --hf_dir")
    config = base_config()
    mesh = parallel.make_mesh(config)
    start = time.perf_counter()
    overrides = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
    rules = parallel.logical_rules(config)
    is_llada_v = any(name.startswith(siglip.LLADA_V_MULTIMODAL_PREFIXES)
                     for name in hf.list_tensors(_HF_DIR.value))
    skip = tuple(_SKIP_PREFIXES.value)
    if is_llada_v:  # a whole LLaDA-V checkpoint: Llama-named tower + vision tower + projector
        skip += tuple(siglip.LLADA_V_MULTIMODAL_PREFIXES)
    checkpoint = hf.inspect_hf_checkpoint(_HF_DIR.value, overrides, skip)
    if is_llada_v:
        model, vision, params = siglip.import_llada_v(_HF_DIR.value, mesh=mesh, rules=rules,
                                                      param_dtype=_PARAM_DTYPE.value)
        model = dataclasses.replace(model, **overrides)
        config.vision.enabled = True
        for name, value in dataclasses.asdict(vision).items():
            if name in config.vision:
                config.vision[name] = value
    else:
        model, params = hf.import_hf(_HF_DIR.value, mesh=mesh, rules=rules,
                                     param_dtype=_PARAM_DTYPE.value, overrides=overrides,
                                     skip_prefixes=skip)
    for name, value in dataclasses.asdict(model).items():
        config.model[name] = value
    if os.path.isfile(os.path.join(_HF_DIR.value, "tokenizer.json")):
        config.data.tokenizer = "hf:" + os.path.abspath(_HF_DIR.value)
    config.train.seq_len = min(config.train.seq_len, model.max_sequence_length)
    config_lib.validate(config)
    save_params(_OUT.value, config, params)
    seconds = time.perf_counter() - start
    extra = " + the LLaDA-V vision tower and projector" if is_llada_v else ""
    print(f"imported {len(checkpoint.tensors)} tensors{extra} "
          f"({checkpoint.num_bytes / 1e9:.3f} GB, "
          f"'{checkpoint.naming}' layout, {model.num_params:,} params as {model.param_dtype}) "
          f"from {_HF_DIR.value} to {_OUT.value} in {seconds:.1f} s")


def run_export() -> None:
    from llada_jax import parallel
    from llada_jax.train.checkpoint import load_params

    if not _CHECKPOINT.value:
        raise app.UsageError("--mode=export needs --checkpoint")
    start = time.perf_counter()
    # Read onto an fsdp mesh over the devices at hand (not the training run's mesh, which may
    # have had other devices): an 8B model does not fit on one accelerator.
    mesh_config = config_lib.default_config()
    mesh_config.mesh.data, mesh_config.mesh.fsdp, mesh_config.mesh.tensor = 1, -1, 1
    config, params = load_params(_CHECKPOINT.value, step=_STEP.value,
                                 mesh=parallel.make_mesh(mesh_config))
    model = config_lib.model_config(config)
    tokenizer_dir = _TOKENIZER_DIR.value
    if tokenizer_dir is None and str(config.data.tokenizer).startswith("hf:"):
        candidate = config.data.tokenizer[len("hf:"):]
        tokenizer_dir = candidate if os.path.isdir(candidate) else None
        if tokenizer_dir is None:
            print(f"note: tokenizer directory {candidate} not found; no tokenizer files copied")
    if config.vision.enabled:  # LLaDA-V: always the Llama-named layout LLaDA-V releases
        naming = "llama"
        summary = siglip.export_llada_v(params, model, config_lib.vision_config(config),
                                        _OUT.value, dtype=_DTYPE.value,
                                        image_aspect_ratio=config.vision.image_aspect_ratio,
                                        max_grid=config.vision.max_grid,
                                        tokenizer_dir=tokenizer_dir, overwrite=_OVERWRITE.value)
    else:
        naming = _NAMING.value
        summary = hf.export_hf(params, model, _OUT.value, naming=naming, dtype=_DTYPE.value,
                               max_shard_bytes=int(_MAX_SHARD_GB.value * 1024 ** 3),
                               tokenizer_dir=tokenizer_dir, code_dir=_CODE_DIR.value,
                               overwrite=_OVERWRITE.value)
    seconds = time.perf_counter() - start
    print(f"exported {summary.num_tensors} tensors ({summary.num_bytes / 1e9:.3f} GB as "
          f"{_DTYPE.value}, {summary.num_shards} shard(s), '{naming}' layout) from "
          f"{_CHECKPOINT.value} to {summary.directory} in {seconds:.1f} s")


def main(argv: list[str]) -> None:
    del argv
    try:
        run_import() if _MODE.value == "import" else run_export()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Problems with the user's files or flags: the message names them; no traceback.
        sys.exit(f"convert.py --mode={_MODE.value}: {e}")


if __name__ == "__main__":
    app.run(main)
