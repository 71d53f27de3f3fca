"""The training loop: data -> step -> metrics -> checkpoints -> evals, from one CPU to a pod.

`train(config, workdir)` validates the config, builds the mesh, the sharded state (fresh,
restored from `WORKDIR/checkpoints`, or with params taken from `train.init_from`), the input
iterator (restored to its checkpointed position on resume) and the jitted step, then runs
`train.steps` optimizer updates. Side effects stay here: progress lines on the log, TensorBoard
scalars in `WORKDIR/tensorboard`, checkpoints every `train.checkpoint_every` updates and at the
end. Multi-host runs call `parallel.maybe_initialize_distributed()` first; only process 0 logs.

Device-to-host transfers happen once per `train.log_every` steps (the metrics of every step are
kept on device until then), so the host never waits for a step it does not need to.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import input as input_lib
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib
from llada_jax.train.optimizer import make_optimizer
from llada_jax.train.summary import SummaryWriter


class TrainResult(NamedTuple):
    """What a call of `train` leaves behind (besides its files)."""

    state: state_lib.TrainState
    # One entry per update run by this call: its metrics and `step`, the update's 0-based index
    # (the state's step before it).
    history: list[dict[str, float]]
    eval_history: list[dict[str, float]]  # one entry per evaluation, `step` as above


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
    """The model's special ids must be the tokenizer's, and its vocabulary must cover it."""
    m = config.model
    for field, tokenizer_id in (("mask_token_id", tokenizer.mask_id),
                                ("eos_token_id", tokenizer.eos_id),
                                ("bos_token_id", tokenizer.bos_id)):
        if m[field] != tokenizer_id:
            raise ValueError(f"config.model.{field}: expected {tokenizer_id} (the id of "
                             f"tokenizer {config.data.tokenizer!r}), found {m[field]!r}")
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"config.model.vocab_size: expected at least the tokenizer's "
                         f"{tokenizer.vocab_size} ({config.data.tokenizer!r}), "
                         f"found {m.vocab_size!r}")


def _check_same_shapes(expected: Any, found: Any, source: str) -> None:
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_found = dict(jax.tree_util.tree_flatten_with_path(found)[0])
    if flat_expected.keys() != flat_found.keys():
        missing = sorted(jax.tree_util.keystr(k) for k in flat_expected.keys() - flat_found.keys())
        extra = sorted(jax.tree_util.keystr(k) for k in flat_found.keys() - flat_expected.keys())
        raise ValueError(f"config.train.init_from: params of {source} do not match the model: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in flat_expected.items():
        if value.shape != flat_found[key].shape:
            raise ValueError(f"config.train.init_from: param {jax.tree_util.keystr(key)} of "
                             f"{source}: expected shape {value.shape}, found "
                             f"{flat_found[key].shape}")


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _evaluate(config, eval_step, params, tokenizer, mesh, eval_keys) -> dict[str, float]:
    iterator = input_lib.make_eval_iterator(config, tokenizer, mesh)
    losses, correct, noised = [], 0, 0
    for key in eval_keys:
        try:
            host_batch = next(iterator)
        except StopIteration:
            break
        out = jax.device_get(eval_step(params, parallel.global_batch(host_batch, mesh), key))
        losses.append(float(out["loss"]))
        correct += int(out["correct"])
        noised += int(out["noised"])
    if not losses:
        raise ValueError(f"config.data.eval_source={config.data.eval_source!r} yielded no batch "
                         f"of {config.train.batch_size} rows")
    return {"loss": float(np.mean(losses)), "accuracy": correct / max(noised, 1)}


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None,
          devices: Sequence[jax.Device] | None = None) -> TrainResult:
    """Trains (or resumes training) until `train.steps` updates, or `stop_after` more of them.

    `stop_after` ends this call early, with a checkpoint, as a preempted job would; calling
    `train` again with the same workdir continues on exactly the same batches and noise.
    `devices` (default: all) are the devices of the mesh.
    """
    parallel.maybe_initialize_distributed()
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(config, len(devices))
    train_cfg = config.train
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    is_chief = jax.process_index() == 0

    mesh = parallel.make_mesh(config, devices)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(train_cfg)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, checkpoint_lib.CHECKPOINT_SUBDIR), keep=train_cfg.keep_checkpoints)
    iterator = input_lib.make_train_iterator(config, tokenizer, mesh)

    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state_lib.abstract_train_state(model, tx, shardings),
                                        iterator)
        logging.info("resumed from %s at step %d", checkpointer.directory, int(state.step))
    else:
        state = state_lib.create_train_state(model, tx, mesh, rules, train_cfg.seed, shardings)
        if train_cfg.init_from:
            _, params = checkpoint_lib.load_params(train_cfg.init_from, mesh=mesh, rules=rules)
            _check_same_shapes(state.params, params, train_cfg.init_from)
            params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
            state = state.replace(params=params)
            logging.info("initialised params from %s", train_cfg.init_from)

    start = int(state.step)
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    if is_chief:
        logging.info("training %s params on mesh %s, steps %d -> %d, %d tokens per step",
                     f"{sum(p.size for p in jax.tree.leaves(state.params)):,}", dict(mesh.shape),
                     start, end, train_cfg.batch_size * train_cfg.seq_len)

    train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    eval_step = None
    if train_cfg.eval_every > 0:
        eval_step = step_lib.make_eval_step(config, model, mesh, shardings.params)
        eval_base = jax.random.fold_in(jax.random.key(train_cfg.seed), 2)
        eval_keys = [jax.random.key_data(jax.random.fold_in(eval_base, i))
                     for i in range(train_cfg.eval_batches)]
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_chief else None

    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    window_start, window_steps = time.time(), 0
    last_saved = start
    for step in range(start, end):
        batch = parallel.global_batch(next(iterator), mesh)
        state, metrics = train_step(state, batch)
        pending.append((step, metrics))
        window_steps += 1
        done = step + 1

        if done % train_cfg.log_every == 0 or done == end:
            fetched = jax.device_get([m for _, m in pending])
            elapsed = time.time() - window_start
            steps_per_second = window_steps / max(elapsed, 1e-9)
            for (s, _), values in zip(pending, fetched, strict=True):
                record = {"step": s, **{k: float(v) for k, v in values.items()}}
                history.append(record)
                if writer:
                    writer.scalars(s, {f"train/{k}": v for k, v in record.items() if k != "step"})
            last = history[-1]
            if writer:
                writer.scalars(step, {"train/tokens_per_second":
                                      steps_per_second * tokens_per_step})
                writer.flush()
            if is_chief:
                logging.info(
                    "step %d/%d | loss %.4f | acc %.3f | lr %.3g | grad %.3f | %s tok/s | eta %s",
                    done, train_cfg.steps, last["loss"], last["accuracy"], last["learning_rate"],
                    last["grad_norm"], f"{steps_per_second * tokens_per_step:,.0f}",
                    _format_duration((train_cfg.steps - done) / steps_per_second))
            pending, window_start, window_steps = [], time.time(), 0

        if eval_step is not None and done % train_cfg.eval_every == 0:
            result = _evaluate(config, eval_step, state.params, tokenizer, mesh, eval_keys)
            eval_history.append({"step": step, **result})
            if writer:
                writer.scalars(step, {f"eval/{k}": v for k, v in result.items()})
                writer.flush()
            if is_chief:
                logging.info("eval at step %d | loss %.4f | acc %.3f", done, result["loss"],
                             result["accuracy"])
            window_start = time.time()  # keep eval time out of the throughput

        if train_cfg.checkpoint_every > 0 and done % train_cfg.checkpoint_every == 0:
            checkpointer.save(done, state, config, iterator)
            last_saved = done

    if end > last_saved:
        checkpointer.save(end, state, config, iterator)
    checkpointer.wait()
    checkpointer.close()
    iterator.close()  # stops prefetch threads / worker processes now, not at interpreter exit
    if writer:
        writer.close()
    return TrainResult(state, history, eval_history)
