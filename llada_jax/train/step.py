"""The jitted train and eval steps: noise -> model.apply -> loss -> grads -> optimizer.

`make_train_step` returns ONE jitted function `(state, batch) -> (state, metrics)` with explicit
in/out shardings and the state donated (its buffers are reused for the new state, so a step
needs one copy of params and optimizer state, not two). It is traced and run under
`jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, which give the model's logical activation
constraints their meaning.

Inside a step:
  * the step key is `fold_in(state.rng, state.step)` (as md4 does): a resumed run draws exactly
    the noise the uninterrupted run would have drawn;
  * the noise (t, masks, the random-length cut) is drawn for the whole global batch before the
    micro-batch loop, so grad accumulation changes how the batch is computed, not what it is;
  * pre-training batches are cut to a random length with probability `train.random_length_prob`
    (noise.random_length_cut; no recompilation), SFT batches never are;
  * the gradient is the mean over `train.grad_accum_steps` micro-batches (optimizer.py); the
    parameter groups that `train.trainable` leaves out are frozen (no gradient computed).

Batches follow the project convention: `tokens` int32 [B, L]; optional `segment_ids` int32 [B, L]
(0 = padding: never attended to, never noised, never scored); optional `maskable` bool [B, L].
LLaDA-V batches add `schema.IMAGE_FIELDS` (pixels and the image-token plan, sharded by rows
like the tokens), which go to the model as they are; their image positions are never maskable.

Conversation batches (SFT, LLaDA-V) also carry `fill` bool [B, L]: the EOS positions that exist
only because the row was padded to the static `train.seq_len` (a suffix of the row). The official
recipes pad each mini-batch only to its longest row, so per micro-batch the positions at or after
`longest = max over its rows of (L - fill count)` are padding here (never attended to, never
noised, never counted), while fill positions before `longest` keep what `maskable` says (SFT:
trained on and counted in answer_len; LLaDA-V: never labelled). The loss of such a batch is the
loss of the batch trimmed to its longest row, with static shapes.

Objectives (`train.objective`): 'pretrain' (sum of CE / p over batch * seq_len), 'sft' and
'masked_response' (per row sum of CE / p over the row's maskable count, mean over rows; LLaDA-V's
released `modeling_llada.py` normalises by the row's labelled count exactly like LLaDA's SFT, so
the two differ only in which tokens the data marks maskable). With `train.loss_chunk_size` > 0
the network returns its final hidden states and the LM head + cross-entropy run a chunk of the
sequence at a time (losses.lm_head_cross_entropy, whose backward keeps the LM head's
gradient split over the mesh): the [B, L, V] logits never exist.

Metrics: `loss`, `accuracy` (argmax = clean token, over noised positions), `grad_norm` (before
clipping), `learning_rate` (of this update), `noised_tokens`, `cut_length`.

Mixture-of-experts models (model/moe.py) add the router losses to the loss (weights
`train.moe_aux_loss_weight`, `train.moe_z_loss_weight`), report `lm_loss` (the diffusion loss
alone), `moe_aux_loss`, `moe_z_loss` and `moe_load_max_over_mean` (the worst layer's max / mean
expert load; no token is ever dropped), and, in the same jitted step, move every `expert_bias`
by `train.moe_bias_update_rate` * sign(mean load - load) (the auxiliary-loss-free balancing of
LLaDA2; the optimizer never changes it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from llada_jax import parallel
from llada_jax.config import parse_trainable
from llada_jax.data.schema import IMAGE_FIELDS
from llada_jax.diffusion import losses, noise
from llada_jax.model.moe import RouterStats, expert_bias_update
from llada_jax.model.transformer import Transformer
from llada_jax.train.optimizer import (
    accumulate_gradients,
    group_peak_learning_rates,
    make_schedule,
    split_micro_batches,
    stop_frozen_gradients,
)
from llada_jax.train.state import TrainState


class MeshFunction:
    """A jitted function that is always traced, lowered and run under a mesh and rule table."""

    def __init__(self, jitted: Callable, mesh: Mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        """AOT lowering (args may be ShapeDtypeStructs carrying shardings)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


def longest_row_lengths(fill: jax.Array, num_micro_batches: int = 1) -> jax.Array:
    """Per row, the length of the longest real row of its micro-batch: int32 [B].

    fill bool [B, L] (True at the padding that only reaches the static length); a row's real
    length is L minus its fill count. Micro-batches are those of `split_micro_batches` (rows j,
    j + k, j + 2k, ... form micro-batch j), so the trim is the official "pad to the longest row
    of the mini-batch" for each micro-batch the step computes.
    """
    rows, length = fill.shape
    real_lengths = length - jnp.sum(fill.astype(jnp.int32), axis=-1)
    longest = jnp.max(split_micro_batches(real_lengths, num_micro_batches), axis=1)  # [k]
    return longest[jnp.arange(rows) % num_micro_batches]      # row r is in micro-batch r % k


def prepare_batch(batch: dict[str, jax.Array], train: ml_collections.ConfigDict, mask_id: int,
                  rng: jax.Array, allow_cut: bool,
                  num_micro_batches: int = 1) -> dict[str, jax.Array]:
    """Draws the noise for the whole batch; returns the per-row arrays the loss needs.

    Returns `noisy_tokens`, `tokens`, `noised`, `mask_prob`, `maskable` (after removing
    segment-0 padding and the positions past the longest row of the micro-batch, see `fill` in
    the module docstring), `cut_length` [B] (the same value in every row), and, when some key
    must be hidden (a random-length cut is possible, segment ids or `fill` are given),
    `key_mask` [B, L]. `num_micro_batches`: how the step will split the batch (the longest row
    is taken per micro-batch).
    """
    tokens = batch["tokens"]
    rows, length = tokens.shape
    segment_ids = batch.get("segment_ids")
    real = (jnp.ones((rows, length), bool) if segment_ids is None else segment_ids != 0)
    fill = batch.get("fill")
    if fill is not None:
        if fill.shape != tokens.shape:
            raise ValueError(f"batch['fill'] must have the shape of batch['tokens'] "
                             f"{tuple(tokens.shape)}, found {tuple(fill.shape)}")
        longest = longest_row_lengths(fill, num_micro_batches)
        real = real & (jnp.arange(length, dtype=jnp.int32)[None, :] < longest[:, None])
    maskable = batch.get("maskable")
    maskable = real if maskable is None else maskable.astype(bool) & real
    noise_rng, cut_rng = jax.random.split(rng)

    use_cut = allow_cut and train.objective == "pretrain" and train.random_length_prob > 0
    if use_cut:
        cut_length, valid = noise.random_length_cut(cut_rng, length, train.random_length_prob)
    else:
        cut_length, valid = jnp.int32(length), jnp.ones((length,), bool)
    noised = noise.forward_process(noise_rng, tokens, mask_id, train.mask_eps,
                                   maskable & valid[None, :])
    # The forward process's noisy_tokens, noised and mask_prob, then the clean side.
    prepared = {**noised._asdict(), "tokens": tokens, "maskable": maskable,
                "cut_length": jnp.broadcast_to(cut_length, (rows,))}
    # A key mask is only built when some key must be hidden: attention backends without mask
    # support (splash) then still run plain pre-training batches.
    if use_cut or segment_ids is not None or fill is not None:
        prepared["key_mask"] = real & valid[None, :]
    # Untouched: segment ids; LLaDA-V batches' pixels and image-token plan.
    for name in ("segment_ids", *IMAGE_FIELDS):
        if batch.get(name) is not None:
            prepared[name] = batch[name]
    return prepared


def lm_head_kernel(params: Any) -> jax.Array:
    """The LM-head kernel [d, V] of Transformer (`lm_head`) or LLaDAV (`language_model/lm_head`)
    params: with tied embeddings (no `lm_head`) the transposed table `wte`."""
    for scope in (params, params.get("language_model", {})):
        if "lm_head" in scope:
            return nn.unbox(scope["lm_head"]["kernel"])  # boxed (logical axes) or plain
        if "wte" in scope and "blocks" in scope:         # tied: logits = h @ wte^T
            return nn.unbox(scope["wte"]).T
    raise ValueError(f"train.loss_chunk_size > 0 needs the params of a Transformer or LLaDAV "
                     f"(an `lm_head` or a tied `wte`), found {sorted(params)}")


def make_loss_fn(model: nn.Module, objective: str, chunk_size: int = 0,
                 moe_aux_loss_weight: float = 0.0, moe_z_loss_weight: float = 0.0) -> Callable:
    """(params, prepared batch) -> (loss, {correct, noised}) for `train.objective`.

    `chunk_size` > 0 (`train.loss_chunk_size`): the model returns its final hidden states and
    the LM head and cross-entropy run over chunks of that many positions (see the module
    docstring); 0 computes the full logits. Both give the same values and gradients.

    Mixture-of-experts models add the router losses, averaged over MoE layers, to the loss
    (`moe_aux_loss_weight` x load balancing + `moe_z_loss_weight` x z-loss) and return the
    summable `lm_loss`, `moe_aux_loss`, `moe_z_loss` and `moe_load` [layers, experts] with the
    counts.
    """
    is_moe = bool(getattr(getattr(model, "config", None), "is_moe", False))

    def apply(*args, **kwargs):
        """model.apply, and the one `RouterStats` (stacked over the MoE layers) it sowed (None
        for a dense model)."""
        if not is_moe:
            return model.apply(*args, **kwargs), None
        out, state = model.apply(*args, mutable=["moe_stats"], **kwargs)
        return out, jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, RouterStats))[0]

    def loss_fn(params, micro: dict[str, jax.Array]):
        images = {}
        if "pixel_values" in micro:  # LLaDA-V: image tokens at the (never noised) placeholders
            images = {"pixel_values": micro["pixel_values"], "image_sources": tuple(
                micro[name] for name in IMAGE_FIELDS[1:])}
        variables = {"params": params}
        inputs = dict(attention_mask=micro.get("key_mask"),
                      segment_ids=micro.get("segment_ids"), **images)
        if chunk_size > 0:
            hidden, stats = apply(variables, micro["noisy_tokens"], return_hidden=True, **inputs)
            # The LM head with its sharded, hand-written backward.
            ce, hits = losses.lm_head_cross_entropy(hidden, lm_head_kernel(params), micro["tokens"],
                                                    chunk_size, jnp.dtype(model.config.dtype))
        else:
            logits, stats = apply(variables, micro["noisy_tokens"], **inputs)
            ce, hits = losses.cross_entropy_and_hits(logits, micro["tokens"])
        if objective in ("sft", "masked_response"):
            loss = losses.sft_loss(ce, micro["noised"], micro["mask_prob"], micro["maskable"])
        else:
            loss = losses.pretrain_loss(ce, micro["noised"], micro["mask_prob"],
                                        micro["cut_length"][0])
        correct, noised = losses.hit_counts(hits, micro["noised"])
        counts = {"correct": correct, "noised": noised}
        if stats is None:
            return loss, counts
        aux, z = jnp.mean(stats.aux_loss), jnp.mean(stats.z_loss)
        counts.update(lm_loss=loss, moe_aux_loss=aux, moe_z_loss=z, moe_load=stats.load)
        return loss + moe_aux_loss_weight * aux + moe_z_loss_weight * z, counts
    return loss_fn


def train_step_fn(config: ml_collections.ConfigDict, model: Transformer,
                  tx: optax.GradientTransformation,
                  grad_shardings: Any = None) -> Callable[[TrainState, dict], tuple]:
    """The un-jitted step (state, batch) -> (state, metrics)."""
    train = config.train
    mask_id = int(config.model.mask_token_id)
    # The logged rate is the language model's (its group rate when one is set).
    schedule = make_schedule(train, group_peak_learning_rates(train)["language_model"])
    loss_fn = make_loss_fn(model, train.objective, int(train.loss_chunk_size),
                           float(train.moe_aux_loss_weight), float(train.moe_z_loss_weight))
    num_micro = int(train.grad_accum_steps)
    bias_rate = float(train.moe_bias_update_rate)
    trainable = parse_trainable(train.trainable)

    def trained_loss_fn(params, micro):  # frozen groups: no gradient is even computed
        return loss_fn(stop_frozen_gradients(params, trainable), micro)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        prepared = prepare_batch(batch, train, mask_id, rng, allow_cut=True,
                                 num_micro_batches=num_micro)
        micro_batches = split_micro_batches(prepared, num_micro)
        # Every micro-batch stays spread over the batch axes (a local reshape, see
        # split_micro_batches); say so, rather than leave the scan's layout to propagation.
        micro_batches = jax.tree.map(
            lambda x: nn.with_logical_constraint(
                x, (None, "activation_batch") + (None,) * (x.ndim - 2)), micro_batches)
        loss, grads, counts = accumulate_gradients(trained_loss_fn, state.params, micro_batches,
                                                   num_micro, grad_shardings)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": counts["correct"] / jnp.maximum(counts["noised"], 1),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "noised_tokens": counts["noised"],
            "cut_length": prepared["cut_length"][0],
        }
        if "moe_load" in counts:
            # expert_bias is no trained parameter: it keeps its value through the optimizer
            # (no weight decay) and moves only by the load-balancing update.
            params = expert_bias_update(params, counts["moe_load"], bias_rate, state.params)
            # The router losses (means over micro-batches and layers), and the worst layer's
            # max / mean expert load (1 = perfectly balanced).
            metrics.update({k: counts[k] / num_micro
                            for k in ("lm_loss", "moe_aux_loss", "moe_z_loss")})
            load = counts["moe_load"]
            metrics["moe_load_max_over_mean"] = jnp.max(
                jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_train_step(config: ml_collections.ConfigDict, model: Transformer,
                    tx: optax.GradientTransformation, mesh: Mesh,
                    shardings: TrainState) -> MeshFunction:
    """The jitted, sharded, state-donating train step."""
    step = train_step_fn(config, model, tx, grad_shardings=shardings.params)
    jitted = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh, 2)),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    return MeshFunction(jitted, mesh, parallel.logical_rules(config))


def make_eval_step(config: ml_collections.ConfigDict, model: Transformer, mesh: Mesh,
                   param_shardings: Any) -> MeshFunction:
    """The jitted, sharded eval step (params, batch, rng_data) -> {loss, correct, noised}: the
    loss without random lengths. `rng_data` is uint32 key data (`jax.random.key_data`).

    The trainer passes the same key at every evaluation, so successive evals see the same
    noise on the same batches and their losses are directly comparable.
    """
    train = config.train
    mask_id = int(config.model.mask_token_id)
    loss_fn = make_loss_fn(model, train.objective, int(train.loss_chunk_size))

    def eval_step(params, batch, rng_data):
        prepared = prepare_batch(batch, train, mask_id, jax.random.wrap_key_data(rng_data),
                                 allow_cut=False)
        loss, counts = loss_fn(params, prepared)
        # MoE: the diffusion loss only (router weights 0), without the router metrics.
        return {"loss": loss, "correct": counts["correct"], "noised": counts["noised"]}

    replicated = parallel.replicated(mesh)
    jitted = jax.jit(eval_step,
                     in_shardings=(param_shardings, parallel.batch_sharding(mesh, 2), replicated),
                     out_shardings=replicated)
    return MeshFunction(jitted, mesh, parallel.logical_rules(config))
