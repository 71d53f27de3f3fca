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
  * `threshold` (Fast-dLLM): every candidate of the block with confidence >= threshold, at least
    the single most confident one;
  * `factor` (Fast-dLLM): with the block's confidences sorted, c_1 >= c_2 >= ..., the first k
    such that c_{k+1} < 1 - factor / (k + 2), at least one, and all of them when only the last
    one fails (`factor_count`).
Ties in confidence are broken toward the lower position (a stable sort), so results are exactly
reproducible (the official `torch.topk` leaves tie order unspecified). The mask token itself is
never a candidate (the official code allows it, which leaves a position masked after its commit;
trained models give it ~0 probability).

Fidelity rules (the official LLaDA / LLaDA-V / Fast-dLLM behaviour, `REFERENCE.md` section 3):
  * Candidates are drawn with Gumbel noise that samples the exact categorical (`gumbel_noise`,
    64 random bits per draw, both tails at float32 precision), in place of the official float64.
  * `confidence_eos_eot_inf` sets the EOS and EoT logits to -inf before the confidence softmax
    (others renormalised; EOS / EoT candidates get confidence 0), at every temperature.
  * `stop_at_eot` (LLaDA-V): once a row holds an `<|eot_id|>`, later commits are restricted to
    masked positions before its first one; the row is finished when none is left, and what
    follows the EoT is returned as EOS (the official code cuts the answer there).

Cost: the model is asked for final hidden states (`return_hidden=True`) and the LM head and the
float32 softmax run on the current block only (with CFG, both halves of it), so no [B, L, V]
logits tensor exists for the canvas (`head`; `generate` passes the model's `logits_from_hidden`).

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
(`forward(tokens, attention_mask=, positions=, kv_cache=, cache_index=, return_kv=,
return_hidden=)`) and, optionally, a `head` (hidden states -> logits); `generate` builds both
from params and a `Transformer`, or, given `images`, from a LLaDA-V model with
`image_conditioned_forward` (image tokens computed once, spliced at every pass). A
`forward` without `head` returns logits (crafted test models do).

This module does not tokenize, load checkpoints or print: see `launch/generate.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import SamplerConfig

# forward(tokens [R, Lw], *, attention_mask [R, L] bool, positions [R, Lw] int, kv_cache=None,
#         cache_index=None, return_kv=False[, return_hidden=True]) -> logits [R, Lw, V], or
#         hidden states [R, Lw, d] with return_hidden (or (that, KVCache) with return_kv).
Forward = Callable[..., Any]
# head(hidden [R, W, d]) -> logits [R, W, V]: the LM head, applied to the current block only.
Head = Callable[[jax.Array], jax.Array]
# on_block(block index, block tokens [B, block_length]), traced: a block has become final.
BlockHook = Callable[[jax.Array, jax.Array], None]
# stream(tag, block index, block tokens [B, block_length]) on the host (numpy values).
StreamCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

# Prefix cache: windows [start, end) are rounded up so that at most this many distinct window
# lengths (each its own compiled loop) exist; the cost is at most one window quantum of extra work.
_MAX_PREFIX_WINDOW_LENGTHS = 4


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
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"pad_prompts: prompt {i} is empty; every prompt needs a token")
        tokens[i, width - len(p):] = np.asarray(p, np.int32)
        mask[i, width - len(p):] = True
    return tokens, mask


def build_canvas(prompt_tokens: jax.Array, prompt_mask: jax.Array, gen_length: int,
                 mask_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [B, Lp + G], attention_mask [B, Lp + G], positions [B, Lp + G]) to sample into.
    The RoPE positions of the left-padded rows are 0 at each row's first real token."""
    batch = prompt_tokens.shape[0]
    tokens = jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32),
                              jnp.full((batch, gen_length), mask_id, jnp.int32)], axis=1)
    attention_mask = jnp.concatenate([jnp.asarray(prompt_mask, bool),
                                      jnp.ones((batch, gen_length), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return tokens, attention_mask, positions


def _finished_stops(gen: jax.Array, stop_ids: Sequence[int], mask_id: int) -> jax.Array:
    """[B, G] bool: stop tokens with nothing masked before them."""
    is_mask = (gen == mask_id).astype(jnp.int32)
    masks_before = jnp.cumsum(is_mask, axis=1) - is_mask
    return jnp.isin(gen, jnp.asarray(stop_ids, gen.dtype)) & (masks_before == 0)


def constrain_tokens(x: jax.Array) -> jax.Array:
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
    # Block j needs the positions from its start to the end: windows never grow with j, so
    # blocks of one window length are consecutive.
    windows = [min(length, math.ceil((config.gen_length - j * bl) / quantum) * quantum)
               for j in range(nb)]
    firsts = [j for j in range(nb) if j == 0 or windows[j] != windows[j - 1]]
    return [(j, end, windows[j]) for j, end in zip(firsts, [*firsts[1:], nb], strict=True)]


# --- the pure units of one step: candidate logits, noise, candidates, confidence, commit rule ----
def candidate_logits(logits: jax.Array, config: SamplerConfig) -> jax.Array:
    """float32 logits [..., V] with every id that may never be generated set to -inf: the mask id
    (committing it would leave the position masked; the official code allows it, a trained model
    gives it ~0 probability), ids >= `vocab_limit`, EOS with `logits_eos_inf`, `banned_ids`."""
    logits = logits.at[..., config.mask_id].set(-jnp.inf)
    if config.vocab_limit > 0:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_limit, logits, -jnp.inf)
    if config.logits_eos_inf:
        logits = logits.at[..., config.eos_id].set(-jnp.inf)
    if config.banned_ids:
        logits = logits.at[..., jnp.asarray(config.banned_ids)].set(-jnp.inf)
    return logits


def gumbel_from_bits(bits: jax.Array) -> jax.Array:
    """Standard Gumbel float32 [...] from 64 random bits per draw (uint32 [2, ...]).

    The bits are a uniform v = (hi * 2^32 + lo + 1/2) / 2^64 on a 2^-64 grid; the Gumbel is
    -log(E) with the exponential E = -log(1 - v), computed as -log1p(-v) for v < 1/2 and as
    -log(w) from the exact complement w = 1 - v (built from the inverted bits) otherwise, so
    both tails keep float32's relative precision: the noise reaches -3.81 and +45.05 (the
    official float64 draw reaches -3.6 and +36.7). `jax.random.gumbel`'s default draw stops
    near +15.9, which over a 126k vocabulary makes a token 16 logits below the top twice as
    rare as it should be (0.0080 instead of 0.0140 at T = 1).
    """
    hi, lo = bits[0], bits[1]
    scale = jnp.float32(2.0 ** -32)
    v = (hi.astype(jnp.float32) + (lo.astype(jnp.float32) + 0.5) * scale) * scale
    w = ((~hi).astype(jnp.float32) + ((~lo).astype(jnp.float32) + 0.5) * scale) * scale
    exponential = jnp.where(hi < jnp.uint32(2 ** 31), -jnp.log1p(-v), -jnp.log(w))
    return -jnp.log(exponential)


def gumbel_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Standard Gumbel noise float32 `shape` that samples the exact categorical (see
    `gumbel_from_bits`)."""
    return gumbel_from_bits(jax.random.bits(key, (2, *shape), jnp.uint32))


def _rowwise(draw: Callable[[jax.Array, tuple[int, ...]], jax.Array], key: jax.Array,
             shape: Sequence[int]) -> jax.Array:
    """`draw(key, shape)` for one key; for a key per row ([B] keys), row r is
    `draw(key[r], shape[1:])`, the same numbers as a lone call of that row with its key (the
    bits of shapes (.., 1, n) and (.., n) are the same), so sampled rows are batch-invariant."""
    if key.ndim == 0:
        return draw(key, tuple(shape))
    return jax.vmap(lambda k: draw(k, tuple(shape[1:])))(key)


def draw_candidates(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """int32 [...]: a draw from softmax(logits / T) per position (Gumbel-max), argmax at T = 0.

    The official code takes argmax(exp(logits) / (-log u)^T) in float64, which is the same
    argmax as logits / T + G with G = -log(-log u); no float64 [B, L, V] tensor is needed.
    """
    if temperature > 0:
        logits = logits / temperature + _rowwise(gumbel_noise, key, logits.shape)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def candidate_confidence(logits: jax.Array, candidates: jax.Array, config: SamplerConfig,
                         key: jax.Array) -> jax.Array:
    """float32 [...]: how sure the model is of each candidate.

    `low_confidence`: the candidate's probability under softmax(logits) (no temperature, as in
    the official code). With `confidence_eos_eot_inf` the EOS and EoT logits are -inf BEFORE this
    softmax (the official rule), so the other candidates' probabilities are renormalised by
    1 / (1 - p(EOS) - p(EoT)) and an EOS / EoT candidate gets confidence 0: it is committed only
    when no other candidate of the block is left. The official code does this at T = 0 only (an
    aliasing accident); here it holds at every temperature. `random`: U(0, 1), on which the
    EOS/EoT rule has no effect (as in the official code, where it acts through the softmax).
    """
    if config.remasking == "random":
        return _rowwise(jax.random.uniform, key, candidates.shape)
    if config.confidence_eos_eot_inf:
        logits = logits.at[..., config.eos_id].set(-jnp.inf)
        if config.eot_id >= 0:
            logits = logits.at[..., config.eot_id].set(-jnp.inf)
    chosen = jnp.take_along_axis(logits, candidates[..., None], axis=-1)[..., 0]
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    # A row whose every allowed logit is EOS/EoT: confidence 0 (the official softmax gives NaN).
    return jnp.where(jnp.isfinite(normaliser), jnp.exp(chosen - normaliser), 0.0)


def factor_count(confidence: jax.Array, eligible: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM's factor rule: int32 [B] tokens to commit from confidences [B, W].

    With the n eligible confidences sorted descending c_1 >= ... >= c_n: the first k whose
    c_{k+1} < 1 - factor / (k + 2) fails ends the run and k are committed, except that the first
    is always committed and, when the failing one is the LAST (k = n - 1), all n are (Fast-dLLM's
    current rule: one pass fewer per block).
    """
    confidence = jnp.where(eligible, confidence, -jnp.inf)
    ranked = -jnp.sort(-confidence, axis=1)                                  # descending
    index = jnp.arange(confidence.shape[1], dtype=jnp.float32)
    passes = (ranked >= 1.0 - factor / (index + 2.0)) | (index == 0)
    passes &= index < jnp.sum(eligible, axis=1, keepdims=True)
    count = jnp.sum(jnp.cumprod(passes.astype(jnp.int32), axis=1), axis=1)
    num_eligible = jnp.sum(eligible, axis=1).astype(count.dtype)
    return jnp.where(count == num_eligible - 1, num_eligible, count)


def commit_mask(confidence: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
    """bool [B, W]: the `count` [B] most confident eligible positions of each row.

    Ties in confidence go to the lower position (a stable sort); the official `torch.topk`
    leaves their order unspecified. Never more than the eligible positions (the official code
    can hand `topk` more than there are, which then picks positions it had ruled out).
    """
    confidence = jnp.where(eligible, confidence, -jnp.inf)
    order = jnp.argsort(-confidence, axis=1, stable=True)                    # most confident first
    rank = jnp.argsort(order, axis=1)
    return eligible & (rank < count[:, None])


def guidance(logits: jax.Array, cfg_scale: float, pair_axis: int) -> jax.Array:
    """float32 logits; with `cfg_scale` > 0, their (conditional, unconditional) pairs along
    `pair_axis` combined by classifier-free guidance: un + (s + 1) (cond - un)."""
    logits = logits.astype(jnp.float32)
    if cfg_scale <= 0:
        return logits
    cond, uncond = jnp.moveaxis(logits, pair_axis, 0)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


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
           gen_start: int, config: SamplerConfig, rng: jax.Array,
           head: Head | None = None, on_block: BlockHook | None = None) -> SampleOutput:
    """Runs the reverse process on a canvas (traceable; call it inside `jax.jit`).

    tokens int32 [B, L]: prompt columns [0, gen_start) then the generation region, whose masks
    are filled (tokens already there stay, as in infilling); attention_mask bool [B, L] key mask
    (False on left padding); positions int32 [B, L]. CFG's unconditional rows replace every real
    non-mask token of the initial canvas (the prompt) by the mask id.

    head: the LM head (hidden [R, W, d] -> logits [R, W, V]). Given, `forward` is called with
    `return_hidden=True` and the head runs on the current block only, so no logits exist for the
    rest of the canvas. Without it `forward` returns logits and the block is sliced from them.

    on_block: called (traced) as `on_block(block index, block tokens int32 [B, block_length])`
    when a block is final, e.g. an `io_callback` that streams it (`generate(stream=...)`).
    Blocks that early exit skips are not reported (the returned tokens hold them).

    rng: one PRNG key for the batch, or one key per row ([B] keys): then each sampled row gets
    the numbers a lone call with its key gets, so batching sampled requests changes no answer.
    """
    c = config
    batch, length = tokens.shape
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)   # a raw uint32 key: the same bits, typed
    if rng.shape not in ((), (batch,)):
        raise ValueError(f"sample: rng must be one key or one key per row ({batch}), found "
                         f"keys of shape {rng.shape}")
    bl, nb = c.block_length, c.num_blocks
    if length - gen_start != c.gen_length:
        raise ValueError(f"sample: the canvas has {length - gen_start} generation columns after "
                         f"gen_start={gen_start}, expected gen_length={c.gen_length}")
    use_cfg = c.cfg_scale > 0
    model_kwargs = {} if head is None else {"return_hidden": True}

    def rows(a):  # [B, ...] -> [2B, ...]: each row followed by its unconditional twin
        return jnp.repeat(a, 2, axis=0) if use_cfg else a

    model_mask, model_positions = rows(attention_mask), rows(positions)
    model_conditioning = rows(attention_mask & (tokens != c.mask_id))

    def model_tokens(x, start, width):
        x = jax.lax.dynamic_slice_in_dim(rows(x), start, width, axis=1)
        if use_cfg:
            cond = jax.lax.dynamic_slice_in_dim(model_conditioning, start, width, axis=1)
            unconditional = jnp.arange(x.shape[0])[:, None] % 2 == 1
            x = jnp.where(cond & unconditional, c.mask_id, x)
        return x

    def model_pass(x, start=0, width=length, cache=None, return_kv=False):
        """Outputs [R, width, V or d] of the window [start, start + width) (by default the whole
        canvas; with a `cache` it attends over every cached position), and with `return_kv`
        the window's keys/values."""
        return forward(constrain_tokens(model_tokens(x, start, width)), attention_mask=model_mask,
                       positions=jax.lax.dynamic_slice_in_dim(model_positions, start, width, 1),
                       kv_cache=cache, cache_index=start, return_kv=return_kv, **model_kwargs)

    def block_of(out, offset):
        """The current block's guided float32 logits [B, bl, V]: sliced out of the pass's output
        first, so the LM head (given `head`) and the float32 cast see the block only."""
        out = jax.lax.dynamic_slice_in_dim(out, offset, bl, 1)
        logits = out if head is None else head(out)
        if use_cfg:
            logits = logits.reshape(batch, 2, *logits.shape[1:])
        return guidance(logits, c.cfg_scale, 1)

    def block_logits(x, cache, step, block_start, window):
        """Logits [B, block_length, V] of the current block, the (maybe refreshed) cache, and
        the number of positions the pass computed."""
        if c.cache == "none":
            return block_of(model_pass(x), block_start), cache, length
        start = block_start if c.cache == "dual" else length - window
        refresh = step == 0 if c.refresh_every == 0 else step % c.refresh_every == 0

        def refreshed(x, cache):
            out, kv = model_pass(x, return_kv=True)
            return block_of(out, block_start), kv

        def cached(x, cache):
            return block_of(model_pass(x, start, window, cache), block_start - start), cache

        logits, cache = jax.lax.cond(refresh, refreshed, cached, x, cache)
        return logits, cache, jnp.where(refresh, length, window)

    def eligible_positions(x, block_start):
        """bool [B, bl]: masked positions of the current block that may be committed now. With
        `stop_at_eot`, once a row holds an EoT in its generation, only masked positions before
        its first EoT (the official LLaDA-V rule)."""
        eligible = jax.lax.dynamic_slice_in_dim(x, block_start, bl, 1) == c.mask_id
        if c.stop_at_eot:
            is_eot = x[:, gen_start:] == c.eot_id
            first_eot = jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1),
                                  c.gen_length)
            column = block_start - gen_start + jnp.arange(bl)
            eligible &= column[None, :] < first_eot[:, None]
        return eligible

    def commit(x, logits, state, block_start, key):
        """One step's decisions for the current block; returns (tokens, commit mask [B, bl])."""
        block_tokens = jax.lax.dynamic_slice_in_dim(x, block_start, bl, 1)
        eligible = eligible_positions(x, block_start)
        logits = candidate_logits(logits, c)
        pair = jax.random.split(key) if key.ndim == 0 else jax.vmap(jax.random.split)(key).T
        noise_key, remask_key = pair
        candidates = draw_candidates(logits, c.temperature, noise_key)          # [B, bl]
        confidence = candidate_confidence(logits, candidates, c, remask_key)
        if c.threshold > 0:
            count = jnp.maximum(jnp.sum(eligible & (confidence >= c.threshold), axis=1), 1)
        elif c.factor > 0:
            count = factor_count(confidence, eligible, c.factor)
        else:
            count = jax.lax.dynamic_index_in_dim(state.schedule, state.step, axis=1,
                                                 keepdims=False)
        committed = commit_mask(confidence, eligible, jnp.minimum(count, jnp.sum(eligible, 1)))
        block_tokens = jnp.where(committed, candidates, block_tokens)
        x = constrain_tokens(jax.lax.dynamic_update_slice_in_dim(x, block_tokens, block_start, 1))
        return x, committed

    def run_block(state: _LoopState, window: int) -> _LoopState:
        block_start = gen_start + state.block * bl
        block_tokens = jax.lax.dynamic_slice_in_dim(state.tokens, block_start, bl, 1)
        state = state._replace(step=jnp.int32(0), schedule=num_transfer_tokens(
            jnp.sum(block_tokens == c.mask_id, axis=1), c.schedule_steps))

        def keep_going(s: _LoopState):
            left = eligible_positions(s.tokens, block_start)
            return (s.step < c.max_steps_per_block) & jnp.any(left) & ~s.done

        def step(s: _LoopState) -> _LoopState:
            def fold(row_rng):
                return jax.random.fold_in(jax.random.fold_in(row_rng, s.block), s.step)

            key = jax.vmap(fold)(rng) if rng.ndim else fold(rng)
            logits, cache, computed = block_logits(s.tokens, s.cache, s.step, block_start,
                                                   window)
            x, committed = commit(s.tokens, logits, s, block_start, key)
            old = jax.lax.dynamic_slice_in_dim(s.commit_pass, s.block * bl, bl, 1)
            commit_pass = jax.lax.dynamic_update_slice_in_dim(
                s.commit_pass, jnp.where(committed, s.passes, old), s.block * bl, 1)
            done = (jnp.all(jnp.any(_finished_stops(x[:, gen_start:], finish_ids, c.mask_id), 1))
                    if finish_ids else s.done)
            return s._replace(tokens=x, cache=cache, step=s.step + 1, commit_pass=commit_pass,
                              passes=s.passes + 1, positions=s.positions + computed, done=done)

        state = jax.lax.while_loop(keep_going, step, state)
        if on_block is not None:
            on_block(state.block,
                     jax.lax.dynamic_slice_in_dim(state.tokens, block_start, bl, 1))
        return state._replace(block=state.block + 1)

    # Rows are finished by a stop token with nothing masked before it: any of `stop_ids` with
    # early exit; an EoT with `stop_at_eot` alone (the official LLaDA-V loop ends there too).
    finish_ids = c.stop_ids if c.early_exit else (c.eot_id,) if c.stop_at_eot else ()
    cache = None
    if c.cache != "none":
        _, kv_shape = jax.eval_shape(lambda x: model_pass(x, return_kv=True), tokens)
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), kv_shape)
    state = _LoopState(
        tokens=constrain_tokens(tokens), cache=cache, block=jnp.int32(0), step=jnp.int32(0),
        schedule=jnp.zeros((batch, c.schedule_steps), jnp.int32),
        commit_pass=jnp.full((batch, c.gen_length), -1, jnp.int32), passes=jnp.int32(0),
        positions=jnp.int32(0), done=jnp.bool_(False))

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
    if finish_ids:
        # What follows a finished row's stop token becomes EOS (the official LLaDA-V code cuts
        # the answer there; positions after an EoT are never committed once it is).
        gen = out[:, gen_start:]
        finished = _finished_stops(gen, finish_ids, c.mask_id)
        after = jnp.cumsum(finished.astype(jnp.int32), axis=1) - finished > 0
        out = out.at[:, gen_start:].set(jnp.where(after, c.eos_id, gen))
    return SampleOutput(out, state.commit_pass, state.passes, state.positions)


def image_conditioned_forward(model: nn.Module, params: Any,
                              images: Sequence[jax.Array]) -> Forward:
    """The `forward` of a LLaDA-V model (`multimodal.LLaDAV`) with its images fixed.

    images: `(pixel_values [B, V, H, W, 3], index [B, L, 4], weight [B, L, 4], is_newline
    [B, L])` over the whole canvas of length L. The vision tower and projector run HERE, once;
    every call of the returned `forward(tokens [R, Lw], **Transformer kwargs)` embeds the current
    tokens and splices the stored image tokens of its window (`cache_index` is the window's
    start) at the placeholder positions. With CFG, R = 2B (`sample` follows each row by its
    twin): rows are repeated, and a twin whose placeholders were replaced by the mask id gets no
    image, which is what classifier-free guidance's unconditional prompt means.
    """
    pixel_values, *sources = images
    variables = {"params": params}
    embeddings = model.apply(variables, pixel_values, tuple(sources),
                             method="image_embeddings")                    # [B, L, d_model]

    def forward(tokens: jax.Array, *, cache_index: Any = None, **kwargs: Any) -> Any:
        rows, width = tokens.shape
        start = 0 if cache_index is None else cache_index
        window = jax.lax.dynamic_slice_in_dim(embeddings, start, width, axis=1)
        if rows != window.shape[0]:
            window = jnp.repeat(window, rows // window.shape[0], axis=0)
        return model.apply(variables, tokens, image_embeddings=window, cache_index=cache_index,
                           **kwargs)

    return forward


@functools.partial(jax.jit, static_argnames=("model", "config", "gen_start", "stream"))
def _generate_jit(params, tokens, attention_mask, positions, rng, images=None, stream_tag=None, *,
                  model, config, gen_start, stream=None):
    variables = {"params": params}
    on_block = None
    if stream is not None:
        from jax.experimental import io_callback

        def on_block(block, block_tokens):
            io_callback(stream, None, stream_tag, block, block_tokens, ordered=False)
    # The LM head alone (`Transformer.logits_from_hidden` / `LLaDAV.logits_from_hidden`).
    head = functools.partial(model.apply, variables, method=type(model).logits_from_hidden)
    forward = (functools.partial(model.apply, variables) if images is None
               else image_conditioned_forward(model, params, images))
    return sample(forward, tokens, attention_mask, positions, gen_start, config, rng, head=head,
                  on_block=on_block)


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
    if not all(isinstance(a, np.ndarray) or (isinstance(a, jax.Array) and a.is_fully_addressable)
               for a in (prompt_tokens, prompt_mask)):
        return  # values this host cannot read (traced, or spread over other hosts)
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
             return_stats: bool = False, stream: StreamCallback | None = None,
             stream_tag: int = 0):
    """Samples `config.gen_length` tokens after each prompt of a left-padded batch.

    prompt_tokens int32 [B, Lp], prompt_mask bool [B, Lp] (see `pad_prompts`). Returns tokens
    int32 [B, Lp + gen_length] (prompt included), or the full `SampleOutput` with
    `return_stats=True`. Compiled once per (model, config, shapes).

    images (LLaDA-V models only): the `schema.IMAGE_FIELDS` arrays laid out over the whole
    canvas, `(pixel_values [B, V, H, W, 3], index [B, Lp + G, 4], weight [B, Lp + G, 4],
    is_newline [B, Lp + G])` (`generation.Generator.generate_ids` makes them); the prompts hold the
    image placeholder ids. The image tokens are computed once, not at every step.

    stream (serving): a host function called as `stream(stream_tag, block index, block tokens
    int32 [B, block_length])` each time a block is final (a `jax.experimental.io_callback`, not
    ordered). `stream_tag` is a traced int32, so one compiled program serves every batch; pass
    the same function object each time (it is part of the compiled program's key). Without
    `stream` the program is exactly the plain one.
    """
    prompt_tokens, prompt_mask = (a if isinstance(a, jax.Array) else np.asarray(a, dtype)
                                  for a, dtype in ((prompt_tokens, np.int32), (prompt_mask, bool)))
    _check_prompts(prompt_tokens, prompt_mask, config, model)
    tokens, attention_mask, positions = build_canvas(prompt_tokens, prompt_mask,
                                                     config.gen_length, config.mask_id)
    if images is not None:
        images = tuple(images)
        if len(images) != 4 or images[0].shape[0] != tokens.shape[0] or any(
                a.shape[:2] != tokens.shape for a in images[1:]):
            raise ValueError(f"generate: images must be (pixel_values [B, V, H, W, 3], index, "
                             f"weight, is_newline) over the canvas [B, Lp + gen_length] = "
                             f"{list(tokens.shape)}; found shapes "
                             f"{[tuple(a.shape) for a in images]}")
    tag = None if stream is None else jnp.int32(stream_tag)
    out = _generate_jit(params, tokens, attention_mask, positions, rng, images, tag, model=model,
                        config=config, gen_start=prompt_tokens.shape[1], stream=stream)
    return out if return_stats else out.tokens
