"""Checkpoints: the trainer's full state, and params-only checkpoints for the other programs.

Trainer checkpoints (`Checkpointer`, an orbax `CheckpointManager` under `WORKDIR/checkpoints`):
every step directory holds three items,
  * `state`  - the TrainState (step, params, optimizer state, rng), restored straight onto its
               shards from an abstract target;
  * `data`   - the grain iterator position (grain's own orbax handler: one JSON file per
               process, since every host reads its own slice of the data);
  * `config` - the run's config as JSON, so a checkpoint says what it is.
Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp-<n>/`, then renames it (or, on
object stores, writes `commit_success.txt` last). A save interrupted half-way therefore leaves
a directory that `latest_step`/`restore` never consider (tests/test_checkpoint.py).

Rotation keeps the newest `keep` checkpoints *and* the one with the lowest training loss (the
`loss` metric given to `save`, orbax's `BestN` preservation policy): a run that goes bad after a
resume (a learning rate far too high) can rotate out every earlier checkpoint, but never the best
one. Save errors (a full disk, a read-only directory) surface as `CheckpointWriteError`, an
OSError with one line naming the directory; the committed checkpoints stay as they were.

Params-only checkpoints (`save_params` / `load_params`): `DIR/params/` (orbax PyTree) and
`DIR/config.json`, written by checkpoint conversion; `load_params` reads those *and* trainer
workdirs (the params item of the latest or a given step), so sampling and evaluation programs
take either.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh
from orbax.checkpoint.checkpoint_managers import preservation_policy

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.interop import safetensors_io
from llada_jax.train import state as state_lib

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_SUBDIR = "checkpoints"
PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"
# Orbax writes this file into a step directory as the last act of a save, in both of its atomicity
# modes (before the rename of the temporary directory, or as the commit on object stores).
COMMIT_MARKER = "commit_success.txt"
# The metric rotation protects the best checkpoint by: the mean training loss of the updates
# since the previous save (lower is better).
LOSS_METRIC = "loss"
# Stands in for "no loss known" (e.g. every update since the last save was skipped): worst rank.
_NO_LOSS = sys.float_info.max


# Operating-system errors a checkpoint write meets (matched by their message when a storage
# library's error text carries no code).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.EIO, errno.ENOTDIR, errno.ENOENT)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission, ...); `errno` is set when
    the cause names one."""


def _write_error(message: str, cause: BaseException) -> CheckpointWriteError:
    """`message: reason`, the reason being the operating-system error buried in a tensorstore or
    orbax message (`... No space left on device [os_error_code='28']`) when there is one.

    Concurrent writes fail together and orbax reports one of them, not always the one that
    carries the code (e.g. `Error opening "zarr" driver: Error writing ".zarray" ...` when a
    full file broke the shared OCDBT data file): without a code, the message of a storage errno
    (`File too large`, `No space left on device`, ...) names the reason."""
    code, reason = getattr(cause, "errno", None), getattr(cause, "strerror", None)
    if not (reason and code):
        found = re.search(r"os_error_code\W{0,3}(\d+)", str(cause))
        code = int(found.group(1)) if found else next(
            (c for c in _STORAGE_ERRNOS if os.strerror(c) in str(cause)), None)
        reason = os.strerror(code) if code else None
    detail = (f"{reason} ({errno.errorcode.get(code, code)})" if reason and code
              else first_line(cause))
    error = CheckpointWriteError(f"{message}: {detail}")
    error.errno = code
    return error


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (tensorstore and orbax errors run to pages),
    prefixed by its type, at most `limit` characters."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _path(directory: str) -> epath.Path:
    """An absolute local path, or a cloud path (gs://...) as given."""
    return epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))


def _complete_steps(manager: ocp.CheckpointManager, directory: epath.Path) -> list[int]:
    """Steps orbax lists whose directory also holds the commit marker.

    Orbax already skips `<step>.orbax-checkpoint-tmp-*` directories; requiring the marker as well
    also rejects a step directory whose save stopped before committing (e.g. on a filesystem
    without atomic rename, or one copied by hand).
    """
    return [s for s in manager.all_steps() if (directory / str(s) / COMMIT_MARKER).exists()]


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """A config as a plain JSON-able dict (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_json(data: dict) -> ml_collections.ConfigDict:
    """The inverse of `config_to_json`, on top of the current defaults.

    Starting from `default_config()` keeps checkpoints written before a field existed loadable.
    """
    config = config_lib.default_config()
    for section, values in data.items():
        if isinstance(values, dict) and section in config:
            for key, value in values.items():
                config[section][key] = value
        else:
            config[section] = values
    return config


def _grain_state_from_json(state: Any) -> Any:
    """Undoes the one JSON round-trip loss that grain 0.2.18 trips over.

    `ConcatThenSplitIterDataset` stores its remainder slices as tuples and compares them with
    the tuple sentinel `(-1, -1)`; JSON gives lists back, `[-1, -1] != (-1, -1)`, and the
    restored iterator would replay a phantom remainder (a different next batch).
    """
    if isinstance(state, dict):
        return {key: ({k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                      if key == "remainder_slices" and isinstance(value, dict)
                      else _grain_state_from_json(value))
                for key, value in state.items()}
    if isinstance(state, list):
        return [_grain_state_from_json(v) for v in state]
    return state


class _JsonSafeIterator(grain.DatasetIterator):
    """Wraps a grain iterator (its one parent) for grain's orbax handler, repairing the state it
    reads back."""

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_grain_state_from_json(state))

    def close(self) -> None:
        # The adapter is dropped after each save/restore; grain closes an iterator's parents when
        # it is closed or garbage collected, and the wrapped iterator must live on.
        pass


class Checkpointer:
    """Saves and restores (TrainState, data-iterator position, config) under `directory`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True) -> None:
        self.directory = _path(directory)
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(keep),
            preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[LOSS_METRIC],
                                      reverse=True, n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda metrics: metrics[LOSS_METRIC],
            best_mode="min", create=True, enable_async_checkpointing=async_save)
        handlers = {STATE: ocp.StandardCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except OSError as e:
            raise _write_error(f"cannot create checkpoint directory {self.directory}", e) from e
        self._pending_step: int | None = None

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint's step (unfinished saves are ignored), or None."""
        return max(self.all_steps(), default=None)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(_complete_steps(self._manager, self.directory))

    def best_step(self) -> int | None:
        """The complete checkpoint with the lowest recorded training loss (rotation keeps it),
        or None."""
        best = self._manager.best_step()
        return best if best in self.all_steps() else self.latest_step()

    def save(self, step: int, state: state_lib.TrainState, config: ml_collections.ConfigDict,
             data_iterator: grain.DatasetIterator | None = None,
             loss: float | None = None) -> None:
        """Starts an (asynchronous) save of everything needed to resume at `step`.

        `loss` (the recent training loss) ranks the checkpoint for rotation: the lowest is kept
        even when it is older than the newest `keep`. Raises CheckpointWriteError when this or
        the previous (asynchronous) save could not be written.
        """
        items = {STATE: ocp.args.StandardSave(state),
                 CONFIG: ocp.args.JsonSave(config_to_json(config))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_JsonSafeIterator(data_iterator))
        metrics = {LOSS_METRIC: _NO_LOSS if loss is None else float(loss)}
        self.wait()  # the previous save's failure is reported as that step's
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                               force=True)
        except Exception as e:  # orbax and tensorstore report write failures in many types
            raise _write_error(f"could not write checkpoint step {step} in {self.directory}",
                               e) from e
        self._pending_step = step

    def saved_config(self, step: int) -> ml_collections.ConfigDict:
        """The config a checkpoint was written with (reads only its small JSON item)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{CONFIG: ocp.args.JsonRestore()}))
        return config_from_json(restored[CONFIG])

    def restore(self, abstract_state: state_lib.TrainState,
                data_iterator: grain.DatasetIterator | None = None,
                step: int | None = None) -> tuple[state_lib.TrainState, ml_collections.ConfigDict]:
        """(state, config) of `step` (default: latest); moves `data_iterator` to its position.

        `abstract_state` holds ShapeDtypeStructs with shardings (state.abstract_train_state):
        arrays are read directly onto their shards.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; "
                                    f"found steps {self.all_steps()}")
        items = {STATE: ocp.args.StandardRestore(abstract_state), CONFIG: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (self.directory / str(step) / DATA).exists():
                raise FileNotFoundError(f"checkpoint {self.directory}/{step} has no data-iterator "
                                        f"state to resume the input pipeline from")
            items[DATA] = grain.checkpoint.CheckpointRestore(_JsonSafeIterator(data_iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], config_from_json(restored[CONFIG])

    def set_aside(self, step: int) -> str:
        """Renames a (damaged) step directory to `damaged-<step>[-n]`, which no step listing
        matches, so that the run can save that step again; returns the new path. Process 0
        renames, every process then re-reads the directory."""
        source = self.directory / str(step)
        target = self.directory / f"damaged-{step}"
        suffix = 0
        while target.exists():
            suffix += 1
            target = self.directory / f"damaged-{step}-{suffix}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"llada_jax_set_aside_{step}")
        self._manager.reload()
        return str(target)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk; raises CheckpointWriteError
        if it failed."""
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise _write_error(f"could not write checkpoint step {step} in {self.directory} "
                               f"(the committed steps {self.all_steps()} are intact)", e) from e

    def close(self) -> None:
        self._manager.close()


def save_params(directory: str, config: ml_collections.ConfigDict, params: Any) -> None:
    """Writes a params-only checkpoint: `directory/params/` and `directory/config.json`.

    Refuses to overwrite an existing one (delete it first), so a conversion cannot silently
    mix two models' files.
    """
    directory = _path(directory)
    target = directory / PARAMS_SUBDIR
    if target.exists():
        raise FileExistsError(f"params checkpoint already exists: {target}")
    with ocp.StandardCheckpointer() as checkpointer:   # closing waits for the save to finish
        checkpointer.save(target, params)
    if jax.process_index() == 0:
        # The config is written after the params (which orbax commits atomically): a directory
        # with config.json always has complete params.
        (directory / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2))


def _param_targets(config: ml_collections.ConfigDict, mesh: Mesh | None, rules) -> Any:
    """Abstract params of the config's model, sharded on `mesh` (or on the first device)."""
    boxed = state_lib.abstract_boxed_params(state_lib.make_model(config), mesh)
    rules = parallel.logical_rules(config) if rules is None and mesh is not None else rules
    return state_lib.with_shardings(boxed, safetensors_io.param_shardings(boxed, mesh, rules))


def load_params(directory: str, step: int | None = None, mesh: Mesh | None = None,
                rules=None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) from a params-only checkpoint or a trainer workdir.

    directory: a params-only checkpoint (`params/` + `config.json`), a trainer workdir (its
    `checkpoints/`), or an orbax checkpoint-manager directory. step: which trainer step (default
    the latest complete one; must be None for params-only checkpoints). mesh: shard the params
    on it by the config's rule table (or `rules`); default: everything on the first device.
    Only the params are read from a trainer checkpoint, never the optimizer state.
    """
    directory = _path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    params_dir = directory / PARAMS_SUBDIR
    if params_dir.is_dir():
        config_path = directory / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"params checkpoint {directory} has no {CONFIG_FILE} "
                                    f"(an interrupted save_params?)")
        if step is not None:
            raise ValueError(f"step={step} was given, but {directory} is a params-only "
                             f"checkpoint without steps")
        config = config_from_json(json.loads(config_path.read_text()))
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, _param_targets(config, mesh, rules))
    else:
        # The orbax manager directory: the workdir's checkpoints/, or the directory itself.
        manager_dir = next((d for d in (directory / CHECKPOINT_SUBDIR, directory)
                            if d.is_dir() and any(p.name.isdigit() for p in d.iterdir())), None)
        if manager_dir is None:
            raise FileNotFoundError(
                f"{directory} holds neither a params checkpoint ({PARAMS_SUBDIR}/ + "
                f"{CONFIG_FILE}) nor trainer checkpoints ({CHECKPOINT_SUBDIR}/<step>/)")
        handlers = {STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
        with ocp.CheckpointManager(manager_dir, item_handlers=handlers,
                                   options=ocp.CheckpointManagerOptions(create=False)) as manager:
            steps = sorted(_complete_steps(manager, manager_dir))
            step = (steps[-1] if steps else None) if step is None else step
            if step is None or step not in steps:
                raise FileNotFoundError(f"no complete checkpoint of step {step} in "
                                        f"{manager_dir}; found steps {steps}")
            config = config_from_json(manager.restore(step, args=ocp.args.Composite(
                **{CONFIG: ocp.args.JsonRestore()}))[CONFIG])
            targets = _param_targets(config, mesh, rules)
            restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
            params = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(item={"params": targets},
                                              restore_args={"params": restore_args},
                                              partial_restore=True)}))[STATE]["params"]
        directory = manager_dir / str(step)   # the step directory, for the message below
    _check_finite_params(params, str(directory))
    return config, params


def _check_finite_params(params: Any, source: str) -> None:
    """A checkpoint of a diverged run (NaN/Inf weights) samples garbage: refuse it by name."""
    bad = state_lib.non_finite_paths(params)
    if bad:
        raise ValueError(f"checkpoint {source} holds non-finite params ({len(bad)} tensors, "
                         f"e.g. {bad[0]}): it was written by a diverged run; use an earlier "
                         f"step")
