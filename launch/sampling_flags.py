"""Flags and helpers shared by launch/generate.py and launch/chat.py.

Every sampler option is a flag whose default (None) means "the checkpoint config's
`sampler.<field>`", so a checkpoint carries its settings and a command line overrides them.
Params are loaded sharded on a mesh of every device (`--mesh_*`, a deployment choice independent
of how the model was trained), and prompt batches are padded to a multiple of the batch axes so
the one sampler runs sharded unchanged.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags

from llada_jax import parallel
from llada_jax.config import default_config
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.diffusion.sampler import SamplerConfig, generate, pad_prompts
from llada_jax.train import checkpoint, state

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
    mesh_config = default_config()
    fsdp = MESH_FSDP.value
    if not MESH_FSDP.present and -1 in (MESH_DATA.value, MESH_TENSOR.value):
        fsdp = 1   # the default fill moves to the axis the user asked to fill
    mesh_config.mesh.data, mesh_config.mesh.fsdp = MESH_DATA.value, fsdp
    mesh_config.mesh.tensor = MESH_TENSOR.value
    try:
        return parallel.make_mesh(mesh_config)
    except ValueError as e:
        raise ValueError(f"--mesh_data={MESH_DATA.value} --mesh_fsdp={fsdp} --mesh_tensor="
                         f"{MESH_TENSOR.value} do not fit the {jax.device_count()} device(s) "
                         f"({name_flags(str(e))})") from e


def load() -> tuple[ml_collections.ConfigDict, nn.Module, Any, Tokenizer, Any]:
    """(config, model, params, tokenizer, mesh) of --checkpoint, params sharded on the mesh."""
    mesh = make_mesh()
    config, params = checkpoint.load_params(CHECKPOINT.value, STEP.value, mesh=mesh)
    if TOKENIZER.value:
        where = f"--tokenizer={TOKENIZER.value}"
        try:
            tokenizer = load_tokenizer(TOKENIZER.value)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {str(e).replace('config.data.tokenizer: ', '')}") \
                from None
    else:
        where = f"the checkpoint's tokenizer {config.data.tokenizer!r} (flag --tokenizer)"
        tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"{where} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{config.model.vocab_size}")
    return config, state.make_model(config), params, tokenizer, mesh


def sampler_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> SamplerConfig:
    """config.sampler with the flags that were given, and the tokenizer's EoT id."""
    overrides = {name: flag.value for name, flag in SAMPLER_FLAGS.items()
                 if flag.value is not None}
    try:
        return SamplerConfig.from_config(config, eot_id=tokenizer.eot_id,
                                         vocab_limit=tokenizer.vocab_size, **overrides)
    except ValueError as e:
        raise ValueError(name_flags(str(e))) from e


def check_prompt_length(config: ml_collections.ConfigDict, sampler: SamplerConfig,
                        length: int, where: str) -> None:
    """Raises ValueError naming the prompt (`where`) when it leaves no room for the answer."""
    limit = config.model.max_sequence_length - sampler.gen_length
    if length > limit:
        raise ValueError(f"{where}: the prompt has {length} tokens, but the model's "
                         f"max_sequence_length={config.model.max_sequence_length} leaves room for "
                         f"at most {limit} beside gen_length={sampler.gen_length} (shorten the "
                         f"prompt or lower --gen_length)")


def warn_without_image(config: ml_collections.ConfigDict, program: str) -> None:
    """A LLaDA-V checkpoint asked without an image answers from the text alone: say so."""
    if config.vision.enabled:
        hint = ("pass --image=FILE to ask about an image" if program == "chat"
                else "launch/chat.py --image=FILE asks about an image")
        print(f"warning: --checkpoint={CHECKPOINT.value} is a LLaDA-V checkpoint "
              f"(vision.enabled) and no image is given: the answers come from the text alone "
              f"({hint})", file=sys.stderr, flush=True)


def seed(config: ml_collections.ConfigDict) -> int:
    return config.sampler.seed if SEED.value is None else SEED.value


def batch_rows(mesh) -> int:
    """Rows a prompt batch must be a multiple of: the size of the batch axes of the mesh."""
    return int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))


def run(config: ml_collections.ConfigDict, model: nn.Module, params: Any, mesh,
        prompts: Sequence[Sequence[int]], sampler: SamplerConfig, pad_id: int,
        rng: jax.Array, images: Sequence[Any] | None = None) -> tuple[np.ndarray, dict]:
    """Generates for a list of prompt id lists; returns (generated ids [N, gen_length], stats).

    Prompts are left-padded to a multiple of --prompt_bucket (at most what the model's length
    allows) and the batch is filled up to a multiple of the batch axes by repeating the last
    prompt; the extra rows are dropped. images (LLaDA-V): one
    `multimodal_data.EncodedConversation` per prompt, whose placeholders the prompt ids hold.
    """
    tokens, mask = pad_prompts(prompts, pad_id)
    limit = config.model.max_sequence_length - sampler.gen_length
    bucket = PROMPT_BUCKET.value
    width = max(tokens.shape[1], min(limit, -(-tokens.shape[1] // bucket) * bucket))
    rows = -(-len(prompts) // batch_rows(mesh)) * batch_rows(mesh)
    padded_tokens = np.full((rows, width), pad_id, np.int32)
    padded_mask = np.zeros((rows, width), bool)
    padded_tokens[:len(prompts), width - tokens.shape[1]:] = tokens
    padded_mask[:len(prompts), width - tokens.shape[1]:] = mask
    padded_tokens[len(prompts):] = padded_tokens[len(prompts) - 1]
    padded_mask[len(prompts):] = padded_mask[len(prompts) - 1]
    start = time.perf_counter()
    host_batch = {"tokens": padded_tokens, "mask": padded_mask}
    if images is not None:
        from llada_jax.data import multimodal_data
        from llada_jax.model.multimodal import IMAGE_FIELDS

        canvas = np.concatenate(
            [padded_tokens, np.full((rows, sampler.gen_length), sampler.mask_id, np.int32)], 1)
        vision = config.vision
        host_batch.update(multimodal_data.image_inputs(
            canvas, list(images) + [images[-1]] * (rows - len(prompts)), vision.max_views,
            vision.image_size, (vision.image_size // vision.patch_size) ** 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.logical_rules(config)):
        batch = parallel.global_batch(host_batch, mesh)
        out = generate(params, model, batch["tokens"], batch["mask"], sampler, rng,
                       images=None if images is None else [batch[k] for k in IMAGE_FIELDS],
                       return_stats=True)
        generated = to_host(out.tokens)[:len(prompts), width:]
    seconds = time.perf_counter() - start
    stats = {"seconds": seconds, "forward_passes": int(out.num_forward_passes),
             "generated_tokens": len(prompts) * sampler.gen_length}
    return generated, stats


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathered when it spans several hosts)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def answer_ids(generated: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Generated ids up to (without) the first EOS or EoT."""
    out = []
    for i in generated:
        if int(i) in (tokenizer.eos_id, tokenizer.eot_id):
            break
        out.append(int(i))
    return out
