"""Evaluation presets: `configs/eval/<file>.py:<task>` -> tasks, few-shot, model args, score.

A preset file defines `get_config(task)` returning a ConfigDict with `tasks`, `num_fewshot`,
`model_args` (arguments of `LladaJaxLM`), `chat` and `published` (the official score), as
big_vision's `--config file.py:arg`. Errors name the file.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_preset(spec: str) -> ml_collections.ConfigDict:
    """The preset `path.py:task` (errors name the file and the task)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--preset: file not found: {path}")
    if not arg:
        raise ValueError(f"--preset={spec}: expected <file>.py:<task>")
    module_spec = importlib.util.spec_from_file_location("llada_jax_eval_preset", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--preset: {path} defines no get_config(task)")
    preset = module.get_config(arg)
    for field in ("tasks", "model_args", "published"):
        if field not in preset:
            raise ValueError(f"--preset={spec}: the preset has no field {field!r}")
    return preset
