"""Task selection for lm-eval: registered task names and local task YAML files.

`--tasks=gsm8k,tests/data/eval_tasks/copy_letter_mc.yaml` mixes both kinds. A local YAML may name
its data with paths relative to the YAML's own folder (``dataset_kwargs.data_files``): they are
resolved here and the YAML is written, resolved, into a private include folder, so a task folder
can be moved or shipped with the project and still run with no downloads.

`load_tasks` is the one entry point of the callers (launch/evaluate.py, the trainer's `tasks`
evaluator): it reads lm-eval's own task index (thousands of YAML files, about 20 CPU seconds)
only when a registered task name asks for it, and refuses an unknown name before any model runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml


def _resolve_files(value: Any, task_path: str) -> Any:
    """`value` (a path, or lists / dicts of them) with relative paths joined to the folder of
    the task YAML `task_path`; a resolved path that is not a file is a FileNotFoundError."""
    if isinstance(value, list):
        return [_resolve_files(v, task_path) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_files(v, task_path) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    if not (os.path.isabs(value) or "://" in value):
        value = os.path.join(os.path.dirname(os.path.abspath(task_path)), value)
    if not os.path.isfile(value):
        raise FileNotFoundError(f"{task_path}: data file not found: {value}")
    return value


def split_tasks(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(registered task names, local YAML paths) of a `--tasks` list; a missing YAML is a
    FileNotFoundError naming it."""
    names, files = [], []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec.endswith((".yaml", ".yml")):
            if not os.path.isfile(spec):
                raise FileNotFoundError(f"--tasks: task file not found: {spec}")
            files.append(spec)
        else:
            names.append(spec)
    if not names and not files:
        raise ValueError("--tasks: expected at least one task name or task YAML file")
    return names, files


def local_task_folder(files: Sequence[str]) -> tuple[str, list[str]]:
    """(include folder for lm-eval's TaskManager, the task names the files define).

    Each YAML is read, its relative data files resolved against its folder, and written into
    a new temporary folder. Errors name the file.
    """
    folder = tempfile.mkdtemp(prefix="llada_jax_tasks_")
    names = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                task = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(task, dict) or not isinstance(task.get("task"), str):
            raise ValueError(f"{path}: a task YAML must be a mapping with a 'task' name")
        kwargs = task.get("dataset_kwargs") or {}   # the YAML's own dict when it has data_files
        if "data_files" in kwargs:
            kwargs["data_files"] = _resolve_files(kwargs["data_files"], path)
        with open(os.path.join(folder, os.path.basename(path)), "w", encoding="utf-8") as f:
            yaml.safe_dump(task, f)
        names.append(task["task"])
    return folder, names


def load_tasks(specs: Sequence[str]) -> tuple[list[str], Any]:
    """(the task names to run, an lm-eval `TaskManager` that defines each of them) of a `--tasks`
    list. lm-eval's built-in tasks are indexed only when a registered name is asked for (local
    YAML files need only their own folder); a name that neither defines is a ValueError."""
    from lm_eval.tasks import TaskManager

    registered, files = split_tasks(specs)
    include, local_names = local_task_folder(files) if files else (None, [])
    manager = TaskManager(include_path=include, include_defaults=bool(registered))
    unknown = [name for name in registered if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: {unknown}: no lm-eval task, group or tag of that name (and "
                         f"not a .yaml file)")
    return registered + local_names, manager
