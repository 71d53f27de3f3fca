"""Evaluation presets: `configs/eval/<file>.py:<task>` -> tasks, few-shot, model args, score.

A preset file defines `get_config(task)` returning a ConfigDict with `tasks`, `num_fewshot`,
`model_args` (arguments of `LladaJaxLM`), `chat` and `published` (the official score), as
big_vision's `--config file.py:arg`. Errors name the file.
"""

from __future__ import annotations

import os
import runpy

import ml_collections


def load_preset(spec: str) -> ml_collections.ConfigDict:
    """The preset `path.py:task` (errors name the file and the task)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--preset: file not found: {path}")
    if not arg:
        raise ValueError(f"--preset={spec}: expected <file>.py:<task>")
    namespace = runpy.run_path(path)   # the preset file's globals
    if "get_config" not in namespace:
        raise ValueError(f"--preset: {path} defines no get_config(task)")
    preset = namespace["get_config"](arg)
    for field in ("tasks", "model_args", "published"):
        if field not in preset:
            raise ValueError(f"--preset={spec}: the preset has no field {field!r}")
    return preset
