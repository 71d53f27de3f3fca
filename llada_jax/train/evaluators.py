"""Pluggable evaluators the trainer runs every `eval_every` steps (held-out ELBO, task accuracy).

An evaluator is any object with a `name` and `run(params, step) -> {metric: float}`; the trainer
keeps a list of them (`make_evaluators`) and calls `run_evaluators`, which prefixes each metric
with ``eval/<name>/`` for TensorBoard, next to the training curves. Two kinds ship:

* `HeldOutElbo`: the Monte Carlo ELBO (REFERENCE.md section 4) of held-out (prompt, answer)
  records of a JSONL file (`data/eval_records.py` format): negative log-likelihood bound per
  answer token, and multiple-choice accuracy when the file holds choice records;
* `TaskAccuracy` (`llada_jax/evaluation/task_evaluator.py`): local lm-eval task YAML files run
  through lm-eval's evaluator with the `llada_jax` model on the current params (generation
  accuracy, e.g. exact match).

Kinds are plugins named by module path (as big_vision names its evaluators): `EVALUATOR_KINDS`
maps the short names to `module:Class`, and a spec may name any other `module:Class` with the
same constructor shape `(config, tokenizer, **spec)`. The trainer imports a kind only when a
config asks for it, so `train/` does not depend on `evaluation/` (which sits above it: the
lm-eval model samples through `generation.py`, which loads trainer checkpoints).

Specs are plain dicts, so a config can hold them:
``{"kind": "elbo", "data": "heldout.jsonl", "mc_num": 16}`` or
``{"kind": "tasks", "tasks": "my_task.yaml", "limit": 50, "model_args": {"gen_length": 32}}``.
Evaluators do no I/O besides reading their data; writing metrics is the trainer's job.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from llada_jax.data.eval_records import encode_requests, read_eval_records
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.diffusion.likelihood import log_likelihood, multiple_choice
from llada_jax.train import state as state_lib

# Short evaluator kind -> (module:Class, the spec key it requires, what that key holds).
EVALUATOR_KINDS = {
    "elbo": ("llada_jax.train.evaluators:HeldOutElbo", "data", "a 'data' JSONL file"),
    "tasks": ("llada_jax.evaluation.task_evaluator:TaskAccuracy", "tasks",
              "'tasks' (task YAML files or names)"),
}


class Evaluator(Protocol):
    name: str

    def run(self, params: Any, step: int) -> dict[str, float]:
        """Metrics of `params` at training step `step`."""


class HeldOutElbo:
    """ELBO per answer token (and multiple-choice accuracy) of a held-out JSONL file."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, data: str, *,
                 name: str = "elbo", mc_num: int = 16, mc_batch_size: int = 16,
                 add_bos: bool = True, seed: int = 0, pairs_per_call: int = 8) -> None:
        self.name, self.config = name, config
        self.model = state_lib.make_model(config)
        located = read_eval_records(data)
        prefix = [tokenizer.bos_id] if add_bos else []
        plain = [(w, r) for w, r in located if "answer" in r]
        self.contexts, self.answers = encode_requests(
            tokenizer, [r["prompt"] for _, r in plain], [r["answer"] for _, r in plain],
            prefix, [w for w, _ in plain]) if plain else ([], [])
        self.questions, self.options, self.labels = [], [], []
        for where, record in ((w, r) for w, r in located if "choices" in r):
            contexts, choices = encode_requests(
                tokenizer, [record["question"]] * len(record["choices"]), record["choices"],
                prefix, [f"{where} (choice {n})" for n in range(len(record["choices"]))])
            self.questions.append(contexts[0])
            self.options.append(choices)
            self.labels.append(record["label"])
        self.options_kwargs = {"mc_num": mc_num, "batch_size": min(mc_batch_size, mc_num),
                               "pad_id": tokenizer.pad_id, "pairs_per_call": pairs_per_call}
        self.rng = jax.random.key(seed)   # the same noise at every step: comparable curves

    def run(self, params: Any, step: int) -> dict[str, float]:
        del step
        metrics = {}
        if self.answers:
            estimates = log_likelihood(params, self.model, self.contexts, self.answers,
                                       jax.random.fold_in(self.rng, 0), **self.options_kwargs)
            tokens = sum(len(a) for a in self.answers)
            metrics["nll_per_token"] = -float(np.sum(estimates)) / tokens
        if self.questions:
            result = multiple_choice(params, self.model, self.questions, self.options,
                                     jax.random.fold_in(self.rng, 1), labels=self.labels,
                                     **self.options_kwargs)
            metrics["choice_accuracy"] = result["accuracy"]
        return metrics


def make_evaluators(specs: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict,
                    tokenizer: Tokenizer) -> list[Evaluator]:
    """Evaluators from plain-dict specs (see the module docstring); errors name the spec."""
    evaluators: list[Evaluator] = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        # The class of the kind (a short name or `module:Class`), its required key and what
        # that key holds.
        target, required, what = EVALUATOR_KINDS.get(kind, (kind, None, None))
        if not isinstance(target, str) or ":" not in target:
            raise ValueError(f"evaluator {i}: 'kind' must be one of {sorted(EVALUATOR_KINDS)} "
                             f"or 'module:Class', found {kind!r}")
        module_name, class_name = target.split(":", 1)
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"evaluator {i}: cannot load kind {kind!r} ({target}): {e}") from None
        if required and required not in spec:
            raise ValueError(f"evaluator {i} ({kind}): expected {what}")
        evaluators.append(cls(config, tokenizer, **spec))
    names = [e.name for e in evaluators]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluators need distinct names (their metric prefixes), found {names}")
    return evaluators


def run_evaluators(evaluators: Sequence[Evaluator], params: Any, step: int
                   ) -> dict[str, float]:
    """Every evaluator's metrics, keyed ``eval/<evaluator name>/<metric>``."""
    return {f"eval/{evaluator.name}/{key}": value for evaluator in evaluators
            for key, value in evaluator.run(params, step).items()}
