"""The 1/p-weighted cross-entropy objectives of masked diffusion (REFERENCE.md section 2).

Both objectives score only the noised positions, weight each by 1/p (p = the row's mask
probability), and differ in the normaliser:

  * pre-training: `sum_masked CE / p` divided by `batch * seq_len` (`seq_len` = the cut length for
    random-length batches), an upper bound on the negative log-likelihood per token;
  * SFT and the LLaDA-V masked-response loss: per row `sum_masked CE / p / answer_len`, where
    `answer_len` is the number of maskable tokens of the row, then the mean over rows. For SFT
    the maskable tokens are the answer *including* its EOS padding up to the longest row of the
    mini-batch (trained on, so the model learns to stop; LLaDA's GUIDELINES.md); for LLaDA-V
    they are the labelled tokens (`labels != -100`; the released `modeling_llada.py` divides each
    token's CE / p by its row's labelled count, sums, and divides by the rows of the batch).

Cross-entropies are computed from float32 log-softmax whatever the compute dtype of the logits.
These are pure functions of arrays; the step (train/step.py) chooses one by `train.objective`.

Memory: the logits of a training batch are [B, L, V] with V = 126,464; in float32, with their
gradient, that is several times the activations of the whole network. `chunked_cross_entropy`
computes the per-position CE (and the argmax hit used by the accuracy metric) from the final
hidden states a chunk of the sequence at a time inside a `lax.scan`, each chunk under
`jax.checkpoint`: only one chunk's logits exist at any time, in the forward pass and in the
backward pass (which recomputes them), and the values and gradients are those of the full
computation. The `*_from_ce` functions then apply the normalisers to those [B, L] arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in float32: logits [B, L, V], targets int [B, L] -> [B, L]."""
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    return log_normaliser - target_logits[..., 0]


def _cross_entropy_and_hits(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(CE float32 [..., L], argmax == target bool [..., L]) of logits [..., L, V]."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    ce = jax.nn.logsumexp(logits, axis=-1) - target_logits[..., 0]
    return ce, jnp.argmax(logits, axis=-1) == targets


def chunked_cross_entropy(logits_fn: Callable[[Any], jax.Array], hidden: Any, targets: jax.Array,
                          chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-position CE and argmax hits without ever holding the logits of the whole sequence.

    hidden: an array [..., L, d], or a tuple of such arrays (e.g. the conditional and
    unconditional halves of classifier-free guidance); `logits_fn(hidden_chunk) -> logits
    [..., C, V]` is applied to chunks of C = `chunk_size` positions (same structure as
    `hidden`); targets int [..., L]. Returns (CE float32 [..., L], argmax == target bool
    [..., L]). `chunk_size` 0 (or >= L) is the plain, unchunked computation. A length that is
    not a multiple of the chunk is padded (the padded positions are computed and dropped).

    Each chunk runs under `jax.checkpoint` inside a `lax.scan`, so the backward pass too
    recomputes one chunk's logits at a time instead of keeping all of them as residuals.
    """
    length = targets.shape[-1]
    if chunk_size <= 0 or chunk_size >= length:
        return _cross_entropy_and_hits(logits_fn(hidden), targets)
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size

    def chunks(x, position_axis):  # [..., L, (d)] -> [num_chunks, ..., C, (d)]
        axis = x.ndim + position_axis
        if padded != length:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, padded - length)
            x = jnp.pad(x, widths)
        x = x.reshape((*x.shape[:axis], num_chunks, chunk_size, *x.shape[axis + 1:]))
        return jnp.moveaxis(x, axis, 0)

    hidden_chunks = jax.tree.map(lambda h: chunks(h, -2), hidden)
    target_chunks = chunks(targets, -1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(hidden_chunk, target_chunk):
        return _cross_entropy_and_hits(logits_fn(hidden_chunk), target_chunk)

    def body(carry, xs):
        return carry, one_chunk(*xs)

    _, (ce, hits) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))

    def unchunk(x):  # [num_chunks, ..., C] -> [..., L]
        x = jnp.moveaxis(x, 0, -2)
        return x.reshape((*x.shape[:-2], padded))[..., :length]

    return unchunk(ce), unchunk(hits)


def _weight_noised(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array) -> jax.Array:
    """CE / p at noised positions, 0 elsewhere: [B, L] float32."""
    return jnp.where(noised, ce / mask_prob[:, None].astype(jnp.float32), 0.0)


def pretrain_loss_from_ce(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array,
                          num_positions: jax.Array | int | None = None) -> jax.Array:
    """`pretrain_loss` from per-position cross-entropies ce float32 [B, L]."""
    batch, length = ce.shape
    num_positions = length if num_positions is None else num_positions
    total = jnp.sum(_weight_noised(ce, noised, mask_prob))
    return total / (batch * jnp.asarray(num_positions, jnp.float32))


def sft_loss_from_ce(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array,
                     maskable: jax.Array) -> jax.Array:
    """`sft_loss` (and LLaDA-V's masked-response loss) from ce float32 [B, L]."""
    per_row = jnp.sum(_weight_noised(ce, noised, mask_prob), axis=-1)
    lengths = answer_lengths(maskable).astype(jnp.float32)
    return jnp.mean(per_row / jnp.maximum(lengths, 1.0))


def pretrain_loss(logits: jax.Array, targets: jax.Array, noised: jax.Array, mask_prob: jax.Array,
                  num_positions: jax.Array | int | None = None) -> jax.Array:
    """sum over noised positions of CE / p, divided by batch * num_positions.

    logits [B, L, V]; targets (clean tokens) int [B, L]; noised bool [B, L]; mask_prob [B];
    num_positions: the sequence length the batch counts as (the random-length cut; default L).
    """
    return pretrain_loss_from_ce(token_cross_entropy(logits, targets), noised, mask_prob,
                                 num_positions)


def answer_lengths(maskable: jax.Array) -> jax.Array:
    """Number of maskable tokens per row (answer plus its EOS padding): int32 [B]."""
    return jnp.sum(maskable.astype(jnp.int32), axis=-1)


def sft_loss(logits: jax.Array, targets: jax.Array, noised: jax.Array, mask_prob: jax.Array,
             maskable: jax.Array) -> jax.Array:
    """Mean over rows of (sum over noised positions of CE / p) / answer_len.

    `maskable` bool [B, L] marks the answer and its EOS padding; rows without any maskable token
    contribute 0 (and still count in the mean, as rows of the batch).
    """
    return sft_loss_from_ce(token_cross_entropy(logits, targets), noised, mask_prob, maskable)


def masked_accuracy_counts(logits: jax.Array, targets: jax.Array,
                           noised: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(number of noised positions whose argmax prediction is the clean token, number noised).

    Counts rather than a ratio, so that micro-batches and devices can be summed before dividing.
    """
    return hit_counts(jnp.argmax(logits, axis=-1) == targets, noised)


def hit_counts(hits: jax.Array, noised: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`masked_accuracy_counts` from argmax hits bool [B, L] (see `chunked_cross_entropy`)."""
    correct = hits & noised
    return jnp.sum(correct.astype(jnp.int32)), jnp.sum(noised.astype(jnp.int32))
