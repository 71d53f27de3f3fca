"""Supervised fine-tuning examples from chat conversations (REFERENCE.md sections 1 and 2).

A conversation is a `messages` list of `{"role": "system"|"user"|"assistant", "content": str}`
(an optional system message first, then user and assistant turns). It is rendered with the
tokenizer's LLaDA chat format (`Tokenizer.render_turn`; BOS only at the very start) into one row
of `seq_len` tokens:

    tokens    <BOS> prompt turns ... <assistant header> answer <|eot_id|> <EOS> <EOS> ...
    maskable    F   F ...              F ...              T ...  T           T     T   ...
    fill        F   F ...              F ...              F ...  F           T     T   ...

The example itself ends with the answer's `<|eot_id|>` (the released template closes every turn
with it, and the Instruct model emits `<|eot_id|>` and then EOS). `fill` marks the EOS padding
that exists only because the row was padded to the static `seq_len`: always a suffix.

The official recipe (LLaDA paper, appendix B.1; GUIDELINES.md) pads each example with EOS only
up to the longest example of its **mini-batch**, trains on that padding (the model learns to
stop) and counts it in the example's answer length. Rows here keep a static length and say where
the padding is; the train step treats fill positions beyond the longest row of the micro-batch
as absent, so the loss equals the official one on the batch trimmed to its longest row.

* objective `sft`: `maskable` is True on the answer, its `<|eot_id|>` and the fill (the SFT loss
  divides by the number of maskable tokens of each row, the EOS padding up to the batch's
  longest row included). Prompt tokens are never maskable.
* objective `masked_response` (LLaDA-V): padding is never labelled, so fill is not maskable.

Multi-turn conversations (`config.data.sft_multiturn`):

* `sample_turn` (the LLaDA reference): one assistant turn is drawn uniformly as the target;
  everything before it is prompt and everything after it is dropped.
* `all_responses` (LLaDA-V): every assistant answer (and, for `sft`, the fill) is maskable and
  the trainer noises them all with one `t`; user turns in between stay clean. Trailing
  non-assistant turns are dropped.

Truncation never silently loses the trained answer. When a row is too long: (1) the oldest turns
are dropped (whole exchanges, the system message and the last exchange are kept); (2) if still
too long, the prompt is cut from the left, keeping BOS and at least the assistant header before
the first trained token; (3) if even that does not fit, the conversation is a bad record
(`BadRecordError`), which the pipeline reports or skips according to `config.data.bad_records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llada_jax.data.sources import ERROR, ORIGIN
from llada_jax.data.tokenizer import Tokenizer

MULTITURN_MODES = ("sample_turn", "all_responses")
ROLES = ("system", "user", "assistant")


class BadRecordError(ValueError):
    """A record that cannot become a training example; the message starts with its origin."""

    def __init__(self, origin: str, reason: str, kind: str = "invalid") -> None:
        super().__init__(f"{origin or '<unknown record>'}: {reason}")
        self.origin = origin
        self.reason = reason
        self.kind = kind  # short category for skip counts: unreadable, invalid, empty, overlong

    def __reduce__(self):
        # Errors raised in grain's worker processes are pickled back to the main process; the
        # default exception pickling would call __init__ with the message only (a TypeError).
        return (type(self), (self.origin, self.reason, self.kind))


def parse_messages(record: dict[str, Any], messages_field: str = "messages") -> list[dict]:
    """The validated `messages` of a record; raises BadRecordError naming the record and flaw."""
    origin = str(record.get(ORIGIN, ""))
    if ERROR in record:
        raise BadRecordError(origin, str(record[ERROR]), "unreadable")
    messages = record.get(messages_field)
    if not isinstance(messages, list) or not messages:
        found = "no such field" if messages is None else type(messages).__name__
        raise BadRecordError(origin, f"expected a non-empty list in field {messages_field!r}, "
                             f"found {found}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecordError(origin, f"message {i} must be an object with 'role' and "
                                 f"'content', found {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise BadRecordError(origin, f"message {i} has no 'role'")
        if role not in ROLES:
            raise BadRecordError(origin, f"message {i} has role {role!r}; expected one of {ROLES}")
        if role == "system" and i != 0:
            raise BadRecordError(origin, f"message {i} is a system message; only the first "
                                 f"message may be one")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRecordError(origin, f"message {i} ({role}) needs a string 'content', found "
                                 f"{type(content).__name__ if 'content' in message else 'none'}")
        if role != "system" and not content.strip():
            raise BadRecordError(origin, f"message {i} ({role}) is empty", "empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecordError(origin, "the conversation has no assistant turn to train on")
    return messages


def _render(messages: Sequence[dict], trained: set[int],
            tokenizer: Tokenizer) -> list[tuple[str, list[int], list[bool]]]:
    """Each message as (role, ids, maskable), the trained ones maskable after their header."""
    turns = []
    for i, message in enumerate(messages):
        ids = tokenizer.render_turn(message["role"], message["content"])
        mask = [False] * len(ids)
        if i in trained:
            header_length = len(tokenizer.header(message["role"]))
            mask[header_length:] = [True] * (len(ids) - header_length)
        turns.append((message["role"], ids, mask))
    return turns


def _fit_turns(turns: list[tuple[str, list[int], list[bool]]], seq_len: int,
               header_length: int, origin: str) -> tuple[list[int], list[bool]]:
    """Drops oldest turns, then cuts the prompt from the left, until BOS + turns fit `seq_len`."""
    def length(ts):
        return 1 + sum(len(ids) for _, ids, _ in ts)

    last_trained = max(i for i, (_, _, mask) in enumerate(turns) if any(mask))
    users_before = [i for i in range(last_trained) if turns[i][0] == "user"]
    protected_from = users_before[-1] if users_before else last_trained
    has_system = turns[0][0] == "system"
    head = turns[:1] if has_system else []
    droppable = turns[len(head):protected_from]
    protected = turns[protected_from:]
    while droppable and length(head + droppable + protected) > seq_len:
        droppable = droppable[1:]
        while droppable and droppable[0][0] == "assistant":  # restart at a user turn
            droppable = droppable[1:]
    kept = head + droppable + protected
    ids = [i for _, turn_ids, _ in kept for i in turn_ids]
    mask = [m for _, _, turn_mask in kept for m in turn_mask]
    if 1 + len(ids) <= seq_len:
        return ids, mask
    first_trained = mask.index(True)
    rest_length = len(ids) - first_trained
    budget = seq_len - 1 - rest_length  # prompt tokens that fit after BOS
    if budget < header_length:
        raise BadRecordError(origin, f"conversation too long: BOS, the assistant header "
                             f"({header_length} tokens) and the trained tokens from the first "
                             f"answer on ({rest_length}) need {1 + header_length + rest_length} "
                             f"tokens, but config.train.seq_len is {seq_len}", "overlong")
    return ids[first_trained - budget:], mask[first_trained - budget:]


def build_sft_example(messages: Sequence[dict], tokenizer: Tokenizer, seq_len: int,
                      multiturn: str = "sample_turn", rng: np.random.Generator | None = None,
                      origin: str = "", fill_maskable: bool = True) -> dict[str, np.ndarray]:
    """One SFT row: `tokens` int32 [seq_len], `maskable` bool [seq_len], `fill` bool [seq_len].

    `messages` must already be valid (`parse_messages`). `rng` draws the target turn in
    `sample_turn` mode (required when there is more than one assistant turn). `fill_maskable`:
    whether the EOS padding is trained on (True for objective 'sft', False for
    'masked_response').
    """
    if multiturn not in MULTITURN_MODES:
        raise ValueError(f"config.data.sft_multiturn: expected one of {MULTITURN_MODES}, "
                         f"found {multiturn!r}")
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRecordError(origin, "the conversation has no assistant turn to train on")
    if multiturn == "sample_turn":
        if len(assistant_turns) == 1:
            target = assistant_turns[0]
        elif rng is None:
            raise ValueError("build_sft_example: sample_turn with several assistant turns needs "
                             "an rng")
        else:
            target = assistant_turns[int(rng.integers(len(assistant_turns)))]
        used, trained = list(messages[:target + 1]), {target}
    else:
        used, trained = list(messages[:assistant_turns[-1] + 1]), set(assistant_turns)
    turns = _render(used, trained, tokenizer)
    header_length = len(tokenizer.header("assistant"))
    ids, mask = _fit_turns(turns, seq_len, header_length, origin)
    example_length = 1 + len(ids)  # BOS + turns; the rest of the row is fill
    padding = seq_len - example_length
    tokens = np.array([tokenizer.bos_id, *ids, *([tokenizer.eos_id] * padding)], np.int32)
    maskable = np.array([False, *mask, *([fill_maskable] * padding)], bool)
    fill = np.arange(seq_len) >= example_length
    return {"tokens": tokens, "maskable": maskable, "fill": fill}

