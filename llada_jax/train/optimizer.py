"""Optimizer, learning-rate schedules and gradient accumulation of the trainer.

* AdamW (REFERENCE.md section 2: weight decay 0.1, betas 0.9 / 0.95) after global-norm clipping.
  Weight decay skips the RMSNorm scales: decaying a gain pulls it towards 0 (not towards the
  identity 1 it starts at), which only fights the normalisation. Embedding, LM head and every
  projection kernel are decayed. Norm scales are found by their parameter name (`scale`), not by
  rank: scanned layers give them a leading `layers` axis, so they are 2-D.
* Schedules (step s counts optimizer updates, from 0):
    - warmup (all schedules): lr(s) = peak * (s + 1) / warmup_steps for s < warmup_steps, so the
      very first update already moves (a 0 learning rate would waste it);
    - `wsd` (warmup-stable-decay): peak until `decay_start = steps - round(decay_fraction *
      steps)`, then linear to `min_lr_ratio * peak`, reached at s = steps;
    - `cosine`: after warmup, min + (peak - min) * (1 + cos(pi * (s - warmup) / (steps -
      warmup))) / 2;
    - `constant`: peak after warmup.
* Parameter groups (LLaDA-V): `vision_tower`, `projector`, `language_model` (the top-level
  names of `LLaDAV`'s params; everything of a plain LLaDA model is `language_model`).
  `train.trainable` names the groups that train; the others are frozen: their gradients are
  zeroed before clipping (so they do not count in the global norm) and their updates are exactly
  0 (`optax.set_to_zero`, no Adam moments kept), so they stay bit-identical. Each trainable group
  has its own AdamW whose schedule has the shape of `train.schedule` and the peak
  `train.group_learning_rates.<group>` (0: `train.learning_rate`), via `optax.multi_transform`.
  With every group trainable at one learning rate the optimizer is the plain AdamW above.
* Non-finite updates: with `train.max_bad_steps = N > 0` the whole chain is wrapped in
  `optax.apply_if_finite`: an update whose gradients hold a NaN or an Inf leaves params and
  optimizer state exactly as they were (the step counter still advances, so the next step draws
  new noise), up to N in a row; the (N+1)-th is applied, and the trainer stops on the non-finite
  state it makes. The wrapper adds counters to the optimizer state, so N = 0 (the default: the
  trainer stops at the first non-finite step) keeps the plain layout.
* Gradient accumulation runs *inside* the jitted step as a `lax.scan` over micro-batches (see
  `accumulate_gradients`), not with `optax.MultiSteps`: one call of the step is one optimizer
  update, so the step counter, the schedule, logging and checkpoints all count updates; there
  is no extra params-sized accumulator in the optimizer state to shard and checkpoint; and the
  whole global batch is transferred once per update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llada_jax.config import PARAM_GROUPS, fail, parse_trainable


def make_schedule(train: ml_collections.ConfigDict,
                  peak: float | None = None) -> Callable[[jax.Array], jax.Array]:
    """The learning rate as a function of the update count (jit-friendly), from `config.train`;
    `peak` (a parameter group's, see `group_peak_learning_rates`) replaces its learning_rate."""
    peak = float(train.learning_rate if peak is None else peak)
    floor = peak * float(train.min_lr_ratio)
    total = int(train.steps)
    warmup = int(train.warmup_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * (s + 1.0) / max(warmup, 1)
        if train.schedule == "constant":
            after = jnp.full_like(s, peak)
        elif train.schedule == "wsd":
            decay_steps = round(float(train.decay_fraction) * total)
            decay_start = total - decay_steps
            frac = (jnp.clip((s - decay_start) / decay_steps, 0.0, 1.0) if decay_steps > 0
                    else jnp.zeros_like(s))
            after = peak + (floor - peak) * frac
        elif train.schedule == "cosine":
            span = max(total - warmup, 1)
            frac = jnp.clip((s - warmup) / span, 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            fail("train.schedule", "one of wsd, cosine, constant", train.schedule)
        return jnp.where(s < warmup, warm, after)

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True for every parameter that gets weight decay: all but the RMSNorm `scale`s."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(entry, "key", None) == "scale" for entry in path), params)


def param_group(path: tuple[Any, ...]) -> str:
    """The group of the parameter at `path` (a tree path): its top-level name if that is one of
    `PARAM_GROUPS` (LLaDA-V), else `language_model` (a plain LLaDA model)."""
    first = getattr(path[0], "key", None) if path else None
    return first if first in PARAM_GROUPS else "language_model"


def param_group_labels(params: Any) -> Any:
    """The tree of `param_group` names, shaped like `params`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def group_peak_learning_rates(train: ml_collections.ConfigDict) -> dict[str, float]:
    """Peak learning rate of every group: `train.group_learning_rates.<group>`, or
    `train.learning_rate` where that is 0."""
    return {g: float(train.group_learning_rates[g] or train.learning_rate) for g in PARAM_GROUPS}


def stop_frozen_gradients(params: Any, trainable: tuple[str, ...]) -> Any:
    """`params` with `stop_gradient` on the frozen groups: the step then never computes their
    gradients (stage 1 skips the vision tower's backward pass altogether)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if param_group(path) in trainable else jax.lax.stop_gradient(p), params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when grad_clip <= 0) followed by AdamW on the schedule;
    per-group AdamW and frozen groups when `train.trainable` / `train.group_learning_rates` ask
    for them; skipping of non-finite updates when `train.max_bad_steps` > 0 (see the module
    docstring)."""
    def adamw(peak):  # AdamW on the schedule of train.schedule with this peak
        return optax.adamw(make_schedule(train, peak), b1=float(train.b1), b2=float(train.b2),
                           eps=float(train.adam_eps), weight_decay=float(train.weight_decay),
                           mask=weight_decay_mask)

    trainable = parse_trainable(train.trainable)
    steps = []
    peaks = group_peak_learning_rates(train)
    if trainable == PARAM_GROUPS and len(set(peaks.values())) == 1:
        # One AdamW at the groups' shared peak (train.learning_rate unless every group names
        # another rate).
        update = adamw(peaks["language_model"])
    else:
        frozen = tuple(g for g in PARAM_GROUPS if g not in trainable)
        if frozen:
            steps.append(optax.masked(optax.set_to_zero(), lambda params: jax.tree.map(
                lambda group: group in frozen, param_group_labels(params))))
        update = optax.multi_transform(
            {g: adamw(peaks[g]) if g in trainable else optax.set_to_zero()
             for g in PARAM_GROUPS}, param_group_labels)
    if train.grad_clip and train.grad_clip > 0:
        steps.append(optax.clip_by_global_norm(float(train.grad_clip)))
    tx = optax.chain(*steps, update) if steps else update
    if train.max_bad_steps > 0:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=int(train.max_bad_steps))
    return tx


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """Leading batch axis B -> [num_micro_batches, B / num_micro_batches, ...].

    Micro-batch j takes rows j, j + k, j + 2k, ... (k = num_micro_batches). The batch is sharded
    over devices in contiguous row blocks, so this keeps every micro-batch spread over all
    devices (each device holds B / (k * devices) rows of each) and the split is a local reshape.
    """
    def split(x):
        rows = x.shape[0]
        if rows % num_micro_batches:
            raise ValueError(f"batch of {rows} rows does not split into {num_micro_batches} "
                             f"micro-batches (config.train.grad_accum_steps)")
        x = x.reshape((rows // num_micro_batches, num_micro_batches, *x.shape[1:]))
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], params: Any,
                         micro_batches: Any, num_micro_batches: int,
                         grad_shardings: Any = None) -> tuple[jax.Array, Any, Any]:
    """Mean loss and mean gradient over micro-batches, and the summed auxiliary outputs.

    `loss_fn(params, micro_batch) -> (loss, aux)` where aux is a tree of counts to be summed
    (e.g. correct / noised tokens). `micro_batches` has a leading axis of `num_micro_batches`.
    With equal-size micro-batches whose losses are means over their rows, the mean of the
    micro-batch losses (and gradients) is the loss (and gradient) of the whole batch.
    Gradients are summed in float32 and returned in the parameters' dtypes; `grad_shardings`
    (optional) pins the accumulator to the parameters' sharding so it is never replicated.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))
        return loss, grads, aux

    def constrain(tree):
        return (tree if grad_shardings is None
                else jax.lax.with_sharding_constraint(tree, grad_shardings))

    def body(carry, micro_batch):
        loss_sum, grad_sum, aux_sum = carry
        (loss, aux), grads = grad_fn(params, micro_batch)
        grad_sum = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads))
        aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return (loss_sum + loss, grad_sum, aux_sum), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    aux_shape = jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)
    init = (jnp.zeros((), jnp.float32),
            constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
    (loss_sum, grad_sum, aux_sum), _ = jax.lax.scan(body, init, micro_batches)
    grads = jax.tree.map(lambda g, p: (g / num_micro_batches).astype(p.dtype), grad_sum, params)
    return loss_sum / num_micro_batches, grads, aux_sum
