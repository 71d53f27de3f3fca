"""The built-in synthetic pre-training corpus, generated in code: a tiny model learns it in minutes.

No downloads, no files: every document is a pure function of (seed, split, index), so the
source is a grain `RandomAccessDataSource` (`__len__` / `__getitem__`) and any position of an
epoch can be recomputed after a restart. (The built-in *chat* set for SFT is
`llada_jax.data.synthetic_chat`.)

The text is plain ASCII (the built-in `CharTokenizer` covers it) and has structure a small
bidirectional model picks up quickly, with a spread of difficulty:
  * templates and fixed words ("add:", "count from", "lives in") - learnt within steps;
  * a small fixed world of facts (20 people, their city and favourite colour) - memorisation;
  * counting, copying and reversing - in-context structure, which masked diffusion sees from
    both sides;
  * two-digit addition - the hardest, learnt last.

A document (`{"text": str, schema.ORIGIN: "synthetic@SPLIT[i]"}`) is one to three lines, each
one task example.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from llada_jax.data.schema import ORIGIN

PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
          "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
          "yvonne")
CITIES = ("paris", "tokyo", "lima", "cairo", "oslo", "rome", "delhi", "quito")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# The fixed world: person i lives in CITIES[(3i + 1) % 8] and likes COLOURS[(5i + 2) % 8].
CITY_OF = {name: CITIES[(3 * i + 1) % len(CITIES)] for i, name in enumerate(PEOPLE)}
COLOUR_OF = {name: COLOURS[(5 * i + 2) % len(COLOURS)] for i, name in enumerate(PEOPLE)}

SPLITS = ("train", "eval")


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))


def _addition(rng):
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    return f"add: {a} + {b} = ", f"{a + b}."


def _counting(rng):
    start = int(rng.integers(0, 30))
    return f"count from {start}:", "".join(f" {start + k}" for k in range(5)) + "."


def _copy(rng):
    word = _word(rng)
    return f"copy {word} -> ", f"{word}."


def _reverse(rng):
    word = _word(rng)
    return f"reverse {word} -> ", f"{word[::-1]}."


def _city(rng):
    name = PEOPLE[int(rng.integers(len(PEOPLE)))]
    return f"{name} lives in ", f"{CITY_OF[name]}."


def _colour(rng):
    name = PEOPLE[int(rng.integers(len(PEOPLE)))]
    return f"{name} likes ", f"{COLOUR_OF[name]}."


TASKS: tuple[Callable[[np.random.Generator], tuple[str, str]], ...] = (
    _addition, _counting, _copy, _reverse, _city, _colour)


class SyntheticTextSource:
    """Pre-training documents `{"text": str}` of the built-in corpus; `split` is train or eval.
    `size` is `config.data.synthetic_size`, a positive integer (`data.validation.check`)."""

    def __init__(self, size: int, seed: int = 0, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"synthetic split: expected one of {SPLITS}, found {split!r}")
        self.size, self.seed, self.split = size, seed, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, str]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {self.size})")
        # The split enters the seed, so train and eval examples are drawn independently.
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), index])
        # One to three lines, each a task's prompt and answer.
        lines = ["".join(TASKS[int(rng.integers(len(TASKS)))](rng))
                 for _ in range(int(rng.integers(1, 4)))]
        return {"text": "\n".join(lines), ORIGIN: f"synthetic@{self.split}[{index}]"}

