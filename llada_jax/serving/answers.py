"""One choice's answer text, built from generated ids block by block.

The sampler finishes semi-autoregressive blocks left to right, so the ids of a finished block
never change; `Answer` turns them into text up to the first EOS / EoT, cuts it at `max_tokens`
and at the first stop string, and hands out only the new text (a streamed delta). Text that
could still become the start of a stop string, or an incomplete character at the end, is held
back until the answer is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llada_jax.data.tokenizer import Tokenizer


class Answer:
    """The answer to one choice: ids in, text deltas and a finish reason out."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, list(stop)
        self.blocks: dict[int, np.ndarray] = {}
        self.sent = ""                 # text already handed out
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def _text(self, generated: Sequence[int]) -> tuple[str, bool, int]:
        """(text, whether a stop ended it, tokens in it) of the generated ids so far."""
        ids = []
        stopped = False
        for token in list(generated)[:self.max_tokens]:
            if int(token) in (self.tokenizer.eos_id, self.tokenizer.eot_id):
                stopped = True
                break
            ids.append(int(token))
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
            # tokens of the kept text: the shortest prefix of ids that decodes to it
            kept = next((n for n in range(len(ids) + 1)
                         if len(self.tokenizer.decode(ids[:n])) >= cut), len(ids))
            ids = ids[:kept]
        return text, stopped, len(ids)

    def add_block(self, index: int, block_tokens: np.ndarray) -> str:
        """Records finished block `index` ([block_length] ids); returns the new text."""
        if self.finish_reason is not None:
            return ""
        self.blocks[index] = np.asarray(block_tokens)
        contiguous = []
        while len(contiguous) in self.blocks:
            contiguous.append(self.blocks[len(contiguous)])
        if not contiguous:
            return ""
        text, stopped, _ = self._text(np.concatenate(contiguous))
        if not stopped:   # hold back what a later block may still turn into a stop string
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[:len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, generated: np.ndarray) -> str:
        """All generated ids [gen_length] are known: the rest of the text, and the reason."""
        text, stopped, count = self._text(generated)
        self.finish_reason = "stop" if stopped else "length"
        self.completion_tokens = count
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta

    @property
    def text(self) -> str:
        return self.sent
