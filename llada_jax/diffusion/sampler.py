"""The reverse process of masked diffusion: generating text from a LLaDA mask predictor.

What it does (REFERENCE.md section 3): start from `[prompt | MASK * gen_length]`, split the
generated part into blocks (semi-autoregressive when there are several), and at every step ask
the model for logits, draw a candidate token for every masked position of the current block
(Gumbel-max at temperature T, argmax at T = 0), score the candidates (probability of the
candidate, or uniform noise) and commit the most confident ones. The whole process is ONE jitted
program: `lax.while_loop`s over blocks and steps, static shapes, no Python loop per step, block or
row, so it runs unchanged with the batch sharded over ('data', 'fsdp') under `jax.set_mesh` and
`nn.logical_axis_rules`.

How many tokens a step commits:
  * fixed schedule (the reference): with `m` masks in a block and `s = steps / num_blocks` steps
    per block, `m // s` per step and one more in the first `m % s` steps (`num_transfer_tokens`);
  * `threshold`: every candidate of the block with confidence >= threshold, at least the single
    most confident one;
  * `factor`: the largest `n` whose k-th highest confidence is >= 1 - factor / (k + 1) for every
    k <= n, at least one.
Ties in confidence are broken toward the lower position (a stable sort), so results are exactly
reproducible. The mask token itself is never a candidate (the reference allows it, which leaves a
position masked after its commit; trained models give it ~0 probability).

Fast sampling (REFERENCE.md section 6): with `cache='prefix'` a full pass at the start of each
block stores keys/values of every position, and the block's later steps compute only a window
that starts at (or somewhat before) the block and runs to the end; with `cache='dual'` the window
is the current block alone and everything else comes from the cache. `refresh_every=n` repeats the
full pass every n steps of a block. `early_exit` stops the whole batch once every row holds an EOS
(or, with `stop_at_eot`, an `<|eot_id|>`) with nothing masked before it (such a row's answer is
final); the positions after it are returned as EOS, which is how the answer decodes anyway.
`banned_ids` are never candidates (LLaDA-V bans EOS, BOS and the header ids and stops on EoT).

Batches of prompts of different lengths are LEFT-padded with a key-padding mask; positions are
`cumsum(mask) - 1`, so a row's result does not depend on the rest of the batch.

The model enters as a `forward` function with `Transformer.__call__`'s keyword interface
(`forward(tokens, attention_mask=, positions=, kv_cache=, cache_index=, return_kv=)`); `generate`
builds it from params and a `Transformer`, or, given `images`, from a LLaDA-V model with
`multimodal.image_conditioned_forward` (image tokens computed once, spliced at every pass).

This module does not tokenize, load checkpoints or print: see `launch/generate.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llada_jax.config import validate_sampler

# forward(tokens [R, Lw], *, attention_mask [R, L] bool, positions [R, Lw] int, kv_cache=None,
#         cache_index=None, return_kv=False) -> logits [R, Lw, V] (or (logits, KVCache)).
Forward = Callable[..., Any]

# Confidence given to EOS / EoT candidates under `confidence_eos_eot_inf`: below every real
# confidence (probabilities and uniform draws are >= 0) but above the -inf of positions that
# cannot be committed at all, so EOS is committed only when nothing else in the block is left.
_EOS_CONFIDENCE = float(np.finfo(np.float32).min)

# Prefix cache: windows [start, end) are rounded up so that at most this many distinct window
# lengths (each its own compiled loop) exist; the cost is at most one window quantum of extra work.
_MAX_PREFIX_WINDOW_LENGTHS = 4


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Settings of the reverse process (the `sampler` config section plus the token ids).

    `threshold` / `factor` > 0 switch from the fixed step schedule to parallel decoding (then
    `steps` is not used). `eot_id < 0` means there is no end-of-turn token. `vocab_limit > 0`
    restricts candidates to ids below it (the tokenizer's size, when the embedding is padded).
    `banned_ids` are never candidates; `stop_at_eot` lets early exit finish a row on EoT too.
    """

    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    cache: str = "none"
    refresh_every: int = 0
    threshold: float = 0.0
    factor: float = 0.0
    early_exit: bool = False
    mask_id: int = 126336
    eos_id: int = 126081
    eot_id: int = 126348
    vocab_limit: int = 0
    banned_ids: tuple[int, ...] = ()
    stop_at_eot: bool = False

    def __post_init__(self):
        validate_sampler(self, prefix="sampler")
        if self.stop_at_eot and self.eot_id < 0:
            raise ValueError("config.sampler.stop_at_eot: expected False when there is no EoT id "
                             "(sampler.eot_token_id and the tokenizer give none), found True")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that finish a row for early exit: EOS, and EoT with `stop_at_eot`."""
        return (self.eos_id, self.eot_id) if self.stop_at_eot else (self.eos_id,)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict,
                    eot_id: int | None = None, **overrides) -> SamplerConfig:
        """From `config.sampler` and the mask / EOS ids of `config.model`.

        The EoT id is `config.sampler.eot_token_id` when >= 0, else `eot_id` (pass the
        tokenizer's), else none. `overrides` replace single fields (e.g. from flags).
        """
        s = config.sampler
        eot = s.eot_token_id if s.eot_token_id >= 0 else (-1 if eot_id is None else eot_id)
        fields = {
            "gen_length": s.gen_length, "block_length": s.block_length, "steps": s.steps,
            "temperature": float(s.temperature), "cfg_scale": float(s.cfg_scale),
            "remasking": s.remasking, "logits_eos_inf": bool(s.logits_eos_inf),
            "confidence_eos_eot_inf": bool(s.confidence_eos_eot_inf), "cache": s.cache,
            "refresh_every": s.refresh_every, "threshold": float(s.threshold),
            "factor": float(s.factor), "early_exit": bool(s.early_exit),
            "mask_id": config.model.mask_token_id, "eos_id": config.model.eos_token_id,
            "eot_id": eot, "banned_ids": tuple(int(i) for i in s.banned_ids),
            "stop_at_eot": bool(s.stop_at_eot)}
        fields.update(overrides)
        return cls(**fields)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def parallel(self) -> bool:
        """True for threshold / factor decoding (a variable number of tokens per step)."""
        return self.threshold > 0 or self.factor > 0

    @property
    def schedule_steps(self) -> int:
        """Columns of the fixed schedule: steps per block (1, unused, for parallel decoding)."""
        return 1 if self.parallel else self.steps // self.num_blocks

    @property
    def max_steps_per_block(self) -> int:
        """Fixed schedule: steps / num_blocks; parallel decoding: one token per step at worst."""
        return self.block_length if self.parallel else self.steps // self.num_blocks


class SampleOutput(NamedTuple):
    """Result of `sample`.

    tokens: int32 [B, L], the prompt (as given, padding included) followed by the generation.
    commit_pass: int32 [B, gen_length], the forward pass (counted from 0 over the whole run)
      whose logits committed each generated position; -1 where none did (pre-filled positions,
      and positions that early exit filled with EOS).
    num_forward_passes: int32 scalar, model calls made (a CFG pair of rows counts once).
    computed_positions: int32 scalar, positions each row sent through the model over the run
      (the canvas length per full pass, the window length per cached pass): times 2 x params x
      rows (x 2 with CFG) it is the matmul work done.
    """

    tokens: jax.Array
    commit_pass: jax.Array
    num_forward_passes: jax.Array
    computed_positions: jax.Array


def num_transfer_tokens(mask_counts: jax.Array, steps: int) -> jax.Array:
    """Tokens to commit at each step of a block: [B] mask counts -> int32 [B, steps].

    `m // steps` per step, and one more in the first `m % steps` steps (REFERENCE.md section 3
    step 2): a linear schedule spread as evenly as integers allow.
    """
    m = jnp.asarray(mask_counts, jnp.int32)[:, None]
    step = jnp.arange(steps, dtype=jnp.int32)[None, :]
    return m // steps + (step < m % steps).astype(jnp.int32)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token id lists into (tokens int32 [B, Lmax], mask bool [B, Lmax])."""
    if len(prompts) == 0:
        raise ValueError("pad_prompts: expected at least one prompt, found none")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"pad_prompts: prompt {i} is empty; every prompt needs a token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = np.asarray(p, np.int32)
        mask[i, width - len(p):] = True
    return tokens, mask


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded batch: 0 at each row's first real token."""
    mask = jnp.asarray(attention_mask, jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def build_canvas(prompt_tokens: jax.Array, prompt_mask: jax.Array, gen_length: int,
                 mask_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [B, Lp + G], attention_mask [B, Lp + G], positions [B, Lp + G]) to sample into."""
    batch = prompt_tokens.shape[0]
    tokens = jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32),
                              jnp.full((batch, gen_length), mask_id, jnp.int32)], axis=1)
    attention_mask = jnp.concatenate([jnp.asarray(prompt_mask, bool),
                                      jnp.ones((batch, gen_length), bool)], axis=1)
    return tokens, attention_mask, positions_from_mask(attention_mask)


def _finished_stops(gen: jax.Array, stop_ids: Sequence[int], mask_id: int) -> jax.Array:
    """[B, G] bool: stop tokens with nothing masked before them."""
    is_mask = (gen == mask_id).astype(jnp.int32)
    masks_before = jnp.cumsum(is_mask, axis=1) - is_mask
    return jnp.isin(gen, jnp.asarray(stop_ids, gen.dtype)) & (masks_before == 0)


def eos_fill(tokens: jax.Array, gen_start: int, eos_id: int, mask_id: int,
             stop_ids: Sequence[int] | None = None) -> jax.Array:
    """Everything after a row's first finished stop token (EOS by default; nothing masked before
    it) becomes EOS."""
    gen = tokens[:, gen_start:]
    finished = _finished_stops(gen, (eos_id,) if stop_ids is None else stop_ids, mask_id)
    after = jnp.cumsum(finished.astype(jnp.int32), axis=1) - finished > 0
    return tokens.at[:, gen_start:].set(jnp.where(after, eos_id, gen))


def _all_rows_finished(tokens: jax.Array, gen_start: int, stop_ids: Sequence[int],
                       mask_id: int) -> jax.Array:
    return jnp.all(jnp.any(_finished_stops(tokens[:, gen_start:], stop_ids, mask_id), axis=1))


def _constrain(x: jax.Array) -> jax.Array:
    """Batch-shard token-shaped arrays (a no-op without a mesh / rules in context)."""
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length"))


def _prefix_window_groups(config: SamplerConfig, length: int) -> list[tuple[int, int, int]]:
    """Prefix cache: (first block, end block, window length) with windows ending at `length`.

    Block j needs the window [gen_start + j * block_length, length); the window lengths are
    rounded up to a multiple of a quantum so there are at most `_MAX_PREFIX_WINDOW_LENGTHS`
    distinct ones. A longer window starts earlier, which only recomputes more positions fresh.
    """
    nb, bl = config.num_blocks, config.block_length
    quantum = bl * math.ceil(nb / _MAX_PREFIX_WINDOW_LENGTHS)
    groups: list[tuple[int, int, int]] = []
    for j in range(nb):
        needed = config.gen_length - j * bl
        window = min(length, math.ceil(needed / quantum) * quantum)
        if groups and groups[-1][2] == window:
            groups[-1] = (groups[-1][0], j + 1, window)
        else:
            groups.append((j, j + 1, window))
    return groups


class _LoopState(NamedTuple):
    tokens: jax.Array          # [B, L]
    cache: Any                 # KVCache of the (CFG-doubled) rows, or None
    block: jax.Array           # current block index
    step: jax.Array            # step within the block
    schedule: jax.Array        # [B, steps per block] fixed-schedule commit counts
    commit_pass: jax.Array     # [B, G]
    passes: jax.Array          # forward passes so far
    positions: jax.Array       # positions per row computed so far
    done: jax.Array            # early exit: every row finished


def sample(forward: Forward, tokens: jax.Array, attention_mask: jax.Array, positions: jax.Array,
           gen_start: int, config: SamplerConfig, rng: jax.Array) -> SampleOutput:
    """Runs the reverse process on a canvas (traceable; call it inside `jax.jit`).

    tokens int32 [B, L]: prompt columns [0, gen_start) then the generation region, whose masks
    are filled (tokens already there stay, as in infilling); attention_mask bool [B, L] key mask
    (False on left padding); positions int32 [B, L]. CFG's unconditional rows replace every real
    non-mask token of the initial canvas (the prompt) by the mask id.
    """
    c = config
    batch, length = tokens.shape
    bl, nb = c.block_length, c.num_blocks
    if length - gen_start != c.gen_length:
        raise ValueError(f"sample: the canvas has {length - gen_start} generation columns after "
                         f"gen_start={gen_start}, expected gen_length={c.gen_length}")
    use_cfg = c.cfg_scale > 0
    conditioning = attention_mask & (tokens != c.mask_id)

    def rows(a):  # [B, ...] -> [2B, ...]: each row followed by its unconditional twin
        return jnp.repeat(a, 2, axis=0) if use_cfg else a

    model_mask, model_positions = rows(attention_mask), rows(positions)
    model_conditioning = rows(conditioning)

    def model_tokens(x, start, width):
        x = jax.lax.dynamic_slice_in_dim(rows(x), start, width, axis=1)
        if use_cfg:
            cond = jax.lax.dynamic_slice_in_dim(model_conditioning, start, width, axis=1)
            unconditional = jnp.arange(x.shape[0])[:, None] % 2 == 1
            x = jnp.where(cond & unconditional, c.mask_id, x)
        return x

    def guided(logits):  # [R, W, V] -> [B, W, V] float32 (W: the current block)
        logits = logits.astype(jnp.float32)
        if not use_cfg:
            return logits
        pair = logits.reshape(batch, 2, *logits.shape[1:])
        cond, uncond = pair[:, 0], pair[:, 1]
        return uncond + (c.cfg_scale + 1.0) * (cond - uncond)

    def full_pass(x, return_kv):
        """Raw logits [R, L, V] of the whole canvas (and the keys/values of every position)."""
        out = forward(_constrain(model_tokens(x, 0, length)), attention_mask=model_mask,
                      positions=model_positions, return_kv=return_kv)
        return out if return_kv else (out, None)

    def window_pass(x, cache, start, width):
        """Raw logits [R, width, V] of the window [start, start + width) over the cache."""
        return forward(_constrain(model_tokens(x, start, width)), attention_mask=model_mask,
                       positions=jax.lax.dynamic_slice_in_dim(model_positions, start, width, 1),
                       kv_cache=cache, cache_index=start)

    def block_of(logits, offset):
        """The current block's guided float32 logits [B, bl, V], sliced before the cast."""
        return guided(jax.lax.dynamic_slice_in_dim(logits, offset, bl, 1))

    def block_logits(x, cache, step, block_start, window):
        """Logits [B, block_length, V] of the current block, the (maybe refreshed) cache, and
        the number of positions the pass computed."""
        if c.cache == "none":
            logits, _ = full_pass(x, return_kv=False)
            return block_of(logits, block_start), cache, length
        start = block_start if c.cache == "dual" else length - window
        refresh = step == 0 if c.refresh_every == 0 else step % c.refresh_every == 0

        def refreshed(x, cache):
            logits, kv = full_pass(x, return_kv=True)
            return block_of(logits, block_start), kv

        def cached(x, cache):
            return block_of(window_pass(x, cache, start, window), block_start - start), cache

        logits, cache = jax.lax.cond(refresh, refreshed, cached, x, cache)
        return logits, cache, jnp.where(refresh, length, window)

    def commit(x, logits, state, block_start, key):
        """One step's decisions for the current block; returns (tokens, commit mask [B, bl])."""
        block_tokens = jax.lax.dynamic_slice_in_dim(x, block_start, bl, 1)
        eligible = block_tokens == c.mask_id
        # The mask token is never a candidate: committing it would leave the position masked (a
        # trained model gives it ~0 probability anyway; an untrained one may not).
        logits = logits.at[..., c.mask_id].set(-jnp.inf)
        if c.vocab_limit > 0:
            in_vocab = jnp.arange(logits.shape[-1]) < c.vocab_limit
            logits = jnp.where(in_vocab, logits, -jnp.inf)
        if c.logits_eos_inf:
            logits = logits.at[..., c.eos_id].set(-jnp.inf)
        if c.banned_ids:
            logits = logits.at[..., jnp.asarray(c.banned_ids)].set(-jnp.inf)
        noise_key, remask_key = jax.random.split(key)
        if c.temperature > 0:
            # Gumbel-max: argmax(logits / T + G) samples softmax(logits / T); same argmax as the
            # reference's exp(logits) / (-log U)^T, without a float64 [B, L, V] tensor.
            scores = logits / c.temperature + jax.random.gumbel(noise_key, logits.shape)
        else:
            scores = logits
        candidates = jnp.argmax(scores, axis=-1).astype(jnp.int32)          # [B, bl]
        if c.remasking == "low_confidence":
            chosen = jnp.take_along_axis(logits, candidates[..., None], axis=-1)[..., 0]
            confidence = jnp.exp(chosen - jax.nn.logsumexp(logits, axis=-1))
        else:
            confidence = jax.random.uniform(remask_key, candidates.shape)
        if c.confidence_eos_eot_inf:
            late = candidates == c.eos_id
            if c.eot_id >= 0:
                late |= candidates == c.eot_id
            confidence = jnp.where(late, _EOS_CONFIDENCE, confidence)
        confidence = jnp.where(eligible, confidence, -jnp.inf)
        num_eligible = jnp.sum(eligible, axis=1)
        if c.threshold > 0:
            count = jnp.sum(eligible & (confidence >= c.threshold), axis=1)
            count = jnp.maximum(count, 1)
        elif c.factor > 0:
            ranked = -jnp.sort(-confidence, axis=1)                         # descending
            k = jnp.arange(1, bl + 1, dtype=jnp.float32)
            ok = ranked >= 1.0 - c.factor / (k + 1.0)
            count = jnp.maximum(jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1), 1)
        else:
            count = jax.lax.dynamic_index_in_dim(state.schedule, state.step, axis=1,
                                                 keepdims=False)
        count = jnp.minimum(count, num_eligible)
        order = jnp.argsort(-confidence, axis=1, stable=True)             # most confident first
        rank = jnp.argsort(order, axis=1)
        committed = eligible & (rank < count[:, None])
        block_tokens = jnp.where(committed, candidates, block_tokens)
        x = jax.lax.dynamic_update_slice_in_dim(x, block_tokens, block_start, 1)
        return x, committed

    def run_block(state: _LoopState, window: int) -> _LoopState:
        block_start = gen_start + state.block * bl
        block_tokens = jax.lax.dynamic_slice_in_dim(state.tokens, block_start, bl, 1)
        state = state._replace(step=jnp.int32(0), schedule=num_transfer_tokens(
            jnp.sum(block_tokens == c.mask_id, axis=1), c.schedule_steps))

        def keep_going(s: _LoopState):
            left = jax.lax.dynamic_slice_in_dim(s.tokens, block_start, bl, 1) == c.mask_id
            return (s.step < c.max_steps_per_block) & jnp.any(left) & ~s.done

        def step(s: _LoopState) -> _LoopState:
            key = jax.random.fold_in(jax.random.fold_in(rng, s.block), s.step)
            logits, cache, computed = block_logits(s.tokens, s.cache, s.step, block_start,
                                                   window)
            x, committed = commit(s.tokens, logits, s, block_start, key)
            x = _constrain(x)
            old = jax.lax.dynamic_slice_in_dim(s.commit_pass, s.block * bl, bl, 1)
            commit_pass = jax.lax.dynamic_update_slice_in_dim(
                s.commit_pass, jnp.where(committed, s.passes, old), s.block * bl, 1)
            done = (_all_rows_finished(x, gen_start, c.stop_ids, c.mask_id) if c.early_exit
                    else s.done)
            return s._replace(tokens=x, cache=cache, step=s.step + 1, commit_pass=commit_pass,
                              passes=s.passes + 1, positions=s.positions + computed, done=done)

        state = jax.lax.while_loop(keep_going, step, state)
        return state._replace(block=state.block + 1)

    cache = None
    if c.cache != "none":
        _, kv_shape = jax.eval_shape(lambda x: full_pass(x, return_kv=True), tokens)
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), kv_shape)
    state = _LoopState(
        tokens=_constrain(tokens), cache=cache, block=jnp.int32(0), step=jnp.int32(0),
        schedule=jnp.zeros((batch, c.schedule_steps), jnp.int32),
        commit_pass=jnp.full((batch, c.gen_length), -1, jnp.int32), passes=jnp.int32(0),
        positions=jnp.int32(0),
        done=jnp.bool_(False))

    if c.cache == "prefix":
        groups = _prefix_window_groups(c, length)
    else:
        groups = [(0, nb, bl if c.cache == "dual" else length)]
    for first, end, window in groups:
        # Each distinct window length is its own loop over its blocks (static shapes).
        state = state._replace(block=jnp.int32(first))
        state = jax.lax.while_loop(
            lambda s, end=end: (s.block < end) & ~s.done,
            functools.partial(run_block, window=window), state)

    out = state.tokens
    if c.early_exit:
        out = eos_fill(out, gen_start, c.eos_id, c.mask_id, c.stop_ids)
    return SampleOutput(out, state.commit_pass, state.passes, state.positions)


@functools.partial(jax.jit, static_argnames=("model", "config", "gen_start"))
def _generate_jit(params, tokens, attention_mask, positions, rng, images=None, *, model, config,
                  gen_start):
    if images is None:
        forward = functools.partial(model.apply, {"params": params})
    else:
        from llada_jax.model.multimodal import image_conditioned_forward

        forward = image_conditioned_forward(model, params, images)
    return sample(forward, tokens, attention_mask, positions, gen_start, config, rng)


def _check_prompts(prompt_tokens, prompt_mask, config: SamplerConfig, model) -> None:
    """User-facing checks of a prompt batch (host values only; traced values are skipped)."""
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"generate: prompt_tokens and prompt_mask must both be [batch, length]; "
                         f"found {prompt_tokens.shape} and {prompt_mask.shape}")
    if prompt_tokens.shape[1] == 0:
        raise ValueError("generate: the prompt is empty; every prompt needs at least one token")
    max_len = getattr(getattr(model, "config", None), "max_sequence_length", None)
    total = prompt_tokens.shape[1] + config.gen_length
    if max_len is not None and total > max_len:
        raise ValueError(f"generate: prompt length {prompt_tokens.shape[1]} + gen_length "
                         f"{config.gen_length} = {total} exceeds the model's "
                         f"max_sequence_length={max_len}")
    model_mask_id = getattr(getattr(model, "config", None), "mask_token_id", config.mask_id)
    if model_mask_id != config.mask_id:
        raise ValueError(f"generate: sampler mask_id={config.mask_id} but the model's "
                         f"mask_token_id={model_mask_id}")
    concrete = all(isinstance(a, np.ndarray) or (isinstance(a, jax.Array) and
                                                 a.is_fully_addressable)
                   for a in (prompt_tokens, prompt_mask))
    if not concrete:
        return
    tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask).astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"generate: prompt row(s) {empty.tolist()} are empty (prompt_mask all "
                         f"False); every prompt needs at least one token")
    # Left padding: once a row's mask turns True it stays True.
    not_left = np.flatnonzero((mask[:, :-1] & ~mask[:, 1:]).any(axis=1))
    if not_left.size:
        raise ValueError(f"generate: prompt row(s) {not_left.tolist()} are not left-padded "
                         f"(prompt_mask must be False...False True...True); use pad_prompts")
    if np.any(~mask & (tokens == config.mask_id)):
        raise ValueError(f"generate: padding positions hold the mask id {config.mask_id}; the "
                         f"pad id must differ from the mask id")


def generate(params: Any, model: nn.Module, prompt_tokens: jax.Array, prompt_mask: jax.Array,
             config: SamplerConfig, rng: jax.Array, *, images: Sequence[jax.Array] | None = None,
             return_stats: bool = False):
    """Samples `config.gen_length` tokens after each prompt of a left-padded batch.

    prompt_tokens int32 [B, Lp], prompt_mask bool [B, Lp] (see `pad_prompts`). Returns tokens
    int32 [B, Lp + gen_length] (prompt included), or the full `SampleOutput` with
    `return_stats=True`. Compiled once per (model, config, shapes).

    images (LLaDA-V models only): the `multimodal.IMAGE_FIELDS` arrays laid out over the whole
    canvas, `(pixel_values [B, V, H, W, 3], index [B, Lp + G, 4], weight [B, Lp + G, 4],
    is_newline [B, Lp + G])` (`multimodal_data.prompt_batch` makes them); the prompts hold the
    image placeholder ids. The image tokens are computed once, not at every step.
    """
    prompt_tokens = prompt_tokens if isinstance(prompt_tokens, jax.Array) else np.asarray(
        prompt_tokens, np.int32)
    prompt_mask = prompt_mask if isinstance(prompt_mask, jax.Array) else np.asarray(
        prompt_mask, bool)
    _check_prompts(prompt_tokens, prompt_mask, config, model)
    tokens, attention_mask, positions = build_canvas(prompt_tokens, prompt_mask,
                                                     config.gen_length, config.mask_id)
    if images is not None:
        images = tuple(images)
        expected = tokens.shape
        found = tuple(a.shape[:2] for a in images[1:])
        if len(images) != 4 or images[0].shape[0] != expected[0] or any(
                f != expected for f in found):
            raise ValueError(f"generate: images must be (pixel_values [B, V, H, W, 3], index, "
                             f"weight, is_newline) over the canvas [B, Lp + gen_length] = "
                             f"{list(expected)}; found shapes {[tuple(a.shape) for a in images]}")
    out = _generate_jit(params, tokens, attention_mask, positions, rng, images, model=model,
                        config=config, gen_start=prompt_tokens.shape[1])
    return out if return_stats else out.tokens
