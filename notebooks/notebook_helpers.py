"""What the notebooks in this folder share, so that their cells stay one or two calls.

Only notebook concerns live here (sampling, scoring and checkpoint loading are the library's:
`llada_jax.generation.Generator`, `llada_jax.diffusion.likelihood`):

* which accelerator is here (`detect_backend`) and which run length fits it (`load_config`):
  the presets as they are on a TPU, a GPU or a CPU, cut to a few dozen steps when
  `LLADA_NOTEBOOK_TINY=1` (what CI runs, `tests/test_notebooks.py`);
* small data the notebooks write and score: a `messages` JSONL file from the built-in chat set
  (`write_chat_jsonl`), a multiple-choice set built from its held-out questions
  (`synthetic_multiple_choice`, as chat prompts and answers by `chat_pairs`);
* what a notebook displays: the shards of a few params (`sharding_table`), a loss curve
  (`plot_losses`); and `strip_outputs`, how the notebooks are committed.

The notebooks import it from the clone they run in (`notebooks/` beside the `llada_jax`
package): it is not part of the installed library.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from llada_jax.data import synthetic_chat
from llada_jax.data.tokenizer import Tokenizer

TINY_ENV = "LLADA_NOTEBOOK_TINY"
# The root of the clone this file is in: where `configs/` lives.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Backend:
    """The accelerator a notebook runs on, and whether the tiny CI settings are forced."""

    platform: str        # 'tpu' | 'gpu' | 'cpu'
    device_count: int    # devices of every process
    device_kind: str     # e.g. 'TPU v5 lite', 'NVIDIA A100-SXM4-40GB', 'cpu'
    process_count: int
    tiny: bool           # LLADA_NOTEBOOK_TINY=1: a few dozen steps, whatever the accelerator

    def __str__(self) -> str:
        mode = " (tiny CI settings: LLADA_NOTEBOOK_TINY=1)" if self.tiny else ""
        return (f"{self.platform.upper()}: {self.device_count} x {self.device_kind}, "
                f"{self.process_count} process(es){mode}")


def tiny_mode() -> bool:
    """True when `LLADA_NOTEBOOK_TINY=1` (also 'true'/'yes'); any other value is False."""
    return os.environ.get(TINY_ENV, "").strip().lower() in ("1", "true", "yes")


def detect_backend() -> Backend:
    """The default JAX backend of this runtime (Colab TPU / GPU / CPU)."""
    devices = jax.devices()
    return Backend(platform=jax.default_backend(), device_count=len(devices),
                   device_kind=devices[0].device_kind, process_count=jax.process_count(),
                   tiny=tiny_mode())


def load_preset(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py`'s `get_config(arg)` (configs/ is a folder of files, not a package)."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config preset {name!r} not found: expected {path} (the "
                                f"notebooks run from a clone of the repository)")
    spec = importlib.util.spec_from_file_location(f"llada_jax_preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def load_config(name: str, backend: Backend, *, tiny_steps: int = 40,
                arg: str | None = None) -> ml_collections.ConfigDict:
    """A preset sized for `backend`.

    On a TPU, a GPU or a plain CPU runtime the preset runs as written (its full length: seconds
    to minutes for the tiny presets). With `backend.tiny` it is cut to `tiny_steps` updates with
    no periodic evaluation and one checkpoint at the end, so a notebook runs in well under a
    minute on two CPU cores.
    """
    if not isinstance(tiny_steps, int) or tiny_steps <= 0:
        raise ValueError(f"tiny_steps: expected a positive integer, found {tiny_steps!r}")
    config = load_preset(name, arg)
    if backend.tiny:
        train = config.train
        train.steps = tiny_steps
        train.warmup_steps = min(train.warmup_steps, max(tiny_steps // 4, 1))
        train.log_every = max(tiny_steps // 4, 1)
        train.eval_every = 0
        train.checkpoint_every = 0  # the trainer still saves once, at the end
    return config


# ----------------------------------------------------------------------------------------------
# Data the notebooks write and score.


def write_chat_jsonl(path: str, num_conversations: int, split: str = "train") -> str:
    """Writes the first `num_conversations` of the built-in chat set as `messages` JSONL.

    Each line is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, the format
    `configs/sft.py` reads with `data.source='files:PATH'`. Returns `path`.
    """
    if not isinstance(num_conversations, int) or num_conversations <= 0:
        raise ValueError(f"num_conversations: expected a positive integer, found "
                         f"{num_conversations!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for index in range(num_conversations):
            question, answer = synthetic_chat.question_answer(split, index)
            record = {"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]}
            f.write(json.dumps(record) + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """One question: the user's text, its options, and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    label: int


def synthetic_multiple_choice(num_questions: int, split: str = "test") -> list[MultipleChoice]:
    """Multiple-choice items from the built-in chat set's questions (held-out by default).

    The options of a question about a word are the answers of every task to that word ("Reverse
    kfb": bfk, kfb, KFB, k, b), duplicates removed, in a fixed order; one is right. A model that
    only knows the answer format scores about 1 / (number of options).
    """
    if not isinstance(num_questions, int) or num_questions <= 0:
        raise ValueError(f"num_questions: expected a positive integer, found {num_questions!r}")
    items = []
    for index in range(num_questions):
        question, answer = synthetic_chat.question_answer(split, index)
        word = question.rsplit(" ", 1)[-1]
        # The answer of each task to the same word (the question's own task included).
        options = [synthetic_chat.task_question_answer(task, word)[1]
                   for task in synthetic_chat.TASKS]
        choices = tuple(dict.fromkeys(options))
        items.append(MultipleChoice(question, choices, choices.index(answer)))
    return items


# ----------------------------------------------------------------------------------------------
# Display.


def sharding_table(params: Any, limit: int = 6) -> list[dict[str, Any]]:
    """The first `limit` params: path, global shape, PartitionSpec and one device's shard shape."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0][:limit]:
        sharding = leaf.sharding
        spec = getattr(sharding, "spec", None)
        rows.append({"param": "/".join(str(getattr(k, "key", k)) for k in path),
                     "shape": tuple(leaf.shape),
                     "spec": str(spec) if spec is not None else type(sharding).__name__,
                     "shard_shape": tuple(sharding.shard_shape(leaf.shape))})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [keys] + [[str(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     for line in cells)


def plot_losses(history: Sequence[dict[str, float]],
                eval_history: Sequence[dict[str, float]] = (), title: str = "training loss"):
    """A matplotlib figure of the per-step loss (and its running mean, and eval points)."""
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_losses: the history is empty (no step was run)")
    steps = np.asarray([h["step"] for h in history]) + 1
    losses = np.asarray([h["loss"] for h in history])
    window = max(1, len(losses) // 10)
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps[window - 1:], running, label=f"running mean ({window} steps)")
    if eval_history:
        ax.plot([e["step"] + 1 for e in eval_history], [e["loss"] for e in eval_history], "o",
                label="eval loss")
    ax.set_xlabel("update")
    ax.set_ylabel("masked-token loss")
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


def chat_pairs(tokenizer: Tokenizer, question: str,
               answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, answer ids per answer) of one user question in the chat template.

    The prompt ends with the assistant header; each answer is its text followed by
    `<|eot_id|>`, the way an SFT model was trained to end a turn.
    """
    prompt = tokenizer.render_chat([{"role": "user", "content": question}],
                                   add_generation_prompt=True)
    return prompt, [[*tokenizer.encode(answer), tokenizer.eot_id] for answer in answers]


def strip_outputs(path: str) -> None:
    """Removes outputs, execution counts and execution timings from a notebook file, in place:
    how the notebooks are committed (tests/test_notebooks.py checks it)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)
