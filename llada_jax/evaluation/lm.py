"""The lm-evaluation-harness model of this project, registered as ``llada_jax``.

    lm_eval --model llada_jax --model_args checkpoint=/ckpt/llada,mc_num=128,cfg=0.5 \
        --tasks arc_challenge     (or launch/evaluate.py --tasks=arc_challenge)

* `loglikelihood(context, continuation)`: the Monte Carlo estimate of REFERENCE.md section 4
  (`diffusion.likelihood.elbo_estimate`: `mc_num` samples in Monte Carlo batches of
  `mc_batch_size`, stratified mask counts, optional CFG), context and continuation tokenised
  jointly the official way (`data.eval_records.encode_pair`). A one-token continuation is scored
  by a single forward pass: every Monte Carlo row then masks exactly that token with weight
  L / n = 1, so all `mc_num` samples are the same exact log-probability and one pass gives it.
  The "is greedy" flag is always False, like the official evaluation with is_check_greedy=False
  (no published number uses it).
* `loglikelihood_rolling(text)`: the ELBO of the whole text (the continuation of an empty
  context, or of BOS with `add_bos`), in disjoint windows of the model's length when longer.
* `generate_until(context, gen_kwargs)`: the project's sampler (every mode of `SamplerConfig`:
  semi-AR blocks, CFG, prefix/dual cache, threshold/factor decoding, early exit); the generated
  ids are cut at the first EOS / EoT, decoded, then cut at the first stop sequence. The
  generation length is `gen_length` when set (the official evaluation's fixed length), else the
  request's `max_gen_toks` rounded up to the block length (steps scaled in proportion).

Batching: each request is packed alone to widths rounded up to `pad_multiple` (likelihood) or
`prompt_bucket` (generation); requests with the same widths share one compiled program and run
`pairs_per_call` / `gen_batch_size` at a time, sorted by length. A likelihood request draws its
Monte Carlo noise from its own key (the seed folded with a hash of its token ids), so its estimate
does not depend on which other requests share its batch or on their order. (Generation at
temperature 0 is deterministic; at T > 0 one key serves a batch.)

Devices: the model holds a `generation.Generator`. Loaded from a checkpoint, the params are
sharded on `mesh` (default: fsdp over every device); likelihood and generation batches are then
a multiple of the mesh's batch axes (`pairs_per_call` and `gen_batch_size` are rounded up) and
split over them. Given `params` without a mesh (tests, the trainer's evaluators), arrays stay
unsharded.

Chat templates: lm-eval's `--apply_chat_template` calls `apply_chat_template`, which renders the
LLaDA chat template as text (the released template's output); `encode` reads the special-token
strings of such a context back as their ids. (`chat=true` is this model's own simpler path: each
context becomes one user turn.)

Finished requests go to a `RequestCache` (JSONL, keyed by request hash and a fingerprint of the
settings): an interrupted evaluation resumes without recomputing them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llada_jax.data.eval_records import encode_pair
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.diffusion.likelihood import elbo_estimate, pack_pairs
from llada_jax.diffusion.sampler import SamplerConfig
from llada_jax.evaluation.batching import bucketed_batches, padded_size, round_up
from llada_jax.evaluation.cache import RequestCache, request_key
from llada_jax.generation import Generator, batch_rows, shard_batch
from llada_jax.interop.safetensors_io import to_host

# Sampler fields a model argument may set (the rest come from the checkpoint's config.sampler).
SAMPLER_FIELDS = ("gen_length", "block_length", "steps", "temperature", "remasking",
                  "logits_eos_inf", "confidence_eos_eot_inf", "cache", "refresh_every",
                  "threshold", "factor", "early_exit")


def pair_rng(seed: int, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> jax.Array:
    """The key a (context, continuation) pair's estimate is drawn from: `key(seed)` folded with
    a 31-bit hash of its ids (the same in every batch, order and process)."""
    digest = hashlib.sha256(json.dumps([list(map(int, context_ids)),
                                        list(map(int, continuation_ids))]).encode()).digest()
    return jax.random.fold_in(jax.random.key(seed), int.from_bytes(digest[:4], "little") >> 1)


@functools.partial(jax.jit, static_argnames=("model", "mc_num", "batch_size", "cfg_scale",
                                             "mask_id"))
def _pair_estimates(params, tokens, attention_mask, positions, answer_mask, keys, *, model,
                    mc_num, batch_size, cfg_scale, mask_id):
    """Estimates [P] of P pairs [P, L], each from its own key (raw key data [P, 2]; vmapped, so
    independent)."""
    forward = functools.partial(model.apply, {"params": params})
    keys = jax.random.wrap_key_data(keys)

    def one(t, m, pos, a, key):
        return elbo_estimate(forward, t[None], m[None], pos[None], a[None], key, mc_num=mc_num,
                             batch_size=batch_size, cfg_scale=cfg_scale, mask_id=mask_id)[0]

    return jax.vmap(one)(tokens, attention_mask, positions, answer_mask, keys)


def _as_bool(value: Any, name: str) -> bool:
    # str() of True/False/1/0 and of their spellings on the command line.
    if isinstance(value, (bool, int, str)) and str(value).lower() in ("true", "false", "1", "0"):
        return str(value).lower() in ("true", "1")
    raise ValueError(f"llada_jax model argument {name}: expected true or false, found {value!r}")


@register_model("llada_jax")
class LladaJaxLM(LM):
    """lm-eval model over a checkpoint of this project (see the module docstring).

    Give `checkpoint` (a params checkpoint, trainer workdir or imported HF checkpoint directory
    made by `launch/convert.py`), or `params` + `config` directly (tests, the trainer's
    evaluators). `tokenizer` is a spec for `load_tokenizer` or a `Tokenizer` (default: the
    config's `data.tokenizer`). `batch_size` from the lm-eval command line means the Monte Carlo
    batch, as in the official LLaDA evaluation.
    """

    def __init__(self, checkpoint: str | None = None, step: int | None = None, *,
                 params: Any = None, config: Any = None, tokenizer: str | Tokenizer | None = None,
                 mc_num: int = 128, mc_batch_size: int | None = None, cfg: float = 0.0,
                 add_bos: bool = False, chat: bool = False, pairs_per_call: int = 8,
                 pad_multiple: int = 16, gen_batch_size: int = 8, prompt_bucket: int = 32,
                 seed: int = 0, cache_path: str | None = None, progress: bool = True,
                 mesh: Any = None, batch_size: int | str | None = None,
                 **sampler_overrides: Any) -> None:
        super().__init__()
        for ignored in ("max_batch_size", "device"):   # lm-eval passes these to every model
            sampler_overrides.pop(ignored, None)
        unknown = sorted(set(sampler_overrides) - set(SAMPLER_FIELDS))
        if unknown:
            raise ValueError(f"llada_jax model arguments {unknown} are unknown; expected "
                             f"checkpoint, step, tokenizer, mc_num, mc_batch_size, cfg, add_bos, "
                             f"chat, pairs_per_call, pad_multiple, gen_batch_size, "
                             f"prompt_bucket, seed, cache_path or a sampler field "
                             f"{list(SAMPLER_FIELDS)}")
        if checkpoint is None and (params is None or config is None):
            raise ValueError("llada_jax model: give checkpoint=<directory>, or params and config")
        if mc_batch_size is None:
            mc_batch_size = 16 if batch_size in (None, "auto") else int(batch_size)
        mc_num, mc_batch_size = int(mc_num), int(mc_batch_size)
        if mc_num <= 0 or mc_batch_size <= 0:
            raise ValueError(f"llada_jax model: mc_num={mc_num} and mc_batch_size="
                             f"{mc_batch_size} must be positive integers")
        mc_batch_size = min(mc_batch_size, mc_num)
        if mc_num % mc_batch_size:
            raise ValueError(f"llada_jax model: mc_num={mc_num} must be a multiple of "
                             f"mc_batch_size={mc_batch_size} (stratified counts are per batch)")
        for name, value in dict(pairs_per_call=pairs_per_call, pad_multiple=pad_multiple,
                                gen_batch_size=gen_batch_size, prompt_bucket=prompt_bucket).items():
            if int(value) <= 0:
                raise ValueError(f"llada_jax model argument {name}: expected a positive "
                                 f"integer, found {value}")
        if float(cfg) < 0:
            raise ValueError(f"llada_jax model argument cfg: expected >= 0, found {cfg}")
        if checkpoint is not None:   # params sharded on `mesh` (default: every device)
            self.generator = Generator.load(str(checkpoint), step=step, tokenizer=tokenizer,
                                            mesh=mesh)
        else:                        # params as given; sharded batches only with a mesh
            self.generator = Generator.from_params(config, params, mesh, tokenizer=tokenizer)
        self.config, self.params = self.generator.config, self.generator.params
        self.model, self.tokenizer = self.generator.model, self.generator.tokenizer
        if self.tokenizer.pad_id == self.config.model.mask_token_id:
            raise ValueError(f"llada_jax model: the tokenizer's pad id {self.tokenizer.pad_id} "
                             f"equals the mask id; padding would be read as masks")
        # Every batch fills the mesh's batch axes: its rows are a multiple of their size.
        self.row_multiple = batch_rows(self.generator.mesh)
        self.pairs_per_call = round_up(int(pairs_per_call), self.row_multiple)
        self.gen_batch_size = round_up(int(gen_batch_size), self.row_multiple)
        self.mc_num, self.mc_batch_size, self.cfg = mc_num, mc_batch_size, float(cfg)
        self.add_bos, self.chat = _as_bool(add_bos, "add_bos"), _as_bool(chat, "chat")
        self.prefix = [self.tokenizer.bos_id] if self.add_bos else []   # starts every context
        self.pad_multiple, self.prompt_bucket = int(pad_multiple), int(prompt_bucket)
        self.seed, self.progress = int(seed), _as_bool(progress, "progress")
        self.max_length = int(self.config.model.max_sequence_length)
        sampler_overrides = {k: (_as_bool(v, k) if isinstance(
            getattr(SamplerConfig, k, None), bool) else v) for k, v in sampler_overrides.items()}
        self.fixed_gen_length = "gen_length" in sampler_overrides
        self.sampler = self.generator.sampler(cfg_scale=self.cfg, **sampler_overrides)
        self.fingerprint = json.dumps({
            "checkpoint": str(checkpoint), "step": step, "mc_num": mc_num,
            "mc_batch_size": mc_batch_size, "cfg": self.cfg, "add_bos": self.add_bos,
            "chat": self.chat, "seed": self.seed,
            "sampler": dataclasses.asdict(self.sampler) | {"fixed": self.fixed_gen_length}},
            sort_keys=True, default=str)
        self.request_cache = RequestCache(cache_path)
        self.model_calls = 0   # compiled-program invocations (tests count them)
        self._tokenizer_name = (tokenizer if isinstance(tokenizer, str) else
                                self.config.data.tokenizer if tokenizer is None else
                                type(tokenizer).__name__)
        # How `encode` finds special tokens: not at all when the tokenizer parses them itself.
        self._special_by_text = {self.tokenizer.decode([i], skip_special=False): i
                                 for i in sorted(self.tokenizer.special_ids)}
        eot = self.tokenizer.decode([self.tokenizer.eot_id], skip_special=False)
        texts = sorted(self._special_by_text, key=len, reverse=True)
        self._special_pattern = None if self.tokenizer.encode(eot) == [self.tokenizer.eot_id] \
            else re.compile("(" + "|".join(map(re.escape, texts)) + ")")

    # ----------------------------------------------------------------- shared machinery
    def _run_cached(self, kind: str, requests: list, prepare: Callable[[Any], Any],
                    length_of: Callable[[Any], int], bucket_of: Callable[[Any], Any],
                    batch_size: int, run_batch: Callable[[Any, list], list]) -> list:
        """Results of `requests` (cached ones read back, the others computed bucket by bucket;
        each finished batch is written to the cache at once)."""
        keys = [request_key(kind, json.loads(json.dumps(r.args, default=str)), self.fingerprint)
                for r in requests]
        results: list = [self.request_cache.get(key) for key in keys]
        # No result is None (they are lists, floats and strings): None means "not cached".
        todo = [i for i, result in enumerate(results) if result is None]
        prepared = [prepare(requests[i]) for i in todo]
        done, start = len(requests) - len(todo), time.perf_counter()
        for bucket, members in bucketed_batches(prepared, bucket_of, length_of, batch_size):
            outputs = run_batch(bucket, [prepared[m] for m in members])
            for m, output in zip(members, outputs, strict=True):
                results[todo[m]] = output
            self.request_cache.put_many([(keys[todo[m]], results[todo[m]]) for m in members])
            done += len(members)
            if self.progress:
                elapsed, left = time.perf_counter() - start, len(requests) - done
                rate = (len(todo) - left) / elapsed if elapsed > 0 else 0.0
                eta = left / rate if rate > 0 else float("nan")
                print(f"{kind}: {done}/{len(requests)} requests, {rate:.2f} requests/s, ETA "
                      f"{eta:.0f} s", file=sys.stderr, flush=True)
        # A likelihood result is stored as a JSON list [log-likelihood, is_greedy].
        values = [tuple(r) if kind == "loglikelihood" else r for r in results]
        for request, value in zip(requests, values, strict=True):
            self.cache_hook.add_partial(kind, request.args, value)
        return values

    # ----------------------------------------------------------------- likelihood
    def encode(self, text: str) -> list[int]:
        """Ids of `text`. Special-token strings in it (a context rendered by
        `apply_chat_template`) become their ids, as a Hugging Face tokenizer parses them."""
        if self._special_pattern is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self._special_by_text[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    # ----------------------------------------------------------------- chat templates
    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """lm-eval's `--apply_chat_template`: the conversation in the LLaDA chat template as
        text (BOS, each turn `<|start_header_id|>role<|end_header_id|>\\n\\n` + trimmed
        content + `<|eot_id|>`, then the open assistant header), which `encode` reads back."""
        ids = self.tokenizer.render_chat(chat_history,
                                         add_generation_prompt=add_generation_prompt)
        return self.tokenizer.decode(ids, skip_special=False)

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records: the tokenizer's own (Hugging Face) or the built-in
        rendering of the LLaDA format."""
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.tokenizer, "chat_template", None) or "llada_jax render_chat"

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.chat:
            return (self.generator.encode_prompt(context, chat=True),
                    self.tokenizer.encode(continuation))
        # `encode_pair` needs an object with `encode`: this model's special-aware one.
        context_ids, continuation_ids = encode_pair(self, context, continuation,
                                                    where=f"request {context[-40:]!r}")
        return self.prefix + context_ids, continuation_ids

    def _likelihood_bucket(self, pair: tuple[list[int], list[int]]) -> tuple[int, int, bool]:
        context_ids, continuation_ids = pair
        return (round_up(len(context_ids), self.pad_multiple),
                round_up(len(continuation_ids), self.pad_multiple), len(continuation_ids) == 1)

    def _estimate_pairs(self, bucket: tuple[int, int, bool],
                        pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        width_p, width_a, single = bucket
        if width_p + width_a > self.max_length:
            longest = max(len(p) + len(a) for p, a in pairs)
            raise ValueError(f"loglikelihood: a context + continuation of {longest} tokens "
                             f"(padded to {width_p + width_a}) exceeds the model's "
                             f"max_sequence_length={self.max_length}")
        size = padded_size(len(pairs), self.pairs_per_call, self.row_multiple)
        rows = pairs + [pairs[-1]] * (size - len(pairs))   # padding rows repeat the last pair
        # One bucket: every context (answer) rounds up to the same width, so one pack fits all.
        arrays = pack_pairs(*zip(*rows, strict=True), self.tokenizer.pad_id, self.pad_multiple)
        # pair_rng then fold_in(., 0): the key `log_likelihood` would use for this pair alone.
        arrays["keys"] = np.stack([jax.random.key_data(jax.random.fold_in(pair_rng(
            self.seed, p, a), 0)) for p, a in rows])
        mc_num, mc_batch = (1, 1) if single else (self.mc_num, self.mc_batch_size)
        self.model_calls += 1
        with self.generator.mesh_context():
            if self.generator.mesh is not None:   # rows split over the mesh's batch axes
                arrays = shard_batch(arrays, self.generator.mesh)
            # `arrays` holds exactly the pair fields: tokens, attention_mask, positions,
            # answer_mask and keys.
            out = _pair_estimates(self.params, **arrays, model=self.model, mc_num=mc_num,
                                  batch_size=mc_batch, cfg_scale=self.cfg,
                                  mask_id=int(self.config.model.mask_token_id))
            return [float(v) for v in to_host(out)[:len(pairs)]]

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        return self._run_cached(
            "loglikelihood", requests, lambda r: self._pair(*r.args),
            lambda pair: len(pair[0]) + len(pair[1]), self._likelihood_bucket,
            self.pairs_per_call,
            lambda bucket, pairs: [[v, False] for v in self._estimate_pairs(bucket, pairs)])

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        def windows(request) -> list[tuple[list[int], list[int]]]:
            ids = self.encode(request.args[0])
            room = self.max_length - round_up(len(self.prefix), self.pad_multiple)
            room -= room % self.pad_multiple
            if room <= 0:
                raise ValueError(f"loglikelihood_rolling: max_sequence_length="
                                 f"{self.max_length} leaves no room for text")
            return [(self.prefix, ids[s:s + room]) for s in range(0, len(ids), room)]

        def run(bucket, items):
            flat = [w for windows_of in items for w in windows_of]
            scores = [0.0] * len(flat)
            for b, members in bucketed_batches(flat, self._likelihood_bucket,
                                               lambda w: len(w[1]), self.pairs_per_call):
                for m, score in zip(members, self._estimate_pairs(b, [flat[m] for m in members]),
                                    strict=True):
                    scores[m] = score
            consecutive = iter(scores)   # each request's windows, in order
            return [float(sum(itertools.islice(consecutive, len(w)))) for w in items]

        return self._run_cached("loglikelihood_rolling", requests, windows,
                                lambda w: sum(len(a) for _, a in w), lambda w: 0,
                                self.pairs_per_call, run)

    # ----------------------------------------------------------------- generation
    def sampler_for(self, max_gen_toks: int | None) -> SamplerConfig:
        """The sampler of one request: the fixed `gen_length`, or `max_gen_toks` rounded up to
        the block length with the steps scaled by the same factor."""
        base = self.sampler
        if self.fixed_gen_length or not max_gen_toks:
            return base
        gen_length = round_up(int(max_gen_toks), base.block_length)
        num_blocks = gen_length // base.block_length
        steps = round_up(-(-gen_length * base.steps // base.gen_length), num_blocks)
        return dataclasses.replace(base, gen_length=gen_length, steps=steps)

    def _prompt(self, request) -> tuple[list[int], SamplerConfig, list[str]]:
        context, gen_kwargs = request.args
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
        ids = (self.generator.encode_prompt(context, chat=True) if self.chat
               else self.prefix + self.encode(context))
        if not ids:
            raise ValueError(f"generate_until: the context {context[:40]!r} has no tokens "
                             f"(set add_bos=true for empty contexts)")
        return ids, self.sampler_for(gen_kwargs.get("max_gen_toks")), until

    def _generate_batch(self, bucket: tuple[int, SamplerConfig], items: list) -> list[str]:
        _, sampler = bucket
        size = padded_size(len(items), self.gen_batch_size, self.row_multiple)
        rng = pair_rng(self.seed, items[0][0], [sampler.gen_length])
        self.model_calls += 1
        out = self.generator.generate_ids([ids for ids, _, _ in items], sampler, seed=rng,
                                          prompt_bucket=self.prompt_bucket, batch_size=size)
        texts = []
        for generated, (_, _, until) in zip(out.tokens, items, strict=True):
            text = self.generator.decode_answer(generated)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts

    def generate_until(self, requests: list) -> list[str]:
        return self._run_cached(
            "generate_until", requests, self._prompt, lambda item: len(item[0]),
            lambda item: (round_up(len(item[0]), self.prompt_bucket), item[1]),
            self.gen_batch_size, self._generate_batch)
