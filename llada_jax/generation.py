"""The generation API: a checkpoint on a mesh, prompts in, generated ids or text out.

`Generator.load` reads a params checkpoint (a trainer workdir or an imported HF checkpoint)
sharded on a mesh, with its tokenizer; `generate_ids` and `generate_text` run the one compiled
sampler over a batch of prompts of any lengths. Prompts are left-padded to a bucketed width and
the batch is filled up to a multiple of the mesh's batch axes, so a few compiled programs serve
every request. The launch programs (generate, chat, evaluate), the notebooks, the lm-eval model
and the server all call this module.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from llada_jax import parallel
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.diffusion.sampler import SamplerConfig, generate, pad_prompts
from llada_jax.train import checkpoint, state


@dataclasses.dataclass
class GenerationOutput:
    """Generated ids [N, gen_length] (one row per prompt, padding rows dropped) and stats."""

    tokens: np.ndarray
    seconds: float
    forward_passes: int

    @property
    def generated_tokens(self) -> int:
        return int(self.tokens.size)


def batch_rows(mesh: Any) -> int:
    """Rows a prompt batch must be a multiple of: the size of the mesh's batch axes."""
    return int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.shape]))


def bucketed_width(longest: int, bucket: int, limit: int) -> int:
    """The padded prompt width: `longest` rounded up to a multiple of `bucket`, at most `limit`
    (but never below `longest`)."""
    if bucket <= 0:
        raise ValueError(f"prompt_bucket: expected a positive integer, found {bucket}")
    return max(longest, min(limit, -(-longest // bucket) * bucket))


def prompt_batch(prompts: Sequence[Sequence[int]], pad_id: int, *, rows_multiple: int = 1,
                 width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (tokens int32 [R, W], mask bool [R, W]) of id lists.

    W is `width` (default: the longest prompt). R is len(prompts) rounded up to a multiple of
    `rows_multiple`; the extra rows repeat the last prompt (callers drop their outputs).
    """
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, found none")
    tokens, mask = pad_prompts(prompts, pad_id)
    width = tokens.shape[1] if width is None else width
    if width < tokens.shape[1]:
        raise ValueError(f"prompt_batch: width={width} is shorter than the longest prompt "
                         f"({tokens.shape[1]} tokens)")
    rows = -(-len(prompts) // rows_multiple) * rows_multiple
    out_tokens = np.full((rows, width), pad_id, np.int32)
    out_mask = np.zeros((rows, width), bool)
    out_tokens[:len(prompts), width - tokens.shape[1]:] = tokens
    out_mask[:len(prompts), width - tokens.shape[1]:] = mask
    out_tokens[len(prompts):] = out_tokens[len(prompts) - 1]
    out_mask[len(prompts):] = out_mask[len(prompts) - 1]
    return out_tokens, out_mask


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathered when it spans several hosts)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def answer_ids(generated: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Generated ids up to (without) the first EOS or EoT."""
    out = []
    for token in generated:
        if int(token) in (tokenizer.eos_id, tokenizer.eot_id):
            break
        out.append(int(token))
    return out


@dataclasses.dataclass
class Generator:
    """A model, its params sharded on `mesh`, and its tokenizer: what sampling needs."""

    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    mesh: Any

    @classmethod
    def load(cls, path: str, *, step: int | None = None, tokenizer: str | None = None,
             mesh: Any = None) -> Generator:
        """Params of a checkpoint (trainer workdir or params directory) sharded on `mesh`
        (default: fsdp over every device), with `tokenizer` (default: the checkpoint's
        `config.data.tokenizer`)."""
        if mesh is None:
            mesh_config = ml_collections.ConfigDict({"mesh": {
                "data": 1, "fsdp": -1, "expert": 1, "tensor": 1}})
            mesh = parallel.make_mesh(mesh_config)
        config, params = checkpoint.load_params(path, step, mesh=mesh)
        spec = tokenizer or config.data.tokenizer
        loaded = load_tokenizer(spec)
        if loaded.vocab_size > config.model.vocab_size:
            where = f"tokenizer {spec!r}"
            raise ValueError(f"{where} has {loaded.vocab_size} ids but the model's vocab_size "
                             f"is {config.model.vocab_size}")
        return cls(config, state.make_model(config), params, loaded, mesh)

    def sampler(self, **overrides: Any) -> SamplerConfig:
        """The checkpoint's `config.sampler` with `overrides` and the tokenizer's EoT id."""
        return SamplerConfig.from_config(self.config, eot_id=self.tokenizer.eot_id,
                                         vocab_limit=self.tokenizer.vocab_size, **overrides)

    def max_prompt_length(self, sampler: SamplerConfig) -> int:
        return self.config.model.max_sequence_length - sampler.gen_length

    def check_prompt_length(self, sampler: SamplerConfig, length: int, where: str) -> None:
        """Raises ValueError naming the prompt (`where`) when it leaves no room for the answer."""
        limit = self.max_prompt_length(sampler)
        if length > limit:
            raise ValueError(
                f"{where}: the prompt has {length} tokens, but the model's max_sequence_length="
                f"{self.config.model.max_sequence_length} leaves room for at most {limit} "
                f"beside gen_length={sampler.gen_length} (shorten the prompt or lower "
                f"gen_length)")

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampler: SamplerConfig, *,
                     seed: int | jax.Array = 0, images: Sequence[Any] | None = None,
                     prompt_bucket: int = 32) -> GenerationOutput:
        """Samples after each prompt (id lists); row i of the output answers prompt i.

        Prompts are left-padded to a multiple of `prompt_bucket` tokens (at most what the
        model's length allows) and the batch is filled up to a multiple of the batch axes.
        `seed` is an int or a PRNG key. images (LLaDA-V): one
        `multimodal_data.EncodedConversation` per prompt, whose placeholders the prompt ids
        hold.
        """
        count = len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        width = bucketed_width(longest, prompt_bucket, self.max_prompt_length(sampler))
        tokens, mask = prompt_batch(prompts, self.tokenizer.pad_id,
                                    rows_multiple=batch_rows(self.mesh), width=width)
        rng = jax.random.key(seed) if isinstance(seed, int) else seed
        host_batch = {"tokens": tokens, "mask": mask}
        if images is not None:
            from llada_jax.data import multimodal_data
            from llada_jax.model.multimodal import IMAGE_FIELDS

            if len(images) != count:
                raise ValueError(f"images: expected one per prompt ({count}), found "
                                 f"{len(images)}")
            canvas = np.concatenate(
                [tokens, np.full((len(tokens), sampler.gen_length), sampler.mask_id, np.int32)],
                1)
            vision = self.config.vision
            host_batch.update(multimodal_data.image_inputs(
                canvas, list(images) + [images[-1]] * (len(tokens) - count), vision.max_views,
                vision.image_size, (vision.image_size // vision.patch_size) ** 2))
        start = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(parallel.logical_rules(self.config)):
            batch = parallel.global_batch(host_batch, self.mesh)
            out = generate(self.params, self.model, batch["tokens"], batch["mask"], sampler, rng,
                           images=None if images is None else [batch[k] for k in IMAGE_FIELDS],
                           return_stats=True)
            generated = to_host(out.tokens)[:count, width:]
        return GenerationOutput(generated, time.perf_counter() - start,
                                int(out.num_forward_passes))

    def encode_prompt(self, prompt: str | Sequence[dict], *, chat: bool) -> list[int]:
        """Prompt ids: with `chat`, a string is one user turn and a list of
        `{"role", "content"}` dicts a conversation, rendered up to the assistant header;
        otherwise BOS + the encoded string (as pre-training documents start)."""
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
                else list(prompt)
            return self.tokenizer.render_chat(messages, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise ValueError(f"prompts: plain prompts must be strings, found {prompt!r} "
                             f"(pass chat=True for conversations)")
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def generate_text(self, prompts: Sequence[str | Sequence[dict]],
                      sampler: SamplerConfig | None = None, *, chat: bool = False,
                      seed: int = 0, prompt_bucket: int = 32) -> list[str]:
        """Completions of `prompts`, each cut at its first EOS / EoT (see `encode_prompt`)."""
        if isinstance(prompts, (str, dict)):
            raise ValueError("prompts: expected a list of prompts, found a single one; wrap it "
                             "in a list")
        sampler = sampler or self.sampler()
        ids = [self.encode_prompt(p, chat=chat) for p in prompts]
        for i, row in enumerate(ids):
            self.check_prompt_length(sampler, len(row), f"prompt {i}")
        out = self.generate_ids(ids, sampler, seed=seed, prompt_bucket=prompt_bucket)
        return [self.tokenizer.decode(answer_ids(row, self.tokenizer)) for row in out.tokens]
