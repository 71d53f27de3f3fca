"""Likelihood evaluation of masked diffusion: the Monte Carlo ELBO and multiple-choice scoring.

For a prompt `p` and an answer `a` of length `L` (REFERENCE.md section 4), one Monte Carlo batch of
`b` rows draws `k ~ U{1..L}` and gives row `j` the stratified mask count
`n_j = round(k + j L / b)` wrapped into `1..L` (as `((n - 1) mod L) + 1`, the public reference's
wrapping); row `j` masks exactly `n_j` answer tokens chosen uniformly at random (the prompt is never
masked) and scores `sum over masked of CE * L / n_j`; the batch loss is the mean over its rows.
The log-likelihood estimate is minus the mean of `mc_num / b` batch losses: a lower bound on
`log p(a | p)` in expectation. Optional CFG replaces the prompt by masks in an unconditional twin
of every row and uses `un + (cfg + 1) (cond - un)`.

Several (prompt, answer) pairs are estimated at once: prompts left-padded, answers right-padded,
a key-padding mask, and positions `cumsum(mask) - 1`, so a pair's estimate does not depend on the
padding. The whole estimate is one jitted program (a `lax.scan` over Monte Carlo batches).

Memory: with `chunk_size` > 0 the model returns its final hidden states and the LM head, the
CFG combination and the cross-entropy run a chunk of positions at a time
(`losses.chunked_cross_entropy`), so the float32 logits of a whole Monte Carlo batch
([P * b (* 2), L, V]) never exist; the estimate is the same.

Multiple choice: each option is an answer to the same context; the highest estimate wins.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.diffusion import losses
from llada_jax.diffusion.sampler import Forward, Head, constrain_tokens, guidance

# The model enters as in the sampler (`Forward`, `Head`): here forward(tokens [R, L], *,
# attention_mask [R, L], positions [R, L]) -> logits [R, L, V], or the final hidden states
# [R, L, d] when called with return_hidden=True; head(hidden [..., d]) -> logits [..., V].


def stratified_counts(k: jax.Array, answer_lengths: jax.Array, batch_size: int) -> jax.Array:
    """Mask counts [P, b] of one Monte Carlo batch: n_j = round(k + j L / b) wrapped into 1..L.

    k int [P] in 1..L (one draw per pair), answer_lengths L int [P].
    """
    lengths = jnp.asarray(answer_lengths, jnp.int32)
    j = jnp.arange(batch_size, dtype=jnp.float32)
    # float32 as in the reference; jnp.round rounds half to even like torch.round.
    n = jnp.round(jnp.asarray(k, jnp.float32)[:, None]
                  + j[None, :] * (lengths[:, None].astype(jnp.float32) / batch_size))
    return (n.astype(jnp.int32) - 1) % lengths[:, None] + 1


def elbo_estimate(forward: Forward, tokens: jax.Array, attention_mask: jax.Array,
                  positions: jax.Array, answer_mask: jax.Array, rng: jax.Array, *,
                  mc_num: int, batch_size: int, cfg_scale: float, mask_id: int,
                  head: Head | None = None, chunk_size: int = 0) -> jax.Array:
    """Monte Carlo log-likelihood estimates [P] of the answers (traceable; call inside jit).

    tokens int32 [P, L]: prompt then answer; attention_mask bool [P, L] real tokens;
    positions int32 [P, L]; answer_mask bool [P, L] True on answer tokens (at least one per row).
    Without `head`, `forward` returns logits. With `head`, `forward` is called with
    `return_hidden=True` and `head` maps hidden states to logits `chunk_size` positions at a time
    (0: all at once), so the full logits never exist.
    """
    pairs, length = tokens.shape
    b = batch_size
    answer_lengths = jnp.sum(answer_mask, axis=1).astype(jnp.int32)
    prompt_positions = attention_mask & ~answer_mask
    use_cfg = cfg_scale > 0
    copies = 2 * b if use_cfg else b
    # [P, L] -> [P * copies, L]: each pair's rows are consecutive.
    model_mask, model_positions = (jnp.repeat(a, copies, axis=0)
                                   for a in (attention_mask, positions))

    def batch_loss(key):
        count_key, subset_key = jax.random.split(key)
        k = jax.random.randint(count_key, (pairs,), 1, answer_lengths + 1)          # U{1..L}
        counts = stratified_counts(k, answer_lengths, b)                            # [P, b]
        # A uniform random subset of exactly n answer positions: the n smallest of iid uniforms.
        u = jax.random.uniform(subset_key, (pairs, b, length))
        u = jnp.where(answer_mask[:, None, :], u, 2.0)
        rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
        masked = answer_mask[:, None, :] & (rank < counts[..., None])               # [P, b, L]
        noisy = jnp.where(masked, mask_id, tokens[:, None, :])
        if use_cfg:
            uncond = jnp.where(prompt_positions[:, None, :], mask_id, noisy)
            noisy = jnp.stack([noisy, uncond], axis=2)                              # [P, b, 2, L]
        model_tokens = constrain_tokens(noisy.reshape(pairs * copies, length))
        targets = jnp.broadcast_to(tokens[:, None, :], (pairs, b, length))
        # Logits, or with `head` the hidden states, [P, b, (2,) L, V or d].
        out = forward(model_tokens, attention_mask=model_mask, positions=model_positions,
                      **({} if head is None else {"return_hidden": True}))
        out = out.reshape(pairs, b, *((2,) if use_cfg else ()), length, -1)
        cross_entropy, _ = losses.chunked_cross_entropy(                            # [P, b, L]
            lambda x: guidance(x if head is None else head(x), cfg_scale, 2), out, targets,
            0 if head is None else chunk_size)
        weight = answer_lengths[:, None].astype(jnp.float32) / counts.astype(jnp.float32)
        row_loss = jnp.sum(jnp.where(masked, cross_entropy, 0.0), axis=-1) * weight
        return jnp.mean(row_loss, axis=1)                                          # [P]

    keys = jax.random.split(rng, mc_num // b)
    _, batch_losses = jax.lax.scan(lambda carry, key: (carry, batch_loss(key)), None, keys)
    return -jnp.mean(batch_losses, axis=0)


@functools.partial(jax.jit, static_argnames=("model", "mc_num", "batch_size", "cfg_scale",
                                             "mask_id", "chunk_size"))
def _estimate_jit(params, tokens, attention_mask, positions, answer_mask, rng, *, model, mc_num,
                  batch_size, cfg_scale, mask_id, chunk_size):
    variables = {"params": params}
    forward = functools.partial(model.apply, variables)
    head = functools.partial(model.apply, variables, method="logits_from_hidden")  # the LM head
    return elbo_estimate(forward, tokens, attention_mask, positions, answer_mask, rng,
                         mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale,
                         mask_id=mask_id, head=head, chunk_size=chunk_size)


def pack_pairs(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
               multiple: int = 1) -> dict[str, np.ndarray]:
    """(prompt, answer) id lists -> tokens / attention_mask / positions / answer_mask [P, L].

    Prompts are left-padded and answers right-padded, each width rounded up to `multiple` (fewer
    distinct shapes, fewer compilations). Prompts may be empty; answers may not.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"pack_pairs: expected as many prompts as answers (at least one), found "
                         f"{len(prompts)} prompts and {len(answers)} answers")
    for i, a in enumerate(answers):
        if len(a) == 0:
            raise ValueError(f"pack_pairs: answer {i} is empty; a likelihood needs answer tokens")

    def round_up(n):
        return max(multiple, -(-n // multiple) * multiple)

    width_p = round_up(max(len(p) for p in prompts))
    width_a = round_up(max(len(a) for a in answers))
    tokens = np.full((len(prompts), width_p + width_a), pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    answer_mask = np.zeros(tokens.shape, bool)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        tokens[i, width_p - len(p):width_p] = np.asarray(p, np.int32).reshape(-1)
        tokens[i, width_p:width_p + len(a)] = np.asarray(a, np.int32)
        mask[i, width_p - len(p):width_p + len(a)] = True
        answer_mask[i, width_p:width_p + len(a)] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "attention_mask": mask, "positions": positions,
            "answer_mask": answer_mask}


def log_likelihood(params: Any, model: nn.Module, prompts: Sequence[Sequence[int]],
                   answers: Sequence[Sequence[int]], rng: jax.Array, *, mc_num: int = 128,
                   batch_size: int = 16, cfg_scale: float = 0.0, mask_id: int | None = None,
                   pad_id: int | None = None, pairs_per_call: int = 8,
                   pad_multiple: int = 16, chunk_size: int = 512) -> np.ndarray:
    """Monte Carlo log-likelihood estimates, float32 [N], of N (prompt, answer) id lists.

    Pairs are estimated `pairs_per_call` at a time (the last call padded by repeating a pair), so
    one compiled program serves a whole evaluation set of similar lengths. `chunk_size`: the LM
    head and cross-entropy run over that many positions at a time (0: the whole sequence).
    """
    config = getattr(model, "config", None)
    mask_id = config.mask_token_id if mask_id is None else mask_id
    pad_id = config.pad_token_id if pad_id is None else pad_id
    if mc_num <= 0 or batch_size <= 0 or mc_num % batch_size:
        raise ValueError(f"log_likelihood: mc_num={mc_num} must be a positive multiple of "
                         f"batch_size={batch_size}")
    if cfg_scale < 0:
        raise ValueError(f"log_likelihood: cfg_scale must be >= 0, found {cfg_scale}")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"log_likelihood: chunk_size must be an integer >= 0, found "
                         f"{chunk_size!r}")
    if pad_id == mask_id:
        raise ValueError(f"log_likelihood: pad_id={pad_id} must differ from mask_id={mask_id}")
    if len(prompts) != len(answers):
        raise ValueError(f"log_likelihood: {len(prompts)} prompts but {len(answers)} answers")
    max_len = getattr(config, "max_sequence_length", None)
    estimates = []
    for call, start in enumerate(range(0, len(prompts), pairs_per_call)):
        real = min(pairs_per_call, len(prompts) - start)
        # The last call repeats its last pair up to `pairs_per_call` (one compiled shape).
        rows = [start + min(i, real - 1) for i in range(pairs_per_call)]
        chunk_p, chunk_a = [prompts[i] for i in rows], [answers[i] for i in rows]
        batch = pack_pairs(chunk_p, chunk_a, pad_id, multiple=pad_multiple)
        if max_len is not None and batch["tokens"].shape[1] > max_len:
            longest = max(len(p) + len(a) for p, a in zip(chunk_p, chunk_a, strict=True))
            raise ValueError(f"log_likelihood: a prompt + answer of {longest} tokens (padded to "
                             f"{batch['tokens'].shape[1]}) exceeds the model's "
                             f"max_sequence_length={max_len}")
        # pack_pairs' keys are the array parameters of _estimate_jit.
        out = _estimate_jit(params, **batch, rng=jax.random.fold_in(rng, call), model=model,
                            mc_num=mc_num, batch_size=batch_size, cfg_scale=float(cfg_scale),
                            mask_id=mask_id, chunk_size=chunk_size)
        estimates.append(np.asarray(out)[:real])
    return np.concatenate(estimates) if estimates else np.zeros((0,), np.float32)


def multiple_choice(params: Any, model: nn.Module, contexts: Sequence[Sequence[int]],
                    choices: Sequence[Sequence[Sequence[int]]], rng: jax.Array,
                    labels: Sequence[int] | None = None, **kwargs) -> dict[str, Any]:
    """Scores every option of every question; the highest estimate is the prediction.

    Returns {"scores": list of float arrays (one per question), "predictions": int [Q]} and, with
    `labels`, "accuracy" (fraction of questions predicted right). kwargs go to `log_likelihood`.
    """
    if len(contexts) != len(choices):
        raise ValueError(f"multiple_choice: {len(contexts)} contexts but {len(choices)} choice "
                         f"lists")
    for q, options in enumerate(choices):
        if len(options) == 0:
            raise ValueError(f"multiple_choice: question {q} has no choices")
    owner = np.asarray([q for q, options in enumerate(choices) for _ in options])  # question
    flat = log_likelihood(params, model, [list(contexts[q]) for q in owner],
                          [list(option) for options in choices for option in options], rng,
                          **kwargs)
    scores = [flat[owner == q] for q in range(len(contexts))]
    predictions = np.asarray([int(np.argmax(s)) for s in scores], np.int64)
    out: dict[str, Any] = {"scores": scores, "predictions": predictions}
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != predictions.shape:
            raise ValueError(f"multiple_choice: expected {len(predictions)} labels, found "
                             f"{labels.shape[0] if labels.ndim else labels}")
        for q, (label, options) in enumerate(zip(labels, choices, strict=True)):
            if not 0 <= label < len(options):
                raise ValueError(f"multiple_choice: label {label} of question {q} is outside "
                                 f"[0, {len(options)})")
        out["accuracy"] = float(np.mean(predictions == labels))
    return out
