"""Converts Hugging Face LLaDA checkpoints to llada_jax params checkpoints and back.

Import (released LLaDA-8B / iLLaDA layout, LLaDA-V's Llama-named tower, LLaDA-MoE or LLaDA2.x;
bf16 or fp32 shards; the family is read from config.json):

    python launch/convert.py --mode=import --hf_dir=/ckpt/LLaDA-8B-Instruct --out=/ckpt/llada_jax
        [--config=configs/llada_8b.py] [--param_dtype=bfloat16]

writes a params checkpoint (`save_params`) whose config is the base preset (`--config`, default
`configs/llada_8b.py` when present, else the library defaults) with the model section taken from
the HF config.json (compute dtype, remat and attention backend stay the preset's), and
`data.tokenizer = 'hf:HF_DIR'` when the directory has a tokenizer.json. Without `--config`, the
sampler settings are fitted to the model (generation no longer than half its
max_sequence_length; an EoT id outside its vocabulary falls back to the tokenizer's), so
`generate.py --checkpoint=OUT` works on the result as is. Params are placed on the preset's mesh
over all devices while they stream in. `--out` is created and probed for writing before any
tensor is read; on a write error (read-only, full disk) what this run wrote is removed again.

A whole LLaDA-V checkpoint (keys `model.vision_tower.*`, `model.mm_projector.*`,
`model.image_newline` beside the Llama-named tower) is detected and imported with its vision tower
and projector; the written config then has `vision.enabled` and the tower's architecture.

Export (a params checkpoint or a trainer workdir; LLaDA-V params export as a LLaDA-V checkpoint):

    python launch/convert.py --mode=export --checkpoint=/runs/sft --out=/ckpt/hf_export \\
        [--naming=llada|llama|llada_moe|llada2] --dtype=bfloat16 [--step=N] [--tokenizer_dir=DIR]
        [--code_dir=DIR]

writes safetensors shards + index + config.json + generation_config.json (+ tokenizer files,
by default from the checkpoint's `data.tokenizer = 'hf:DIR'`), loadable by PyTorch users.
`--overwrite` replaces `--out` only when it is a previous export (nothing else in it). The
'llada' layout cannot express head_dim != d_model / n_heads (the released config.json has no
such field): such a model is refused before anything is written; `--naming=llama` records it.

Every error a user can cause (bad flags, missing or damaged files, unwritable or full disks)
ends the program with one `error:` line and a non-zero status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import sys
import tempfile
import time

import program
from absl import app, flags
from ml_collections import config_flags

from llada_jax import config as config_lib
from llada_jax.interop import hf, llada_v

_MODE = flags.DEFINE_enum("mode", None, ["import", "export"], "conversion direction",
                          required=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: Hugging Face checkpoint directory")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "export: params checkpoint or trainer workdir")
_STEP = flags.DEFINE_integer("step", None, "export: trainer step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "directory to write", required=True)
_NAMING = flags.DEFINE_enum("naming", None, list(hf.NAMINGS),
                            "export: key layout (llada: model.transformer.*, llama: "
                            "model.layers.*, llada_moe: LLaDA-MoE, llada2: LLaDA2.x; default: "
                            "llada2 / llada_moe for an MoE model by its router, else llada)")
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
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "export: replace --out when it is a previous "
                                "export (refused when it holds any other file)")
_CONFIG = config_flags.DEFINE_config_file("config", None, "import: base config preset")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields of the model section that describe how to run the network, not what it is: they come
# from the base preset, everything else from config.json.
RUNTIME_FIELDS = ("dtype", "remat_policy", "attention_backend")


def base_config(is_llada_v: bool = False):
    """`--config`, else the released family's preset when the repository has it
    (configs/llada_v.py for a LLaDA-V checkpoint, configs/llada_8b.py otherwise), else the
    library defaults."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    name = "llada_v" if is_llada_v else "llada_8b"
    preset = os.path.join(REPO, "configs", name + ".py")
    if os.path.isfile(preset):
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"{name}_preset", preset)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    return config_lib.default_config()


def prepare_import_dir(out: str) -> bool:
    """Creates `out` (or checks the existing one) and proves it writable, before any work.

    Returns whether this run created it. Orbax creates directories and writes from background
    threads, where an error cannot end the program; checking here turns a read-only or missing
    parent into one error line instead.
    """
    if os.path.exists(os.path.join(out, "params")) or os.path.exists(
            os.path.join(out, "config.json")):
        raise FileExistsError(f"--out={out} already holds a params checkpoint (params/ or "
                              f"config.json); choose another directory or delete it first")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out={out} exists and is not a directory")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, ".convert-write-probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if created and sys.exc_info()[0] is not None:
            with contextlib.suppress(OSError):
                os.rmdir(out)
    return created


def _partial_import_files(out: str, created: bool) -> list[str]:
    """What a failed `save_params` into `out` left (this run's files only)."""
    if created:
        return [out] if os.path.lexists(out) else []
    names = [os.path.join(out, "params"), os.path.join(out, "config.json")]
    return [*glob.glob(os.path.join(out, "params.orbax-checkpoint-tmp*")),
            *(path for path in names if os.path.lexists(path))]


def remove_partial_import(out: str, created: bool) -> None:
    """Removes what a failed `save_params` into `out` left (this run's files only).

    A failed save's background writers can still create files for a moment after the error
    reached us (one CI run found `--out` back after it had been removed), so this removes until
    nothing has reappeared for 0.2 s (at most 5 s).
    """
    deadline = time.monotonic() + 5
    while True:
        for path in _partial_import_files(out, created):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        time.sleep(0.2)
        if not _partial_import_files(out, created) or time.monotonic() > deadline:
            return


def save_params_or_exit(out: str, created: bool, config, params) -> None:
    """`save_params` with orbax's output held back; on failure one error line, then exit.

    A failed save makes orbax log the error with a traceback per thread, and tensorstore's
    callbacks keep printing 'Event loop is closed' tracebacks from background threads for a
    while after the error reached us. So while saving, logging is quiet and file descriptor 2
    (and with it sys.stderr) goes to a holding file, replayed on success; on failure this
    run's partial files are removed, the one error line is written to the real stderr and the
    process ends at once (`os._exit`), before any thread can print after it or keep it alive.
    """
    from llada_jax.train.checkpoint import save_params

    loggers = [logging.getLogger(), logging.getLogger("absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    real_stderr = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        save_params(out, config, params)
    except BaseException as e:   # every failure, Ctrl-C included, ends here as one line
        remove_partial_import(out, created)
        message = " ".join(str(e).split()) or type(e).__name__
        os.write(real_stderr, (f"error: convert.py --mode=import: cannot write the params "
                               f"checkpoint to --out={out}: {message}\n").encode())
        os._exit(1)
    sys.stderr.flush()
    os.dup2(real_stderr, 2)
    os.close(real_stderr)
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
    held.seek(0)
    sys.stderr.write(held.read().decode(errors="replace"))
    held.close()


def set_image_layout(config, hf_config: dict, tile: int) -> None:
    """config.vision's image_aspect_ratio / max_grid from a LLaDA-V config.json (what
    `llada_v.llada_v_config_fields` writes on export), when it names a layout we support."""
    ratio = hf_config.get("image_aspect_ratio")
    if isinstance(ratio, str) and (ratio == "square" or ratio.startswith("anyres_max_")):
        config.vision.image_aspect_ratio = ratio
    pinpoints = hf_config.get("image_grid_pinpoints")
    if isinstance(pinpoints, list) and pinpoints and tile > 0:
        try:
            config.vision.max_grid = max(max(int(h), int(w)) for h, w in pinpoints) // tile
        except (TypeError, ValueError):
            pass   # a pinpoint list in another format: keep the preset's grid


def check_tokenizer(hf_dir: str, model):
    """The HF directory's tokenizer if it loads; a note when it does not or its mask id differs
    from the model's (generation would then never see a mask token it knows)."""
    from llada_jax.data.tokenizer import HFTokenizer

    try:
        tokenizer = HFTokenizer(hf_dir)
    except Exception as e:   # the tokenizers library raises plain Exceptions on bad files
        print(f"note: the tokenizer of {hf_dir} does not load ({' '.join(str(e).split())}); "
              f"generate/evaluate will need --tokenizer")
        return None
    if tokenizer.mask_id != model.mask_token_id:
        print(f"note: the tokenizer's <|mdm_mask|> is id {tokenizer.mask_id}, config.json's "
              f"mask_token_id is {model.mask_token_id}; the checkpoint keeps config.json's")
    return tokenizer


def fit_sampler_to_model(config, tokenizer=None) -> list[str]:
    """Sampler settings a (possibly small) imported model can run; returns what was changed.

    The preset's settings are the released model's (gen_length 128, EoT 126348, LLaDA-V's
    banned EOS/BOS/header ids): a model with a short max_sequence_length or a small vocabulary
    could not use them. Banned ids outside the vocabulary become the tokenizer's own EOS, BOS
    and header ids when the directory has a tokenizer, else they are dropped.
    """
    changes = []
    model, sampler = config.model, config.sampler
    room = max(1, model.max_sequence_length // 2)   # leave half the context to the prompt
    if sampler.gen_length > room:
        gen = room
        block = sampler.block_length if gen % max(1, sampler.block_length) == 0 else gen
        block = min(block, gen)
        steps = gen   # one token per step: the reference's finest schedule
        changes.append(f"gen_length {sampler.gen_length}->{gen}, block_length "
                       f"{sampler.block_length}->{block}, steps {sampler.steps}->{steps}")
        sampler.gen_length, sampler.block_length, sampler.steps = gen, block, steps
    if not -1 <= sampler.eot_token_id < model.vocab_size:
        changes.append(f"eot_token_id {sampler.eot_token_id}->-1 (the tokenizer's)")
        sampler.eot_token_id = -1
    banned = [i for i in sampler.banned_ids if not 0 <= i < model.vocab_size]
    if banned:
        if tokenizer is not None:
            mapped = [tokenizer.eos_id, tokenizer.bos_id, tokenizer.start_header_id,
                      tokenizer.end_header_id]
            changes.append(f"banned_ids {list(sampler.banned_ids)}->{mapped} (the tokenizer's "
                           f"EOS, BOS and header ids)")
            sampler.banned_ids = mapped
        else:
            changes.append(f"banned_ids without {banned} (outside the vocabulary)")
            sampler.banned_ids = [i for i in sampler.banned_ids if 0 <= i < model.vocab_size]
    return changes


def run_import() -> None:
    if not _HF_DIR.value:
        raise app.UsageError("--mode=import needs --hf_dir")
    if not os.path.isdir(_HF_DIR.value):
        raise FileNotFoundError(f"--hf_dir={_HF_DIR.value}: no such directory")
    out = os.path.abspath(_OUT.value)
    created = prepare_import_dir(out)
    try:
        import_into(out, created)
    except BaseException:
        remove_partial_import(out, created)
        raise


def import_into(out: str, created: bool) -> None:
    from llada_jax import parallel

    start = time.perf_counter()
    is_llada_v = any(name.startswith(llada_v.LLADA_V_MULTIMODAL_PREFIXES)
                     for name in hf.list_tensors(_HF_DIR.value))
    config = base_config(is_llada_v)
    mesh = parallel.make_mesh(config)
    overrides = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
    rules = parallel.logical_rules(config)
    skip = tuple(_SKIP_PREFIXES.value)
    if is_llada_v:  # a whole LLaDA-V checkpoint: Llama-named tower + vision tower + projector
        skip += tuple(llada_v.LLADA_V_MULTIMODAL_PREFIXES)
    checkpoint = hf.inspect_hf_checkpoint(_HF_DIR.value, overrides, skip)
    if is_llada_v:
        model, vision, params = llada_v.import_llada_v(_HF_DIR.value, mesh=mesh, rules=rules,
                                                      param_dtype=_PARAM_DTYPE.value)
        model = dataclasses.replace(model, **overrides)
        config.vision.enabled = True
        for name, value in dataclasses.asdict(vision).items():
            if name in config.vision:
                config.vision[name] = value
        set_image_layout(config, checkpoint.hf_config, vision.image_size)
    else:
        model, params = hf.import_hf(_HF_DIR.value, mesh=mesh, rules=rules,
                                     param_dtype=_PARAM_DTYPE.value, overrides=overrides,
                                     skip_prefixes=skip)
    for name, value in dataclasses.asdict(model).items():
        config.model[name] = value
    tokenizer = None
    if os.path.isfile(os.path.join(_HF_DIR.value, "tokenizer.json")):
        config.data.tokenizer = "hf:" + os.path.abspath(_HF_DIR.value)
        tokenizer = check_tokenizer(_HF_DIR.value, model)
    else:
        print(f"note: {_HF_DIR.value} has no tokenizer.json; the checkpoint names the "
              f"tokenizer {config.data.tokenizer!r} (generate/evaluate take --tokenizer)")
    config.train.seq_len = min(config.train.seq_len, model.max_sequence_length)
    if _CONFIG.value is None:
        changes = fit_sampler_to_model(config, tokenizer)
        if changes:
            print(f"note: sampler settings fitted to the model: {'; '.join(changes)}")
    config_lib.validate(config)
    save_params_or_exit(out, created, config, params)
    seconds = time.perf_counter() - start
    extra = " + the LLaDA-V vision tower and projector" if is_llada_v else ""
    print(f"imported {len(checkpoint.tensors)} tensors{extra} "
          f"({checkpoint.num_bytes / 1e9:.3f} GB, "
          f"'{checkpoint.naming}' layout, {model.num_params:,} params as {model.param_dtype}) "
          f"from {_HF_DIR.value} to {out} in {seconds:.1f} s")


def run_export() -> None:
    from llada_jax import parallel
    from llada_jax.train.checkpoint import load_params

    if not _CHECKPOINT.value:
        raise app.UsageError("--mode=export needs --checkpoint")
    if not _MAX_SHARD_GB.value > 0:
        raise ValueError(f"--max_shard_gb must be positive, found {_MAX_SHARD_GB.value}")
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
        summary = llada_v.export_llada_v(params, model, config_lib.vision_config(config),
                                        _OUT.value, dtype=_DTYPE.value,
                                        image_aspect_ratio=config.vision.image_aspect_ratio,
                                        max_grid=config.vision.max_grid,
                                        tokenizer_dir=tokenizer_dir, overwrite=_OVERWRITE.value)
    else:
        naming = _NAMING.value or hf.default_naming(model)
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
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as e:
        # I/O errors (permission denied, read-only file system, full disk) name their path;
        # as ValueError the shared runner prints them as one line.
        where = e.filename if getattr(e, "filename", None) else f"writing --out={_OUT.value}"
        raise ValueError(f"convert.py --mode={_MODE.value}: {where}: {e.strerror or e}") from None


if __name__ == "__main__":
    program.run(main)
