"""The training loop: data -> step -> metrics -> checkpoints -> evals, from one CPU to a pod.

Set-up happens once, in `prepare(config)`: it starts distributed mode (multi-host runs), checks
the config against the devices, loads and checks the tokenizer, and builds the mesh and the
logical-axis rules, which everything after it takes from the returned `TrainSetup`.
`train(config, workdir)` validates and prepares (or takes the `setup` a program already made),
builds the sharded state (fresh, restored from `WORKDIR/checkpoints`, or with params taken from
`train.init_from`), the input iterator (restored to its checkpointed position on resume) and the
jitted step, then runs `train.steps` optimizer updates. Side effects stay here: progress lines
(step, loss, tokens/s, ETA; printed on stderr by process 0, so they show whatever the logging
level), TensorBoard scalars in `WORKDIR/tensorboard`, checkpoints every
`train.checkpoint_every` updates and at the end.

Device-to-host transfers happen once per `train.log_every` steps (the metrics of every step are
kept on device until then), and before every checkpoint and evaluation.

What protects a run (tests/test_train_faults.py):
  * divergence: a non-finite loss or gradient norm stops training with `TrainingDiverged`
    (or, with `train.max_bad_steps = N`, skips up to N such updates in a row); a state is
    checked for NaN/Inf before it is saved, so no checkpoint of a diverged run is ever written;
  * resume: the workdir's config is compared with this run's first: another model or data
    pipeline is a one-line ValueError naming the fields, other optimiser settings a warning;
    a damaged newest checkpoint is skipped, with a warning, for the newest intact one; a run
    that already reached `train.steps` says so and returns;
  * errors: a failing save raises `checkpoint.CheckpointWriteError` (an OSError); on any error
    the pending save of the last good state is completed and the checkpointer closed, so the
    process never hangs on a background thread.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.data import bad_records, pipeline
from llada_jax.data import validation as data_validation
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import evaluators as evaluators_lib
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib
from llada_jax.train.optimizer import make_optimizer
from llada_jax.train.summary import SummaryWriter


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the state became non-finite; nothing of it was saved."""


class TrainResult(NamedTuple):
    """What a call of `train` leaves behind (besides its files)."""

    state: state_lib.TrainState
    # One entry per update run by this call: its metrics and `step`, the update's 0-based index
    # (the state's step before it).
    history: list[dict[str, float]]
    eval_history: list[dict[str, float]]  # one entry per evaluation, `step` as above


class TrainSetup(NamedTuple):
    """What training needs before it builds anything; made once, by `prepare`."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]   # the config's logical-axis rules, as Linen takes them
    tokenizer: Tokenizer


def prepare(config: ml_collections.ConfigDict,
            devices: Sequence[jax.Device] | None = None) -> TrainSetup:
    """Starts distributed mode (when this process is one of several), loads the tokenizer and
    checks it against the model, checks the config against `devices` (default: all), and builds
    the mesh and the rules. Expects `config_lib.validate(config)` to have passed (programs run it
    before JAX is imported). Raises ValueError / FileNotFoundError naming the field or file."""
    parallel.maybe_initialize_distributed()
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    devices = list(jax.devices() if devices is None else devices)
    parallel.validate_mesh(config, len(devices))
    return TrainSetup(parallel.make_mesh(config, devices), parallel.logical_rules(config),
                      tokenizer)


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
    """The params of `source` (train.init_from) have the model's names and shapes."""
    expected, found = ({jax.tree_util.keystr(path): leaf
                        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
                       for tree in (expected, found))
    if expected.keys() != found.keys():
        raise ValueError(f"config.train.init_from: params of {source} do not match the model: "
                         f"missing {sorted(expected.keys() - found.keys())[:5]}, "
                         f"unexpected {sorted(found.keys() - expected.keys())[:5]}")
    for name, value in expected.items():
        if value.shape != found[name].shape:
            raise ValueError(f"config.train.init_from: param {name} of {source}: expected "
                             f"shape {value.shape}, found {found[name].shape}")


def _evaluate(config, eval_step, params, tokenizer, mesh) -> dict[str, float]:
    """Loss and accuracy over `train.eval_batches` batches of the eval source. The noise keys
    are the same at every evaluation, so successive losses are directly comparable."""
    eval_base = jax.random.fold_in(jax.random.key(config.train.seed), 2)
    losses, correct, noised = [], 0, 0
    # At most eval_batches batches (zip takes no batch past the last index).
    for i, host_batch in zip(range(config.train.eval_batches),
                             pipeline.build_dataset(config, tokenizer, "eval"), strict=False):
        key = jax.random.key_data(jax.random.fold_in(eval_base, i))
        out = jax.device_get(eval_step(params, parallel.global_batch(host_batch, mesh), key))
        losses.append(float(out["loss"]))
        correct += int(out["correct"])
        noised += int(out["noised"])
    if not losses:
        raise ValueError(f"config.data.eval_source={config.data.eval_source!r} yielded no batch "
                         f"of {config.train.batch_size} rows")
    return {"loss": float(np.mean(losses)), "accuracy": correct / max(noised, 1)}


def _progress(message: str) -> None:
    """A progress line for the user (process 0 only): on stderr, visible at any log level."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# Fields that only say how long and how often: never worth mentioning.
_RUN_LENGTH_FIELDS = ("train.steps", "train.log_every", "train.checkpoint_every",
                      "train.keep_checkpoints", "train.eval_every", "train.eval_batches")
# Fields a resumed run may change freely: how long and how often, where, on which mesh, how the
# same maths is computed.
_RESUME_FREE_FIELDS = (
    *_RUN_LENGTH_FIELDS, "train.evaluators", "train.init_from", "train.loss_chunk_size",
    "train.grad_accum_steps", "data.eval_source", "data.num_workers", "data.read_threads",
    "data.prefetch_buffer_size", "data.worker_buffer_size", "data.tfds_data_dir",
    "data.bad_records", "model.dtype", "model.remat_policy", "model.attention_backend",
    "vision.dtype", "vision.remat_policy", "mesh.", "sampler.")
# Fields a resumed run may change with a warning: how the same model is optimised on the same
# data. (If the change alters the optimizer state's layout, it is an error after all.)
_RESUME_OPTIMISER_FIELDS = (
    "train.learning_rate", "train.schedule", "train.warmup_steps", "train.decay_fraction",
    "train.min_lr_ratio", "train.weight_decay", "train.b1", "train.b2", "train.adam_eps",
    "train.grad_clip", "train.group_learning_rates.", "train.trainable", "train.max_bad_steps",
    "train.mask_eps", "train.random_length_prob", "train.seed")


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field name: value} of every leaf of the config."""
    return flatten_dict(checkpoint_lib.config_to_json(config), sep=".")


def _matches(field: str, patterns: Sequence[str]) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def config_differences(saved: ml_collections.ConfigDict,
                       current: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint value, current value)} of every field that differs (dotted names)."""
    old, new = _flat_config(saved), _flat_config(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(differences: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    parts = [f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(differences.items())[:limit]]
    if len(differences) > limit:
        parts.append(f"and {len(differences) - limit} more")
    return ", ".join(parts)


def _optimizer_layout(train_section: ml_collections.ConfigDict, abstract_params: Any) -> Any:
    """Tree structure, shapes and dtypes of the optimizer state `train_section` builds."""
    opt_state = jax.eval_shape(make_optimizer(train_section).init, abstract_params)
    leaves, treedef = jax.tree.flatten(opt_state)
    return treedef, [(x.shape, x.dtype) for x in leaves]


def check_resume_config(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                        abstract_params: Any, checkpoint: str) -> None:
    """Compares the config a checkpoint was written with against this run's.

    A different model, objective or data pipeline is a ValueError listing the fields (resuming
    would fail deep in orbax or grain, or silently train something else); different optimiser
    settings are a warning, unless they change the optimizer state's layout (an error too).
    """
    differences = {k: v for k, v in config_differences(saved, config).items()
                   if not _matches(k, _RESUME_FREE_FIELDS)}
    blocking = {k: v for k, v in differences.items()
                if not _matches(k, _RESUME_OPTIMISER_FIELDS)}
    optimiser = {k: v for k, v in differences.items() if k not in blocking}
    if blocking:
        workdir = os.path.dirname(os.path.dirname(checkpoint))
        if any(k.startswith(("model.", "vision.")) for k in blocking):
            advice = "resume with the checkpoint's model settings, or use a new --workdir"
        else:
            advice = (f"resume with the checkpoint's settings, or fine-tune its params in a new "
                      f"--workdir with --config.train.init_from={workdir}")
        raise ValueError(f"workdir {workdir} was trained with another config (checkpoint "
                         f"{checkpoint}; checkpoint -> now): {_describe(blocking)}; {advice}")
    if not optimiser:
        return
    try:
        same_layout = (_optimizer_layout(saved.train, abstract_params)
                       == _optimizer_layout(config.train, abstract_params))
    except Exception:  # an unbuildable old optimizer: the restore decides
        same_layout = True
    if not same_layout:
        raise ValueError(f"resuming {checkpoint} with {_describe(optimiser)} (checkpoint -> "
                         f"now) changes the optimizer state's layout, which cannot be restored; "
                         f"keep the checkpoint's values or start a new --workdir")
    logging.warning("resuming %s with other optimiser settings than it was trained with "
                    "(checkpoint -> now): %s", checkpoint, _describe(optimiser))


def restore_newest_intact(config: ml_collections.ConfigDict,
                          checkpointer: checkpoint_lib.Checkpointer,
                          abstract_state: state_lib.TrainState,
                          data_iterator: Any) -> tuple[state_lib.TrainState, int] | None:
    """(state, step) of the newest checkpoint that restores intact (finite, readable); None when
    there is no checkpoint. Damaged newer steps are skipped with a warning naming them and the
    step resumed from; if none is intact, a ValueError lists each step's error."""
    damaged: list[tuple[int, str]] = []
    changed: dict[str, tuple[Any, Any]] = {}  # settings that differ from the newest readable
    for step in reversed(checkpointer.all_steps()):
        where = f"{checkpointer.directory}/{step}"
        try:
            saved = checkpointer.saved_config(step)
        except Exception as e:  # any read error: this step is damaged
            damaged.append((step, checkpoint_lib.first_line(e, 160)))
            continue
        check_resume_config(saved, config, abstract_state.params, where)
        changed = changed or {k: v for k, v in config_differences(saved, config).items()
                              if not _matches(k, _RUN_LENGTH_FIELDS)}
        try:
            state, _ = checkpointer.restore(abstract_state, data_iterator, step)
            bad = state_lib.non_finite_paths(state)
            if bad:
                raise ValueError(f"non-finite values in {len(bad)} arrays, e.g. {bad[0]}")
        except Exception as e:
            damaged.append((step, checkpoint_lib.first_line(e, 160)))
            continue
        if damaged:
            # Set aside, not deleted: the run will save these steps again, and a person may want
            # to look at what went wrong.
            moved = [checkpointer.set_aside(s) for s, _ in damaged]
            logging.warning(
                "CHECKPOINT DAMAGED: %s could not be restored (%s); resuming from step %d "
                "instead, the newest intact checkpoint; the damaged one(s) moved to %s",
                ", ".join(f"step {s}" for s, _ in damaged),
                "; ".join(f"step {s}: {error}" for s, error in damaged), step, ", ".join(moved))
        return state, step
    if damaged:
        raise ValueError(f"no intact checkpoint in {checkpointer.directory} to resume from: "
                         + "; ".join(f"step {s}: {error}" for s, error in damaged)
                         + (f" (this run's settings differ from the checkpoint's: "
                            f"{_describe(changed)}; restore them if they change the data "
                            f"pipeline)" if changed else "")
                         + " (move the directory away to start afresh)")
    return None


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None,
          devices: Sequence[jax.Device] | None = None,
          setup: TrainSetup | None = None) -> TrainResult:
    """Trains (or resumes training) until `train.steps` updates, or `stop_after` more of them.

    `stop_after` ends this call early, with a checkpoint, as a preempted job would; calling
    `train` again with the same workdir continues on exactly the same batches and noise.
    `setup` is what `prepare` made of this config (a program that validated and prepared first,
    to tell config errors from a run that stopped); without it the config is validated and
    prepared here, over `devices` (default: all). Raises TrainingDiverged when the run diverges
    (see the module docstring), ValueError for a workdir of another config or without an intact
    checkpoint, OSError (CheckpointWriteError) when a checkpoint cannot be written.
    """
    if setup is None:
        config_lib.validate(config)
        data_validation.check(config)
        setup = prepare(config, devices)
    elif devices is not None:
        raise TypeError("train: the devices are the setup's mesh; pass devices or setup, not both")
    mesh, rules, tokenizer = setup
    train_cfg = config.train
    model = state_lib.make_model(config)
    tx = make_optimizer(train_cfg)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, checkpoint_lib.CHECKPOINT_SUBDIR), keep=train_cfg.keep_checkpoints)
    iterator = writer = None
    try:
        iterator = iter(pipeline.build_dataset(config, tokenizer, "train"))
        restored = restore_newest_intact(
            config, checkpointer, state_lib.abstract_train_state(model, tx, shardings), iterator)
        if restored is not None:
            state, restored_step = restored
            if restored_step >= train_cfg.steps:
                _progress(f"training already complete: step {restored_step} of "
                          f"{train_cfg.steps}, checkpoint {checkpointer.directory}/"
                          f"{restored_step} (raise --config.train.steps to train further)")
                return TrainResult(state, [], [])
            _progress(f"resumed from {checkpointer.directory} at step {restored_step}")
        else:
            state = state_lib.create_train_state(model, tx, mesh, rules, train_cfg.seed,
                                                 shardings)
            if train_cfg.init_from:
                _, params = checkpoint_lib.load_params(train_cfg.init_from, mesh=mesh, rules=rules)
                _check_same_shapes(state.params, params, train_cfg.init_from)
                state = state.replace(params=jax.tree.map(
                    lambda new, old: new.astype(old.dtype), params, state.params))
                _progress(f"initialised params from {train_cfg.init_from}")
        if jax.process_index() == 0:  # one TensorBoard writer per run
            writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        result = _run(config, state, model, tx, setup, shardings, iterator, checkpointer,
                      writer, stop_after)
        checkpointer.wait()  # the final save, committed (or its error raised) before returning
    except BaseException:
        # Whatever stopped the run: a save of the last good state still in flight is finished
        # (it is never a bad state: those are not saved); its own failure must not hide this one.
        try:
            checkpointer.wait()
        except Exception as e:
            logging.warning("%s", e)
        raise
    finally:
        checkpointer.close()
        if iterator is not None:
            iterator.close()  # stops prefetch threads / worker processes now, not at exit
        if writer is not None:
            writer.close()
    return result


def _run(config, state, model, tx, setup, shardings, iterator, checkpointer, writer,
         stop_after) -> TrainResult:
    """The loop of `train`, from the state it restored or created."""
    mesh, tokenizer = setup.mesh, setup.tokenizer
    train_cfg = config.train
    max_bad_steps = int(train_cfg.max_bad_steps)
    start = int(state.step)
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    _progress(f"training {sum(p.size for p in jax.tree.leaves(state.params)):,} params on mesh "
              f"{dict(mesh.shape)}, steps {start} -> {end}, {tokens_per_step} tokens per step")

    train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    eval_step, evaluators = None, []
    if train_cfg.eval_every > 0:
        eval_step = step_lib.make_eval_step(config, model, mesh, shardings.params)
        # Pluggable evaluators (train/evaluators.py), built once; none by default.
        evaluators = evaluators_lib.make_evaluators(list(train_cfg.evaluators or []), config,
                                                    tokenizer)

    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_start, window_steps = time.time(), 0
    last_saved = start
    bad_in_a_row = 0

    def diverged(what: str, advice: str = "") -> TrainingDiverged:
        """The error that stops a diverged run, naming the checkpoints it leaves."""
        with contextlib.suppress(OSError):
            checkpointer.wait()  # the save in flight, if any, counts
        latest, where = checkpointer.latest_step(), checkpointer.directory
        left = ("there is no checkpoint yet" if latest is None else
                f"newest checkpoint {where}/{latest}, lowest-loss checkpoint "
                f"{where}/{checkpointer.best_step()} (rotation keeps it)")
        return TrainingDiverged(f"training diverged: {what}; {left} (lower train.learning_rate "
                                f"(now {train_cfg.learning_rate:g}){advice})")

    def fetch_metrics() -> None:
        """Brings the pending steps' metrics to the host; stops on a diverged step."""
        nonlocal pending, bad_in_a_row
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), values in zip(pending, fetched, strict=True):
            record = {"step": s, **{k: float(v) for k, v in values.items()}}
            history.append(record)
            if writer:
                writer.scalars(s, {f"train/{k}": v for k, v in record.items() if k != "step"})
            if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
                bad_in_a_row = 0
                continue
            bad_in_a_row += 1
            what = f"loss {record['loss']}, grad norm {record['grad_norm']} at step {s + 1}"
            if bad_in_a_row > max_bad_steps:
                skipped = (f" after {max_bad_steps} skipped updates in a row" if max_bad_steps
                           else "")
                raise diverged(f"{what}{skipped}; nothing of it was saved",
                               ", or let train.max_bad_steps skip isolated bad updates")
            logging.warning("non-finite %s: update skipped (%d in a row, at most "
                            "train.max_bad_steps=%d)", what, bad_in_a_row, max_bad_steps)
        pending = []

    def save(done: int) -> None:
        nonlocal last_saved
        fetch_metrics()
        bad = state_lib.non_finite_paths(state)
        if bad:
            raise diverged(f"the state after step {done} holds non-finite values ({len(bad)} "
                           f"arrays, e.g. {bad[0]}); it was not saved")
        losses = [h["loss"] for h in history if h["step"] >= last_saved
                  and math.isfinite(h["loss"])]
        checkpointer.save(done, state, config, iterator,
                          loss=float(np.mean(losses)) if losses else None)
        last_saved = done

    for step in range(start, end):
        batch = parallel.global_batch(next(iterator), mesh)
        state, metrics = train_step(state, batch)
        pending.append((step, metrics))
        window_steps += 1
        done = step + 1

        if done % train_cfg.log_every == 0 or done == end:
            fetch_metrics()
            steps_per_second = window_steps / max(time.time() - window_start, 1e-9)
            tokens_per_second = steps_per_second * tokens_per_step
            eta = datetime.timedelta(seconds=int(max(train_cfg.steps - done, 0) / steps_per_second))
            last = history[-1]
            if writer:
                writer.scalars(step, {"train/tokens_per_second": tokens_per_second})
                writer.flush()
            _progress(f"step {done}/{train_cfg.steps} | loss {last['loss']:.4f} | acc "
                      f"{last['accuracy']:.3f} | lr {last['learning_rate']:.3g} | grad "
                      f"{last['grad_norm']:.3f} | {tokens_per_second:,.0f} tok/s | eta {eta}")
            window_start, window_steps = time.time(), 0

        if eval_step is not None and done % train_cfg.eval_every == 0:
            fetch_metrics()  # never evaluate (or report) a diverged state
            result = _evaluate(config, eval_step, state.params, tokenizer, mesh)
            if evaluators:
                extra = evaluators_lib.run_evaluators(evaluators, state.params, done)
                result.update({key.removeprefix("eval/"): value for key, value in extra.items()})
                _progress(f"evaluators at step {done} | " + " | ".join(
                    f"{key} {value:.4f}" for key, value in extra.items()))
            eval_history.append({"step": step, **result})
            if writer:
                writer.scalars(step, {f"eval/{k}": v for k, v in result.items()})
                writer.flush()
            _progress(f"eval at step {done} | loss {result['loss']:.4f} | acc "
                      f"{result['accuracy']:.3f}")
            window_start = time.time()  # keep eval time out of the throughput

        if train_cfg.checkpoint_every > 0 and done % train_cfg.checkpoint_every == 0:
            save(done)

    if end > last_saved:
        save(end)
    if skipped := bad_records.skipped_summary():  # data.bad_records='skip': say how many
        _progress(skipped)
    return TrainResult(state, history, eval_history)
