"""Evaluation records for `launch/evaluate.py`: reading the JSONL file and tokenising requests.

Two record kinds, one JSON object per line:

* likelihood: ``{"prompt": str, "answer": str}``;
* multiple choice: ``{"question": str, "choices": [str, ...], "label": int}``.

Every bad record (bytes that are not UTF-8, a line that is not JSON, a JSON value that is not an
object, a missing or mistyped field, a label outside the choices) is a ValueError naming
``file:line``.

Context and continuation are tokenised jointly, as lm-evaluation-harness and the official LLaDA
evaluation (`eval_llada.py`, `_encode_pair`) do: trailing whitespace of the context moves to the
front of the continuation, the whole text is tokenised once, and the continuation is what follows
the context's own token count. With a BPE whose words carry their leading space (" Paris" is one
token) this scores the token the model would really produce, not a lone " " plus "Paris".

This module does no model work; it only turns text into ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from llada_jax.data.tokenizer import Tokenizer


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
    has_likelihood = "prompt" in record or "answer" in record
    has_choice = "question" in record or "choices" in record
    if has_likelihood and has_choice:
        raise ValueError(f"{where}: a record is either {{'prompt', 'answer'}} or {{'question', "
                         f"'choices', 'label'}}, found keys {sorted(record)}")
    if not has_likelihood and not has_choice:
        raise ValueError(f"{where}: expected {{'prompt', 'answer'}} or {{'question', 'choices', "
                         f"'label'}}, found keys {sorted(record)}")
    for field in ("prompt", "answer") if has_likelihood else ("question",):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field {field!r} must be a string, found "
                             f"{_describe(record, field)}")
    if has_likelihood:
        if not record["answer"]:
            raise ValueError(f"{where}: field 'answer' is empty")
        return record
    choices = record.get("choices")
    if not (isinstance(choices, list) and choices
            and all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: field 'choices' must be a non-empty list of non-empty "
                         f"strings, found {_describe(record, 'choices')}")
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: field 'label' must be an integer in [0, {len(choices)}), "
                         f"found {_describe(record, 'label')}")
    return record


def _describe(record: dict, field: str) -> str:
    return "nothing (missing)" if field not in record else repr(record[field])[:80]


def read_eval_records(path: str) -> list[tuple[str, dict]]:
    """(``path:line``, record) for every record of a JSONL evaluation file, each checked;
    errors name ``path:line``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data file not found: {path}")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") \
                    from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") \
                    from None
            records.append((where, _check_record(record, where)))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                where: str = "record") -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) tokenised jointly, the official way.

    Trailing whitespace of `context` is moved to the start of `continuation`; then
    ``whole = encode(context + continuation)``, ``context_ids = encode(context)`` and the
    continuation is ``whole[len(context_ids):]``. Raises ValueError naming `where` when the
    continuation gets no token of its own.
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"{where}: the answer {continuation!r} gets no token of its own when "
                         f"tokenised after its context")
    return context_ids, continuation_ids


def encode_requests(tokenizer: Tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                    prefix: Sequence[int] = (), where: Sequence[str] | None = None
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """`encode_pair` over parallel lists; `prefix` (e.g. [BOS]) starts every context."""
    where = where or [f"record {n + 1}" for n in range(len(contexts))]
    pairs = [encode_pair(tokenizer, context, continuation, name) for context, continuation, name
             in zip(contexts, continuations, where, strict=True)]
    return [[*prefix, *context] for context, _ in pairs], [answer for _, answer in pairs]
