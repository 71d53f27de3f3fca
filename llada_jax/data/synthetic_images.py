"""A built-in image-conditioned task for LLaDA-V: coloured shapes and their descriptions.

Each example is an RGB image (uint8 [size, size, 3]) of one filled shape of one colour on a grey
background, and a LLaVA-style conversation asking about it ("Colour?" -> "red", "Shape?" ->
"circle"), or with `task="caption"` (the captions of LLaDA-V's stage-1 projector pre-training)
an image and its caption ("red circle"). The answer can only be read from the image, so accuracy
above chance proves the vision path works. Everything is generated from the example index:
deterministic, no downloads.
"""

from __future__ import annotations

import numpy as np

from llada_jax.data.schema import ORIGIN

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230),
           "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "triangle")
# Short questions: every character is a token of the tiny CPU models that train on this set.
QUESTIONS = {"colour": "Colour?", "shape": "Shape?"}
TASKS = ("question", "caption")
BACKGROUND = (128, 128, 128)


def draw_shape(shape: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: one filled `shape` of `colour`, random extent, near the centre."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, found {shape!r}")
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {sorted(COLOURS)}, found {colour!r}")
    image = np.full((size, size, 3), BACKGROUND, np.uint8)
    # Large and near the centre (a few pixels of jitter): in a 32 px picture of 8 px patches the
    # outline then falls on the same few patches, so a tiny tower learns shapes in minutes.
    extent = int(rng.integers(5 * size // 8, 3 * size // 4 + 1))
    jitter = max(size // 16, 1)
    top, left = (int(np.clip((size - extent) // 2 + v, 0, size - extent))
                 for v in rng.integers(-jitter, jitter + 1, size=2))
    ys, xs = np.mgrid[-top:size - top, -left:size - left]  # relative to the shape's corner
    inside = (ys >= 0) & (ys < extent) & (xs >= 0) & (xs < extent)
    if shape == "circle":
        r = (extent - 1) / 2
        inside &= (ys - r) ** 2 + (xs - r) ** 2 <= r * r
    elif shape == "triangle":  # apex at the top centre, base at the bottom
        inside &= np.abs(2 * xs - (extent - 1)) <= ys
    image[inside] = COLOURS[colour]
    return image


class ShapesDataset:
    """Random-access source of {image, conversations, answer, origin} records (grain-compatible;
    the `shapes[@SPLIT]` source of `llada_jax.data.sources`).

    `conversations` follow the LLaVA format used by LLaDA-V: a list of
    `{"from": "human"|"gpt", "value": str}` with an `<image>` placeholder in the first turn.
    Split 'train' and 'test' draw from disjoint index streams. `task="caption"`: the human turn
    is just `<image>` and the answer is the caption "{colour} {shape}" (the same pictures).
    """

    def __init__(self, size: int = 32, num_examples: int = 4096, split: str = "train",
                 seed: int = 0, task: str = "question") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found {split!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, found {task!r}")
        self.size, self.num_examples, self.task, self.split = size, num_examples, task, split
        self._seed = (seed, 0 if split == "train" else 1)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} outside [0, {self.num_examples})")
        rng = np.random.default_rng((*self._seed, index))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        kind = "colour" if rng.random() < 0.5 else "shape"
        answer = colour if kind == "colour" else shape
        question = "<image>\n" + QUESTIONS[kind]
        if self.task == "caption":
            kind, question, answer = "caption", "<image>", f"{colour} {shape}"
        return {
            "image": draw_shape(shape, colour, self.size, rng),
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": answer}],
            "answer": answer,
            "question_kind": kind,
            ORIGIN: f"shapes@{self.split}[{index}]",
        }
