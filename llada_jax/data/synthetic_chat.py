"""The built-in synthetic chat set: short question/answer tasks a tiny model learns on a CPU.

Each conversation is one user question and one assistant answer about a three-letter word:

    Repeat kfb          -> kfb        Uppercase kfb      -> KFB       Reverse kfb -> bfk
    First letter of kfb -> k          Last letter of kfb -> b

Every task is a rule that holds for any word, so a model that learned it answers *held-out*
questions too. The `test` split holds (task, word) pairs that never occur in `train`: a pair
belongs to `test` exactly when the CRC32 of its plain question ("Reverse kfb") is divisible by
`TEST_MODULUS`. Record `i` of a split is a pure function of (split, i), so every process and
every run sees the same conversations.

All words have the same length and end the question, so every letter an answer needs sits at a
fixed distance before it, which RoPE attention can learn. Half of the questions start with a
short opener ("Task: Reverse kfb"), so the prompt length varies within each task: the model has
to find the word relative to the answer, not relative to the row's start or end (which move at
generation time, where the generated region is `sampler.gen_length` long).

Everything is ASCII, so the built-in `CharTokenizer` (vocabulary 109) covers it.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import numpy as np

from llada_jax.data.schema import ORIGIN

TASKS = ("repeat", "uppercase", "reverse", "first", "last")
WORD_LENGTH = 3
# Drawn uniformly for every question; "" (no opener) half of the time.
OPENERS = ("", "", "", "", "Hi! ", "Now: ", "Task: ", "Please: ")
TEST_MODULUS = 10
# task -> (the question before the word, the answer as a function of the word)
_QUESTIONS = {"repeat": ("Repeat", lambda w: w), "uppercase": ("Uppercase", str.upper),
              "reverse": ("Reverse", lambda w: w[::-1]),
              "first": ("First letter of", lambda w: w[0]),
              "last": ("Last letter of", lambda w: w[-1])}
_SEED = 20240917


def task_question_answer(task: str, word: str) -> tuple[str, str]:
    """The (question, answer) of one task applied to one word."""
    if task not in _QUESTIONS:
        raise ValueError(f"unknown synthetic chat task {task!r}")
    question, answer = _QUESTIONS[task]
    return f"{question} {word}", answer(word)


def split_of(question: str) -> str:
    """`test` or `train`: which split a plain question (no opener) belongs to (a fixed function
    of its text)."""
    return "test" if zlib.crc32(question.encode("utf-8")) % TEST_MODULUS == 0 else "train"


# Cached: drawing a record costs ~0.2 ms (a seeded numpy Generator each), a third of the cost of
# an SFT row, and training revisits every record once per epoch (the tiny SFT recipe ~5 times).
@functools.lru_cache(maxsize=1 << 17)
def question_answer(split: str, index: int) -> tuple[str, str]:
    """The (question, answer) of record `index` of `split` (deterministic)."""
    if split not in ("train", "test"):
        raise ValueError(f"synthetic_chat split must be 'train' or 'test', found {split!r}")
    rng = np.random.default_rng((_SEED, 0 if split == "train" else 1, int(index)))
    while True:  # rejection: draw until the question falls in the requested split
        task = TASKS[int(rng.integers(len(TASKS)))]
        word = "".join(chr(ord("a") + int(c)) for c in rng.integers(26, size=WORD_LENGTH))
        question, answer = task_question_answer(task, word)
        if split_of(question) == split:
            return OPENERS[int(rng.integers(len(OPENERS)))] + question, answer


class SyntheticChatSource:
    """Random-access source of `{"messages": [user, assistant]}` records of one split.

    `size` is the number of training conversations (`config.data.synthetic_size`, a positive
    integer: `data.validation.check`); the test split holds `size // TEST_MODULUS` (at least one).
    """

    def __init__(self, split: str = "train", size: int = 20000) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"synthetic_chat split must be 'train' or 'test', found {split!r}")
        self.split = split
        self._length = size if split == "train" else max(size // TEST_MODULUS, 1)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % self._length
        question, answer = question_answer(self.split, index)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}],
                ORIGIN: f"synthetic_chat@{self.split}[{index}]"}
