"""Flags shared by launch/generate.py and launch/chat.py: flags -> (mesh, Generator, SamplerConfig).

Every sampler option is a flag whose default (None) means "the checkpoint config's
`sampler.<field>`", so a checkpoint carries its settings and a command line overrides them.
Params are loaded sharded on a mesh of every device (`--mesh_*`, a deployment choice independent
of how the model was trained); sampling itself is `llada_jax.generation`. Config errors are
reworded to name the flags the user typed.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import jax
from absl import flags

from llada_jax import parallel
from llada_jax.data.tokenizer import load_tokenizer
from llada_jax.diffusion.sampler import SamplerConfig
from llada_jax.generation import Generator

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "params checkpoint or trainer workdir",
                                 required=True)
STEP = flags.DEFINE_integer("step", None, "trainer step to load (default: the latest)")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "tokenizer spec (default: the checkpoint's config.data.tokenizer)")
SEED = flags.DEFINE_integer("seed", None, "sampling seed (default: config.sampler.seed)")
PROMPT_BUCKET = flags.DEFINE_integer(
    "prompt_bucket", 32, "left-pad prompts to a multiple of this many tokens, so prompts of "
    "similar lengths share one compiled sampler", lower_bound=1)
MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "data-parallel mesh axis (-1: fill)")
MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "fsdp mesh axis (-1: fill, or 1 when another "
                                 "axis is -1)")
MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "tensor-parallel mesh axis (-1: fill)")

# SamplerConfig field -> its flag (None: keep the checkpoint config's value).
SAMPLER_FLAGS = {
    "gen_length": flags.DEFINE_integer("gen_length", None, "tokens to generate"),
    "block_length": flags.DEFINE_integer("block_length", None, "semi-autoregressive block length"),
    "steps": flags.DEFINE_integer("steps", None, "sampling steps (fixed schedule)"),
    "temperature": flags.DEFINE_float("temperature", None, "Gumbel-max temperature (0: greedy)"),
    "cfg_scale": flags.DEFINE_float("cfg_scale", None, "classifier-free guidance scale"),
    "remasking": flags.DEFINE_enum("remasking", None, ["low_confidence", "random"],
                                   "confidence used to pick the tokens to commit"),
    "logits_eos_inf": flags.DEFINE_bool("logits_eos_inf", None, "never generate EOS"),
    "confidence_eos_eot_inf": flags.DEFINE_bool(
        "confidence_eos_eot_inf", None, "commit EOS/EoT only when nothing else is left"),
    "cache": flags.DEFINE_enum("cache", None, ["none", "prefix", "dual"],
                               "KV cache: none, prefix (before the block) or dual (both sides)"),
    "refresh_every": flags.DEFINE_integer("refresh_every", None,
                                          "with a cache: full pass every n steps of a block"),
    "threshold": flags.DEFINE_float("threshold", None, "parallel decoding: commit every "
                                    "candidate with confidence >= threshold (0: off)"),
    "factor": flags.DEFINE_float("factor", None, "parallel decoding: factor rule (0: off)"),
    "early_exit": flags.DEFINE_bool("early_exit", None,
                                    "stop once every row has an EOS with nothing masked before it"),
}


_CONFIG_FIELD = re.compile(r"(?:config\.)?(sampler|mesh)\.(\w+)")


def name_flags(message: str) -> str:
    """A config error message with the flags the user typed named instead of config fields.

    `config.sampler.steps` becomes `--steps` when --steps was given; otherwise the field that is
    wrong is called the checkpoint's setting (and its flag named), and other fields keep their
    `sampler.` name. `config.mesh.data` becomes `--mesh_data` (the mesh here is made from the
    flags alone).
    """
    def replace(match: re.Match) -> str:
        section, field = match.groups()
        if section == "mesh":
            return f"--mesh_{field}" if f"mesh_{field}" in flags.FLAGS else match.group(0)
        if field in SAMPLER_FLAGS and SAMPLER_FLAGS[field].present:
            return f"--{field}"
        if match.start() > 0:
            return f"sampler.{field}"
        flag = f", set it with --{field}" if field in SAMPLER_FLAGS else ""
        return f"the checkpoint's sampler.{field} (from its config{flag})"

    return _CONFIG_FIELD.sub(replace, message)


def make_mesh() -> Any:
    """The mesh of the --mesh_* flags over every device."""
    parallel.maybe_initialize_distributed()   # several hosts: one process each
    fsdp = MESH_FSDP.value
    if not MESH_FSDP.present and -1 in (MESH_DATA.value, MESH_TENSOR.value):
        fsdp = 1   # the default fill moves to the axis the user asked to fill
    try:
        return parallel.make_mesh(data=MESH_DATA.value, fsdp=fsdp, tensor=MESH_TENSOR.value)
    except ValueError as e:
        raise ValueError(f"--mesh_data={MESH_DATA.value} --mesh_fsdp={fsdp} --mesh_tensor="
                         f"{MESH_TENSOR.value} do not fit the {jax.device_count()} device(s) "
                         f"({name_flags(str(e))})") from e


def load() -> Generator:
    """The Generator of --checkpoint (params sharded on the --mesh_* mesh) and --tokenizer."""
    mesh = make_mesh()
    tokenizer = where = None
    if TOKENIZER.value:
        where = f"--tokenizer={TOKENIZER.value}"
        try:
            tokenizer = load_tokenizer(TOKENIZER.value)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {str(e).replace('config.data.tokenizer: ', '')}") \
                from None
    return Generator.load(CHECKPOINT.value, step=STEP.value, tokenizer=tokenizer, mesh=mesh,
                          tokenizer_where=where)


def sampler_config(generator: Generator) -> SamplerConfig:
    """The checkpoint's config.sampler with the flags that were given."""
    overrides = {name: flag.value for name, flag in SAMPLER_FLAGS.items()
                 if flag.value is not None}
    try:
        return generator.sampler(**overrides)
    except ValueError as e:
        raise ValueError(name_flags(str(e))) from e


def warn_without_image(generator: Generator, program: str) -> None:
    """A LLaDA-V checkpoint asked without an image answers from the text alone: say so."""
    if generator.config.vision.enabled:
        hint = ("pass --image=FILE to ask about an image" if program == "chat"
                else "launch/chat.py --image=FILE asks about an image")
        print(f"warning: --checkpoint={CHECKPOINT.value} is a LLaDA-V checkpoint "
              f"(vision.enabled) and no image is given: the answers come from the text alone "
              f"({hint})", file=sys.stderr, flush=True)


def seed(generator: Generator) -> int:
    return generator.config.sampler.seed if SEED.value is None else SEED.value
