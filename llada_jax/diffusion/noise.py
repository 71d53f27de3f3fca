"""The forward (noising) process of masked diffusion (REFERENCE.md section 2).

Per sequence a time `t ~ U(0, 1)` is drawn and turned into a mask probability
`p = (1 - eps) t + eps` (eps keeps p away from 0, where the 1/p loss weight would explode); every
*maskable* token is then independently replaced by the mask id with probability `p`.

Maskability covers the three objectives with one function:
  * pre-training: every real token is maskable (`maskable` omitted);
  * SFT: prompt positions are not maskable, so they stay clean ("restored to clean" in the
    reference, which masks everything and then copies the prompt back: the same distribution);
  * LLaDA-V: only responses (and their EOS padding) are maskable.

Random lengths: for a fraction of pre-training batches the reference cuts the whole batch to a
random length `U{1..seq_len}`. Slicing would give a new shape and a recompilation per length, so
`random_length_cut` draws the cut inside the jitted step and returns a boolean `[L]` validity
vector instead: positions at or past the cut are excluded from attention (as keys), from masking
and from the loss; the pre-training loss is then normalised by `batch * cut` (see losses.py), which
is exactly the reference's `batch * seq_len` of the sliced batch.

This module knows nothing about the network: it maps token arrays to token arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class NoisedBatch(NamedTuple):
    """Output of the forward process.

    noisy_tokens: int32 [B, L], tokens with the noised positions replaced by the mask id.
    noised: bool [B, L], True where a token was replaced (the positions that are scored).
    mask_prob: float32 [B], the per-sequence masking probability p.
    """

    noisy_tokens: jax.Array
    noised: jax.Array
    mask_prob: jax.Array


def mask_tokens(rng: jax.Array, tokens: jax.Array, mask_prob: jax.Array, mask_id: int,
                maskable: jax.Array | None = None) -> NoisedBatch:
    """Replaces each maskable token by `mask_id` independently with its row's probability.

    tokens int [B, L]; mask_prob float [B]; maskable bool [B, L] or None (= all True).
    """
    noised = jax.random.uniform(rng, tokens.shape, jnp.float32) < mask_prob[:, None]
    if maskable is not None:
        noised = noised & maskable.astype(bool)
    noisy_tokens = jnp.where(noised, jnp.asarray(mask_id, tokens.dtype), tokens)
    return NoisedBatch(noisy_tokens, noised, mask_prob.astype(jnp.float32))


def forward_process(rng: jax.Array, tokens: jax.Array, mask_id: int, eps: float,
                    maskable: jax.Array | None = None) -> NoisedBatch:
    """Draws p = (1 - eps) t + eps with t ~ U(0, 1) per sequence and masks tokens with it
    (pre-training, SFT and LLaDA-V alike).

    For SFT pass `maskable = ~prompt` (answer and its EOS padding): prompt tokens are never
    masked, which is the reference's "mask, then restore the prompt to clean".
    """
    t_rng, mask_rng = jax.random.split(rng)
    mask_prob = (1.0 - eps) * jax.random.uniform(t_rng, (tokens.shape[0],), jnp.float32) + eps
    return mask_tokens(mask_rng, tokens, mask_prob, mask_id, maskable)


def random_length_cut(rng: jax.Array, seq_len: int, prob: float) -> tuple[jax.Array, jax.Array]:
    """With probability `prob`, a cut length `U{1..seq_len}`, else `seq_len` (no cut).

    Returns (cut_length int32 scalar, valid bool [seq_len] = position < cut_length). The shapes
    never change, so one compiled step serves every length.
    """
    use_rng, len_rng = jax.random.split(rng)
    use_cut = jax.random.uniform(use_rng, ()) < prob
    drawn = jax.random.randint(len_rng, (), 1, seq_len + 1, dtype=jnp.int32)
    cut_length = jnp.where(use_cut, drawn, jnp.int32(seq_len))
    return cut_length, jnp.arange(seq_len, dtype=jnp.int32) < cut_length
