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
computation. `pretrain_loss` and `sft_loss` then apply the normalisers to those [B, L] arrays.

`lm_head_cross_entropy` is the same computation for the train step, given the LM-head kernel
itself, with a hand-written backward pass (`jax.custom_vjp`) that keeps the sharded memory small
on a mesh: the kernel is laid out vocabulary-parallel (its vocabulary dim split over every mesh
axis, hidden states of the chunk replicated), so each device computes its slice of the chunk's
logits, and the kernel's gradient is accumulated over the chunks in that same split layout. The
generic scan above instead builds, on each device, the whole [d, V] float32 gradient of every
chunk and all-reduces it (1.9 GiB for LLaDA-8B).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def cross_entropy_and_hits(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(CE float32 [..., L], argmax == target bool [..., L]) of logits [..., L, V] and int
    targets [..., L]: -log softmax(logits)[target] from float32 logits, whatever their dtype."""
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
    if chunk_size <= 0 or chunk_size >= targets.shape[-1]:
        return cross_entropy_and_hits(logits_fn(hidden), targets)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(hidden_chunk, target_chunk):
        return cross_entropy_and_hits(logits_fn(hidden_chunk), target_chunk)

    return _scan_chunks(one_chunk, hidden, targets, chunk_size)


def _scan_chunks(chunk_fn: Callable, hidden: Any, targets: jax.Array,
                 chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """(CE, hits) [..., L] of `chunk_fn(hidden chunk, target chunk) -> (CE, hits) [..., C]`
    applied chunk by chunk in a `lax.scan` (`hidden` an array [..., L, d] or a tuple of them)."""
    chunks = (jax.tree.map(lambda h: _split_chunks(h, -2, chunk_size), hidden),
              _split_chunks(targets, -1, chunk_size))
    _, (ce, hits) = jax.lax.scan(lambda carry, xs: (carry, chunk_fn(*xs)), None, chunks)
    length = targets.shape[-1]
    return _join_chunks(ce, -1, length), _join_chunks(hits, -1, length)


def _split_chunks(x: jax.Array, position_axis: int, chunk_size: int) -> jax.Array:
    """[..., L, (d)] -> [num_chunks, ..., C, (d)], zero-padding L up to a multiple of C."""
    axis = x.ndim + position_axis
    length = x.shape[axis]
    num_chunks = -(-length // chunk_size)
    if num_chunks * chunk_size != length:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, num_chunks * chunk_size - length)
        x = jnp.pad(x, widths)
    x = x.reshape((*x.shape[:axis], num_chunks, chunk_size, *x.shape[axis + 1:]))
    return jnp.moveaxis(x, axis, 0)


def _join_chunks(x: jax.Array, position_axis: int, length: int) -> jax.Array:
    """The inverse of `_split_chunks`: [num_chunks, ..., C, (d)] -> [..., L, (d)]."""
    axis = x.ndim + position_axis            # the chunk-position axis C
    x = jnp.moveaxis(x, 0, axis - 1)         # [..., num_chunks, C, (d)]
    x = x.reshape((*x.shape[:axis - 1], x.shape[axis - 1] * x.shape[axis], *x.shape[axis + 1:]))
    return jax.lax.slice_in_dim(x, 0, length, axis=axis - 1)


def _mesh_axes(size: int | None = None) -> tuple[str, ...]:
    """The axes (of size > 1) of the mesh the caller is traced under; () without one. With
    `size`, only the leading axes whose product divides it (an even split of that dim)."""
    mesh = jax.sharding.get_abstract_mesh()  # without one: no axis names
    axes, product = [], 1
    for name in mesh.axis_names:
        if mesh.shape[name] > 1:
            if size is not None and size % (product * mesh.shape[name]):
                break
            axes.append(name)
            product *= mesh.shape[name]
    return tuple(axes)


def _vocab_parallel(x: jax.Array, vocab_axis: int) -> jax.Array:
    """Constrains x to be split along `vocab_axis` over the mesh axes, replicated otherwise."""
    axes = _mesh_axes(x.shape[vocab_axis])
    if not axes:
        return x
    spec = [None] * x.ndim
    spec[vocab_axis] = axes
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def _replicated(x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, PartitionSpec()) if _mesh_axes() else x


def _chunk_logits(hidden_chunk: jax.Array, kernel: jax.Array) -> jax.Array:
    """[B, C, d] @ [d, V] in the kernel's (compute) dtype; the result split along V."""
    hidden_chunk = _replicated(hidden_chunk.astype(kernel.dtype))
    logits = jax.lax.dot_general(hidden_chunk, kernel, (((2,), (0,)), ((), ())))
    return _vocab_parallel(logits, 2)


def _target_mask(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # An iota comparison rather than take_along_axis: elementwise, so it stays split along V.
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]


def _chunk_cross_entropy(logits: jax.Array, targets: jax.Array):
    """(CE, argmax hits, logsumexp) of logits [B, C, V] in float32."""
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    # Exactly the target logit: every other term of the sum is +0.
    target_logit = jnp.sum(jnp.where(_target_mask(logits, targets), logits, 0.0), axis=-1)
    return log_normaliser - target_logit, jnp.argmax(logits, axis=-1) == targets, log_normaliser


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lm_head_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          chunk_size: int, compute_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Per-position CE and argmax hits of the LM head `hidden @ kernel`, chunk by chunk.

    hidden [B, L, d] (final normed hidden states); kernel [d, V] (the LM head's parameter, any
    dtype; multiplied in `compute_dtype` as the model does); targets int [B, L]; chunk_size C
    > 0 (a length that is not a multiple is zero-padded; C >= L is one chunk). Returns (CE
    float32 [B, L], argmax == target bool [B, L]), equal to `chunked_cross_entropy` with the
    LM head as `logits_fn`, values and gradients (see the module docstring for the layout).
    """
    _, chunk_size, weights = _head_setup(kernel, targets, chunk_size, compute_dtype)
    return _scan_chunks(lambda h, t: _chunk_cross_entropy(_chunk_logits(h, weights), t)[:2],
                        hidden, targets, chunk_size)


def _head_setup(kernel, targets, chunk_size, compute_dtype):
    """(length, chunk size, the kernel in the compute dtype split along the vocabulary)."""
    length = targets.shape[-1]
    return length, min(chunk_size, length), _vocab_parallel(kernel.astype(compute_dtype), 1)


def _head_fwd(hidden, kernel, targets, chunk_size, compute_dtype):
    out = lm_head_cross_entropy(hidden, kernel, targets, chunk_size, compute_dtype)
    return out, (hidden, kernel, targets)


def _head_bwd(chunk_size, compute_dtype, residuals, cotangents):
    hidden, kernel, targets = residuals
    ce_cotangent = cotangents[0].astype(jnp.float32)   # the hits are not differentiable
    length, chunk_size, weights = _head_setup(kernel, targets, chunk_size, compute_dtype)

    def body(kernel_grad, xs):
        hidden_chunk, target_chunk, ce_grad = xs
        logits = _chunk_logits(hidden_chunk, weights)
        _, _, log_normaliser = _chunk_cross_entropy(logits, target_chunk)
        # dCE/dlogits = softmax - onehot, then back to the logits' dtype as autodiff's cast does.
        softmax = jnp.exp(logits.astype(jnp.float32) - log_normaliser[..., None])
        logits_grad = (softmax - _target_mask(logits, target_chunk)) * ce_grad[..., None]
        logits_grad = _vocab_parallel(logits_grad.astype(logits.dtype), 2)
        hidden_grad = jax.lax.dot_general(logits_grad, weights, (((2,), (1,)), ((), ())))
        chunk_kernel_grad = jax.lax.dot_general(
            _replicated(hidden_chunk.astype(weights.dtype)), logits_grad,
            (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
        kernel_grad = _vocab_parallel(kernel_grad + chunk_kernel_grad, 1)
        return kernel_grad, hidden_grad

    kernel_grad = _vocab_parallel(jnp.zeros(kernel.shape, jnp.float32), 1)
    kernel_grad, hidden_grad = jax.lax.scan(
        body, kernel_grad, (_split_chunks(hidden, -2, chunk_size),
                            _split_chunks(targets, -1, chunk_size),
                            _split_chunks(ce_cotangent, -1, chunk_size)))
    hidden_grad = _join_chunks(hidden_grad, -2, length).astype(hidden.dtype)
    return hidden_grad, kernel_grad.astype(kernel.dtype), None


lm_head_cross_entropy.defvjp(_head_fwd, _head_bwd)


def _weight_noised(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array) -> jax.Array:
    """CE / p at noised positions, 0 elsewhere: [B, L] float32."""
    return jnp.where(noised, ce / mask_prob[:, None].astype(jnp.float32), 0.0)


def pretrain_loss(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array,
                  num_positions: jax.Array | int) -> jax.Array:
    """sum over noised positions of CE / p, divided by batch * num_positions.

    ce float32 [B, L] (per-position cross-entropies against the clean tokens); noised bool
    [B, L]; mask_prob [B]; num_positions: the sequence length the batch counts as (L, or the
    random-length cut).
    """
    total = jnp.sum(_weight_noised(ce, noised, mask_prob))
    return total / (ce.shape[0] * jnp.asarray(num_positions, jnp.float32))


def sft_loss(ce: jax.Array, noised: jax.Array, mask_prob: jax.Array,
             maskable: jax.Array) -> jax.Array:
    """Mean over rows of (sum over noised positions of CE / p) / answer_len (SFT and LLaDA-V's
    masked-response loss), from ce float32 [B, L].

    `maskable` bool [B, L] marks the answer and its EOS padding; answer_len is its count per row.
    Rows without any maskable token contribute 0 (and still count in the mean, as rows of the
    batch).
    """
    per_row = jnp.sum(_weight_noised(ce, noised, mask_prob), axis=-1)
    lengths = jnp.sum(maskable.astype(jnp.int32), axis=-1).astype(jnp.float32)
    return jnp.mean(per_row / jnp.maximum(lengths, 1.0))


def hit_counts(hits: jax.Array, noised: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(number of noised positions whose argmax prediction is the clean token, number noised),
    from argmax hits bool [B, L] (`cross_entropy_and_hits`). Counts rather than a ratio, so
    that micro-batches and devices can be summed before dividing."""
    return jnp.sum((hits & noised).astype(jnp.int32)), jnp.sum(noised.astype(jnp.int32))
