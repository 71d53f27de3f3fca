"""The generation API: a checkpoint on a mesh, prompts in, generated ids or text out.

`Generator.load` reads a params checkpoint (a trainer workdir or an imported HF checkpoint)
sharded on a mesh, with its tokenizer; `generate_ids` and `generate_text` run the one compiled
sampler over a batch of prompts of any lengths. Prompts are left-padded to a bucketed width and
the batch is filled up to a multiple of the mesh's batch axes, so a few compiled programs serve
every request. The launch programs (generate, chat, evaluate), the notebooks, the lm-eval model
and the server all call this module.

A `Generator` without a mesh (`mesh=None`: params as they are, e.g. fresh from training in a
test) runs the sampler on unsharded host arrays; with a mesh the batch is sharded over its batch
axes. LLaDA-V: `image_prompt` renders a conversation about images, and `generate_ids(images=...)`
lays the images' views over the sampler's canvas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from llada_jax import parallel
from llada_jax.data import multimodal_data
from llada_jax.data.schema import IMAGE_FIELDS
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.diffusion.sampler import SamplerConfig, StreamCallback, generate, pad_prompts
from llada_jax.interop import safetensors_io
from llada_jax.train import checkpoint, state


@dataclasses.dataclass
class GenerationOutput:
    """Generated ids [N, gen_length] (one row per prompt, padding rows dropped) and stats."""

    tokens: np.ndarray
    seconds: float
    forward_passes: int


def batch_rows(mesh: Any) -> int:
    """Rows a prompt batch must be a multiple of: the size of the mesh's batch axes (1 without
    a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape.get(a, 1) for a in parallel.BATCH_AXES)


def bucketed_width(longest: int, bucket: int, limit: int) -> int:
    """The padded prompt width: `longest` rounded up to a multiple of `bucket`, at most `limit`
    (but never below `longest`)."""
    if bucket <= 0:
        raise ValueError(f"prompt_bucket: expected a positive integer, found {bucket}")
    return max(longest, min(limit, -(-longest // bucket) * bucket))


def shard_batch(batch: dict[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    """The same whole batch on every process -> global arrays split over the mesh's batch axes.

    Each process places the rows of its own devices (on several hosts every process builds the
    same requests, so each holds every row; `parallel.global_batch` is for per-process slices).
    """
    return {name: safetensors_io.place(np.asarray(v), parallel.batch_sharding(mesh, np.ndim(v)))
            for name, v in batch.items()}


def answer_ids(generated: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Generated ids up to (without) the first EOS or EoT."""
    stops = (tokenizer.eos_id, tokenizer.eot_id)
    return [int(t) for t in itertools.takewhile(lambda t: int(t) not in stops, generated)]


@dataclasses.dataclass
class Generator:
    """A model, its params (sharded on `mesh`, or unsharded with `mesh=None`) and its
    tokenizer: what sampling needs."""

    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    mesh: Any

    @classmethod
    def load(cls, path: str, *, step: int | None = None, tokenizer: str | Tokenizer | None = None,
             mesh: Any = None, tokenizer_where: str | None = None) -> Generator:
        """Params of a checkpoint (trainer workdir, params directory or imported HF checkpoint)
        sharded on `mesh` (default: fsdp over every device), with `tokenizer` (a spec or a
        loaded one; default: the checkpoint's `config.data.tokenizer`). `tokenizer_where`: how
        a vocabulary mismatch names the tokenizer (e.g. the flag that chose it)."""
        mesh = parallel.make_mesh() if mesh is None else mesh
        config, params = checkpoint.load_params(path, step, mesh=mesh)
        return cls.from_params(config, params, mesh, tokenizer=tokenizer,
                               tokenizer_where=tokenizer_where)

    @classmethod
    def from_hf(cls, hf_dir: str, *, tokenizer: str | None = None, mesh: Any = None,
                param_dtype: str | None = None, dtype: str | None = None) -> Generator:
        """A Hugging Face LLaDA checkpoint directory, imported in memory (no conversion step).

        The config is the library defaults with the model section of its config.json; params
        are placed on `mesh` (default: fsdp over every device) by the project's rule table.
        `param_dtype`: the params' dtype (default: the checkpoint's); `dtype`: the compute dtype
        (default float32; 'bfloat16' on TPUs and GPUs). `tokenizer`: a spec; default `hf:hf_dir`,
        which needs its `tokenizer.json` (an export of a model trained with the built-in
        character tokenizer needs `tokenizer='char'`).
        """
        from llada_jax import config as config_lib
        from llada_jax.interop import hf

        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {hf_dir}")
        if tokenizer is None:
            if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
                raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; pass tokenizer= (e.g. "
                                        f"'char' or 'hf:DIR')")
            tokenizer = "hf:" + os.path.abspath(hf_dir)
        config = config_lib.default_config()
        mesh = parallel.make_mesh() if mesh is None else mesh
        # Placed by the default rule table: that of `config` (the library defaults).
        model_config, params = hf.import_hf(hf_dir, mesh=mesh, param_dtype=param_dtype,
                                            overrides=None if dtype is None else {"dtype": dtype})
        # A valid config: import_hf validated the model; the rest are the library defaults, with
        # train.seq_len kept within the model's length.
        config.model.update(dataclasses.asdict(model_config))
        config.data.tokenizer = tokenizer
        config.train.seq_len = min(config.train.seq_len, model_config.max_sequence_length)
        return cls.from_params(config, params, mesh, tokenizer=tokenizer)

    @classmethod
    def from_params(cls, config: ml_collections.ConfigDict, params: Any, mesh: Any = None, *,
                    tokenizer: str | Tokenizer | None = None,
                    tokenizer_where: str | None = None) -> Generator:
        """A generator over params already in memory (placed on `mesh`, or unsharded)."""
        if isinstance(tokenizer, Tokenizer):
            loaded, where = tokenizer, "the tokenizer"
        else:
            spec = tokenizer or config.data.tokenizer
            where = f"tokenizer {spec!r}" if tokenizer else \
                f"the checkpoint's tokenizer {spec!r} (config.data.tokenizer)"
            loaded = load_tokenizer(spec)
        if loaded.vocab_size > config.model.vocab_size:   # ids the model cannot embed
            raise ValueError(f"{tokenizer_where or where} has {loaded.vocab_size} ids but the "
                             f"model's vocab_size is {config.model.vocab_size}")
        return cls(config, state.make_model(config), params, loaded, mesh)

    def sampler(self, **overrides: Any) -> SamplerConfig:
        """The checkpoint's `config.sampler` with `overrides` and the tokenizer's EoT id."""
        return SamplerConfig.from_config(self.config, eot_id=self.tokenizer.eot_id,
                                         vocab_limit=self.tokenizer.vocab_size, **overrides)

    def max_prompt_length(self, sampler: SamplerConfig) -> int:
        return self.config.model.max_sequence_length - sampler.gen_length

    def check_prompt_length(self, sampler: SamplerConfig, length: int, where: str, *,
                            gen_length_name: str = "gen_length") -> None:
        """Raises ValueError naming the prompt (`where`) when it leaves no room for the answer
        (`gen_length_name`: how the hint names the setting, e.g. its flag)."""
        limit = self.max_prompt_length(sampler)
        if length > limit:
            raise ValueError(
                f"{where}: the prompt has {length} tokens, but the model's max_sequence_length="
                f"{self.config.model.max_sequence_length} leaves room for at most {limit} "
                f"beside gen_length={sampler.gen_length} (shorten the prompt or lower "
                f"{gen_length_name})")

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampler: SamplerConfig, *,
                     seed: int | Sequence[int] | jax.Array = 0,
                     images: Sequence[Any] | None = None,
                     prompt_bucket: int = 32, batch_size: int | None = None,
                     stream: StreamCallback | None = None,
                     stream_tag: int = 0) -> GenerationOutput:
        """Samples after each prompt (id lists); row i of the output answers prompt i.

        Prompts are left-padded to a multiple of `prompt_bucket` tokens (at most what the
        model's length allows) and the batch is filled up to `batch_size` rows (default: a
        multiple of the batch axes). `seed` is an int or a PRNG key for the batch, or one int
        per prompt: row i then samples as a lone call with seed[i] would. images (LLaDA-V): one
        `multimodal_data.EncodedConversation` per prompt (see `image_prompt`), whose
        placeholders the prompt ids hold. `stream`, `stream_tag`: the sampler's block
        streaming (`diffusion.sampler.generate`; its blocks hold every row, padding included).
        """
        count, rows = len(prompts), batch_rows(self.mesh)
        if batch_size is not None and (batch_size < count or batch_size % rows):
            raise ValueError(f"batch_size: expected a multiple of the mesh's batch axes ({rows} "
                             f"rows) holding {count} prompts, found {batch_size}")
        # Rows past the prompts repeat the last one (and image); their outputs are dropped.
        size = batch_size or -(-count // rows) * rows
        pad_id = self.tokenizer.pad_id
        tokens, mask = pad_prompts([*prompts, *prompts[-1:] * (size - count)], pad_id)
        width = bucketed_width(tokens.shape[1], prompt_bucket, self.max_prompt_length(sampler))
        left = ((0, 0), (width - tokens.shape[1], 0))
        tokens, mask = np.pad(tokens, left, constant_values=pad_id), np.pad(mask, left)
        if isinstance(seed, (list, tuple)):
            if len(seed) != count:
                raise ValueError(f"seed: expected one int or one per prompt ({count}), found "
                                 f"{len(seed)}")
            # One key per row, each `jax.random.key(seed[i])` (int64 as key() reads a Python int).
            rng = jax.vmap(jax.random.key)(np.asarray([*seed, *[0] * (size - count)], np.int64))
        else:
            rng = jax.random.key(seed) if isinstance(seed, int) else seed
        host_batch = {"tokens": tokens, "mask": mask}
        if images is not None:
            if len(images) != count:
                raise ValueError(f"images: expected one per prompt ({count}), found "
                                 f"{len(images)}")
            # LLaDA-V: the images laid over the sampler's canvas (the prompt, then the masks).
            canvas = np.pad(tokens, ((0, 0), (0, sampler.gen_length)),
                            constant_values=sampler.mask_id)
            vision = self.config.vision
            host_batch.update(multimodal_data.image_inputs(
                canvas, [*images, *images[-1:] * (size - count)], vision.max_views,
                vision.image_size, (vision.image_size // vision.patch_size) ** 2))
        start = time.perf_counter()
        with self.mesh_context():
            batch = host_batch if self.mesh is None else shard_batch(host_batch, self.mesh)
            out = generate(self.params, self.model, batch["tokens"], batch["mask"], sampler, rng,
                           images=None if images is None else [batch[k] for k in IMAGE_FIELDS],
                           return_stats=True, stream=stream, stream_tag=stream_tag)
            generated = safetensors_io.to_host(out.tokens)[:count, width:]
        return GenerationOutput(generated, time.perf_counter() - start,
                                int(out.num_forward_passes))

    def mesh_context(self) -> contextlib.AbstractContextManager:
        """The mesh and the logical-axis rules every call runs under (nothing without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(parallel.logical_rules(self.config)))
        return stack

    def image_prompt(self, messages: str | Sequence[dict], images: Sequence[Any]) -> Any:
        """LLaDA-V: a conversation about `images` (paths, PIL images or uint8 [H, W, 3]) rendered
        up to the assistant header, as a `multimodal_data.EncodedConversation` (its `ids` hold
        the images' placeholder positions). A string is one user turn; the first user message
        gets `<image>\\n` before its text unless it places `<image>` itself."""
        if not self.config.vision.enabled:
            raise ValueError("images need a LLaDA-V checkpoint (its config has "
                             "vision.enabled=False)")
        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else \
            [dict(m) for m in messages]
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("image_prompt: the conversation has no user message to attach the "
                             "image to")
        if multimodal_data.IMAGE_MARK not in first_user["content"]:
            first_user["content"] = multimodal_data.IMAGE_MARK + "\n" + first_user["content"]
        # How the checkpoint turns images into views, and its conversation template.
        processor = multimodal_data.ImageProcessor.from_config(self.config)
        return multimodal_data.encode_conversation(messages, list(images), self.tokenizer,
                                                   processor, add_generation_prompt=True)

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

    def decode_answer(self, generated: Sequence[int]) -> str:
        """The text of generated ids up to their first EOS / EoT."""
        return self.tokenizer.decode(answer_ids(generated, self.tokenizer))

    def generate_text(self, prompts: Sequence[str | Sequence[dict]],
                      sampler: SamplerConfig | None = None, *, chat: bool = False,
                      seed: int = 0, prompt_bucket: int = 32,
                      images: Sequence[Any] | None = None) -> list[str]:
        """Completions of `prompts`, each cut at its first EOS / EoT (see `encode_prompt`).

        images (LLaDA-V): one image per prompt; each prompt (a question or a conversation) is
        then rendered by `image_prompt` about its image.
        """
        if isinstance(prompts, (str, dict)):
            raise ValueError("prompts: expected a list of prompts, found a single one; wrap it "
                             "in a list")
        sampler = sampler or self.sampler()
        if images is None:
            encoded, ids = None, [self.encode_prompt(p, chat=chat) for p in prompts]
        else:
            if len(images) != len(prompts):
                raise ValueError(f"images: expected one per prompt ({len(prompts)}), found "
                                 f"{len(images)}")
            encoded = [self.image_prompt(p, [image])
                       for p, image in zip(prompts, images, strict=True)]
            ids = [conversation.ids for conversation in encoded]
        for i, row in enumerate(ids):
            self.check_prompt_length(sampler, len(row), f"prompt {i}")
        out = self.generate_ids(ids, sampler, seed=seed, prompt_bucket=prompt_bucket,
                                images=encoded)
        return [self.decode_answer(row) for row in out.tokens]
