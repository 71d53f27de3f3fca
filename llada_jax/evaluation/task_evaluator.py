"""The `tasks` evaluator the trainer runs every `eval_every` steps: local lm-eval tasks.

Loaded by name from `train/evaluators.py` (`{"kind": "tasks", "tasks": "my_task.yaml"}`): it runs
lm-eval task YAML files (or registered task names) through lm-eval's evaluator with the
`llada_jax` model on the current params, and returns every numeric metric of every task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from llada_jax.data.tokenizer import Tokenizer
from llada_jax.evaluation.tasks import load_tasks


class TaskAccuracy:
    """Local lm-eval task YAML files on the current params (every metric of every task)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 tasks: str | Sequence[str], *, name: str = "tasks", limit: int | None = None,
                 model_args: Mapping[str, Any] | None = None) -> None:
        # Before lm-eval (and the `datasets` library it imports) is first imported: local task
        # files need no network.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        # One task index for every run (built once: with registered task names, about 20 CPU
        # seconds); an unknown task name is refused here, before training starts.
        self.task_names, self.task_manager = load_tasks(
            tasks.split(",") if isinstance(tasks, str) else tasks)
        self.name, self.config, self.tokenizer, self.limit = name, config, tokenizer, limit
        self.model_args = dict(model_args or {})

    def run(self, params: Any, step: int) -> dict[str, float]:
        from lm_eval import simple_evaluate

        from llada_jax.evaluation.lm import LladaJaxLM

        lm = LladaJaxLM(params=params, config=self.config, tokenizer=self.tokenizer,
                        progress=False, **({"seed": step} | self.model_args))
        out = simple_evaluate(model=lm, tasks=self.task_names, limit=self.limit,
                              task_manager=self.task_manager,
                              log_samples=False, bootstrap_iters=0)
        return {f"{task}/{key.split(',')[0]}": float(value)
                for task, values in (out or {}).get("results", {}).items()
                for key, value in values.items()
                if isinstance(value, (int, float)) and "stderr" not in key and key != "alias"}
