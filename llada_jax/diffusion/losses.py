"""The 1/p-weighted cross-entropy objectives of masked diffusion (REFERENCE.md section 2).

Both objectives score only the noised positions, weight each by 1/p (p = the row's mask
probability), and differ in the normaliser:

  * pre-training: `sum_masked CE / p` divided by `batch * seq_len` (`seq_len` = the cut length for
    random-length batches), an upper bound on the negative log-likelihood per token;
  * SFT and the LLaDA-V masked-response loss: per row `sum_masked CE / p / answer_len`, where
    `answer_len` is the number of maskable tokens of the row (the answer *including* its EOS
    padding, which is trained on so the model learns to stop), then the mean over rows.

Cross-entropies are computed from float32 log-softmax whatever the compute dtype of the logits.
These are pure functions of arrays; the step (train/step.py) chooses one by `train.objective`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in float32: logits [B, L, V], targets int [B, L] -> [B, L]."""
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    return log_normaliser - target_logits[..., 0]


def _weighted_masked_ce(logits, targets, noised, mask_prob) -> jax.Array:
    """CE / p at noised positions, 0 elsewhere: [B, L] float32."""
    ce = token_cross_entropy(logits, targets)
    return jnp.where(noised, ce / mask_prob[:, None].astype(jnp.float32), 0.0)


def pretrain_loss(logits: jax.Array, targets: jax.Array, noised: jax.Array, mask_prob: jax.Array,
                  num_positions: jax.Array | int | None = None) -> jax.Array:
    """sum over noised positions of CE / p, divided by batch * num_positions.

    logits [B, L, V]; targets (clean tokens) int [B, L]; noised bool [B, L]; mask_prob [B];
    num_positions: the sequence length the batch counts as (the random-length cut; default L).
    """
    batch, length = targets.shape
    num_positions = length if num_positions is None else num_positions
    total = jnp.sum(_weighted_masked_ce(logits, targets, noised, mask_prob))
    return total / (batch * jnp.asarray(num_positions, jnp.float32))


def answer_lengths(maskable: jax.Array) -> jax.Array:
    """Number of maskable tokens per row (answer plus its EOS padding): int32 [B]."""
    return jnp.sum(maskable.astype(jnp.int32), axis=-1)


def sft_loss(logits: jax.Array, targets: jax.Array, noised: jax.Array, mask_prob: jax.Array,
             maskable: jax.Array) -> jax.Array:
    """Mean over rows of (sum over noised positions of CE / p) / answer_len.

    `maskable` bool [B, L] marks the answer and its EOS padding; rows without any maskable token
    contribute 0 (and still count in the mean, as rows of the batch).
    """
    per_row = jnp.sum(_weighted_masked_ce(logits, targets, noised, mask_prob), axis=-1)
    lengths = answer_lengths(maskable).astype(jnp.float32)
    return jnp.mean(per_row / jnp.maximum(lengths, 1.0))


def masked_accuracy_counts(logits: jax.Array, targets: jax.Array,
                           noised: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(number of noised positions whose argmax prediction is the clean token, number noised).

    Counts rather than a ratio, so that micro-batches and devices can be summed before dividing.
    """
    correct = (jnp.argmax(logits, axis=-1) == targets) & noised
    return jnp.sum(correct.astype(jnp.int32)), jnp.sum(noised.astype(jnp.int32))
