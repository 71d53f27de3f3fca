"""Conversations -> token ids and the maskable vector: the one conversation encoder.

`encode_conversation(messages, tokenizer, style=..., image_token_counts=..., max_length=...,
truncation=...)` renders validated messages (`parse_messages`; `llava_messages` for a LLaVA
record); each `<image>` becomes as many `schema.IMAGE_PLACEHOLDER_ID`s as its token count
(`multimodal_data` computes counts and pixels). Styles:

* `llada` (text SFT, REFERENCE.md sections 1-2): `<BOS>` + `Tokenizer.render_turn` of each turn
  (header, stripped content, `<|eot_id|>`); maskable: the trained answers after their header.
  `build_sft_example` picks the trained turns (`data.sft_multiturn`: `sample_turn`, the LLaDA
  reference, draws one answer and drops what follows; `all_responses`, LLaDA-V, trains every
  answer with one `t`) and pads with EOS to `seq_len`; `fill` marks that padding (a suffix), which
  objective `sft` trains on (the official recipe pads to the longest row of the mini-batch and
  trains on it; the train step trims each micro-batch to its longest row) and
  `masked_response` never does.
* `llava_llada` (LLaDA-V stage 2, `preprocess_llada`): `<BOS>`, a system turn (the template's
  unless the conversation starts with one), then `<|start_header_id|>role<|end_header_id|>` +
  `"\n\n" + content` + `<|eot_id|>` per turn, content NOT stripped in training (stripped with
  `add_generation_prompt`, as the released chat template does at inference), text encoded piece
  by piece between special tokens and image marks. Maskable: every answer whole plus every BOS,
  header mark and `<|eot_id|>` (LLaDA-V's labels != -100).
* `llada_plain` (LLaDA-V stage 1, `preprocess_plain`): image tokens + caption + `"\n"`, no BOS
  or template; the caption and its newline are maskable.

Truncation, one named policy (`TRUNCATIONS`; default: the style's official one):

* `drop_oldest` (text SFT): drop whole exchanges from the oldest on, keeping a leading system
  message and the last trained exchange; then cut the prompt from the left, keeping BOS and at
  least the assistant header before the first trained token.
* `drop_last_exchange` (LLaDA-V's loader): drop the last exchange (user turn + answer, with
  their images) while another answer is left.

What still does not fit is a bad record (`BadRecordError`, kind 'overlong'), reported or skipped
by `config.data.bad_records`: the trained answer is never silently lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llada_jax.config import SFT_MULTITURN, fail
from llada_jax.data.llava_format import LLAVA_SYSTEM_MESSAGE, PLAIN_SEPARATOR
from llada_jax.data.schema import ERROR, IMAGE_MARK, IMAGE_PLACEHOLDER_ID, ORIGIN, BadRecordError
from llada_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
STYLES = ("llada", "llava_llada", "llada_plain")
TRUNCATIONS = ("drop_oldest", "drop_last_exchange")
DEFAULT_TRUNCATION = {"llada": "drop_oldest", "llava_llada": "drop_last_exchange",
                      "llada_plain": "drop_last_exchange"}
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}


# --- validation ---------------------------------------------------------------------------------
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


def llava_messages(record: dict[str, Any]) -> list[dict]:
    """A LLaVA record's `conversations` as validated chat messages (human -> user, gpt ->
    assistant; a leading gpt turn is dropped, as `preprocess_llada` does); BadRecordError
    naming the record for anything malformed."""
    origin = str(record.get(ORIGIN, ""))
    if ERROR in record:
        raise BadRecordError(origin, str(record[ERROR]), "unreadable")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(origin, "expected a non-empty list in field 'conversations'")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
            raise BadRecordError(origin, f"conversation turn {i} must be an object with 'from' "
                                 f"in {sorted(LLAVA_ROLES)} and 'value', found {turn!r}"[:300])
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn.get("value")})
    if messages[0]["role"] == "assistant":   # the reference skips a conversation's leading answer
        messages = messages[1:]
    parse_messages({"messages": messages, ORIGIN: origin})
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_MARK in m["content"]:
            raise BadRecordError(origin, f"conversation turn {i} (gpt) holds {IMAGE_MARK}; images "
                                 f"belong in human turns")
    return messages


def move_image_to_front(content: str) -> str:
    """LLaVA's `preprocess_multimodal`: a message holding exactly one `<image>`, not at its
    start, becomes `"<image>\\n" + rest.strip()` (stripped again); others are unchanged."""
    if content.count(IMAGE_MARK) == 1 and not content.startswith(IMAGE_MARK):
        content = (IMAGE_MARK + "\n" + content.replace(IMAGE_MARK, "").strip()).strip()
    return content


# --- rendering ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Turn:
    role: str
    ids: list[int]
    maskable: list[bool]
    trained: bool = False
    images: int = 0


@dataclasses.dataclass
class EncodedIds:
    """An encoded conversation: `ids` (placeholders included), `maskable`, and how many of the
    conversation's images (the first ones) survived truncation."""

    ids: list[int]
    maskable: list[bool]
    num_images: int


def render_llava_turn(tokenizer: Tokenizer, role: str, content: str,
                      image_token_counts: Sequence[int]) -> list[int]:
    """`<|start_header_id|>role<|end_header_id|>` + `"\\n\\n" + content` + `<|eot_id|>` as ids,
    content as given (not stripped), each `<image>` expanded into its count of placeholder ids.

    The special tokens and the image marks split the text; each piece between them is encoded
    on its own (`"\\n\\n"` together with the content that follows it), as the reference's
    tokenizer does with its added special tokens.
    """
    marks = content.count(IMAGE_MARK)
    if marks != len(image_token_counts):
        raise ValueError(f"a turn with {marks} {IMAGE_MARK} mark(s) got "
                         f"{len(image_token_counts)} image(s)")
    ids = [tokenizer.start_header_id, *tokenizer.encode(role), tokenizer.end_header_id]
    for k, piece in enumerate(("\n\n" + content).split(IMAGE_MARK)):
        if k:
            ids += [IMAGE_PLACEHOLDER_ID] * image_token_counts[k - 1]
        if piece:
            ids += tokenizer.encode(piece)
    return [*ids, tokenizer.eot_id]


def _llada_turns(messages: Sequence[dict], trained: set[int],
                 tokenizer: Tokenizer) -> list[_Turn]:
    turns = []
    for i, message in enumerate(messages):
        ids = tokenizer.render_turn(message["role"], message["content"])
        header = len(tokenizer.header(message["role"])) if i in trained else len(ids)
        turns.append(_Turn(message["role"], ids, [k >= header for k in range(len(ids))],
                           i in trained))
    return turns


def _llava_turns(messages: Sequence[dict], counts: Sequence[int], tokenizer: Tokenizer,
                 add_generation_prompt: bool, structural: set[int]) -> list[_Turn]:
    turns, used = [], 0
    for m in messages:
        content = m["content"]
        if add_generation_prompt:     # the released chat template trims every message
            content = content.strip()
        elif counts:                  # training rows of records with images
            content = move_image_to_front(content)
        n = content.count(IMAGE_MARK)
        ids = render_llava_turn(tokenizer, m["role"], content, counts[used:used + n])
        answer = m["role"] == "assistant" and not add_generation_prompt
        mask = [answer or (i in structural and not add_generation_prompt) for i in ids]
        turns.append(_Turn(m["role"], ids, mask, answer, n))
        used += n
    return turns


# --- truncation ---------------------------------------------------------------------------------
def _drop_oldest(head: list[int], turns: list[_Turn], max_length: int, header_length: int,
                 origin: str) -> tuple[list[int], list[bool], list[_Turn]]:
    """Drops oldest exchanges, then cuts the prompt from the left, until it all fits."""
    def length(ts):
        return len(head) + sum(len(t.ids) for t in ts)

    last_trained = max(i for i, t in enumerate(turns) if t.trained)
    users_before = [i for i in range(last_trained) if turns[i].role == "user"]
    protected_from = users_before[-1] if users_before else last_trained
    kept_head = turns[:1] if turns[0].role == "system" else []
    droppable = turns[len(kept_head):protected_from]
    protected = turns[protected_from:]
    while droppable and length(kept_head + droppable + protected) > max_length:
        droppable = droppable[1:]
        while droppable and droppable[0].role == "assistant":  # restart at a user turn
            droppable = droppable[1:]
    ids, mask, kept = _joined(kept_head + droppable + protected)
    if len(head) + len(ids) <= max_length:
        return ids, mask, kept
    # The first maskable token of the first trained turn (not a maskable prompt token).
    first = next(i for i, t in enumerate(kept) if t.trained)
    first_trained = sum(len(t.ids) for t in kept[:first]) + kept[first].maskable.index(True)
    rest_length = len(ids) - first_trained
    budget = max_length - len(head) - rest_length  # prompt tokens that fit after the head
    if budget < header_length:
        raise BadRecordError(origin, f"conversation too long: BOS, the assistant header "
                             f"({header_length} tokens) and the trained tokens from the first "
                             f"answer on ({rest_length}) need "
                             f"{len(head) + header_length + rest_length} tokens, but "
                             f"config.train.seq_len is {max_length}", "overlong")
    return ids[first_trained - budget:], mask[first_trained - budget:], kept


def _drop_last_exchange(head: list[int], turns: list[_Turn], suffix: list[int], max_length: int,
                        counts: Sequence[int], may_drop: bool,
                        origin: str) -> tuple[list[int], list[bool], list[_Turn]]:
    def length(ts):
        return len(head) + sum(len(t.ids) for t in ts) + len(suffix)

    while may_drop and length(turns) > max_length:
        answers = [i for i, t in enumerate(turns) if t.role == "assistant"]
        if len(answers) < 2:
            break
        turns = turns[:answers[-2] + 1]   # drop the last exchange
    if length(turns) > max_length:
        raise BadRecordError(origin, f"conversation too long: {length(turns)} tokens "
                             f"({sum(counts[:sum(t.images for t in turns)])} of them image "
                             f"tokens) for config.train.seq_len={max_length}", "overlong")
    return _joined(turns)


def _joined(turns: list[_Turn]) -> tuple[list[int], list[bool], list[_Turn]]:
    """(ids, maskable, turns) of `turns` laid end to end."""
    return [i for t in turns for i in t.ids], [m for t in turns for m in t.maskable], turns


# --- the encoder --------------------------------------------------------------------------------
def encode_conversation(messages: Sequence[dict], tokenizer: Tokenizer, *,
                        style: str = "llada", image_token_counts: Sequence[int] = (),
                        system_message: str = LLAVA_SYSTEM_MESSAGE,
                        trained_turns: set[int] | None = None,
                        add_generation_prompt: bool = False, max_length: int | None = None,
                        truncation: str | None = None, origin: str = "") -> EncodedIds:
    """A validated conversation -> `EncodedIds` in `style` (see the module docstring).

    `image_token_counts`: the token count of each image, in the order of the `<image>` marks.
    `trained_turns` (style 'llada'): the indices of the messages whose answers are maskable
    (default: every assistant turn). `system_message` (style 'llava_llada'): the default system
    turn. `add_generation_prompt`: a prompt to sample from (nothing maskable; llava_llada ends
    with the assistant header; llada_plain is the image alone). `max_length` and `truncation`
    (default: the style's `DEFAULT_TRUNCATION`): see the module docstring.
    """
    if style not in STYLES:
        fail("data.conversation_format", f"one of {STYLES[1:]}", style)
    truncation = DEFAULT_TRUNCATION[style] if truncation is None else truncation
    if truncation not in TRUNCATIONS:
        raise ValueError(f"encode_conversation: truncation must be one of {TRUNCATIONS}, found "
                         f"{truncation!r}")
    counts = list(image_token_counts)
    marks = [m["content"].count(IMAGE_MARK) for m in messages]
    if sum(marks) != len(counts):
        raise BadRecordError(origin, f"the conversation has {sum(marks)} {IMAGE_MARK} mark(s) but "
                             f"the record has {len(counts)} image(s)")
    if style == "llada_plain":
        return _encode_plain(messages, tokenizer, counts, add_generation_prompt, max_length,
                             origin)
    messages = list(messages)
    suffix: list[int] = []
    structural = {tokenizer.bos_id, tokenizer.start_header_id, tokenizer.end_header_id,
                  tokenizer.eot_id}
    if style == "llada":
        head = [tokenizer.bos_id]
        trained = ({i for i, m in enumerate(messages) if m["role"] == "assistant"}
                   if trained_turns is None else set(trained_turns))
        turns = _llada_turns(messages, trained, tokenizer)
    else:
        if messages and messages[0]["role"] == "system":
            if marks[0]:
                raise BadRecordError(origin, f"the system message holds {IMAGE_MARK}; images "
                                     f"belong in user turns")
            system_message = messages.pop(0)["content"]
        if add_generation_prompt:
            system_message = system_message.strip()
            # The open assistant header: an empty assistant turn without its <|eot_id|>.
            suffix = render_llava_turn(tokenizer, "assistant", "", [])[:-1]
        head = [tokenizer.bos_id, *render_llava_turn(tokenizer, "system", system_message, [])]
        turns = _llava_turns(messages, counts, tokenizer, add_generation_prompt, structural)
    if max_length is None:
        ids, mask, kept = _joined(turns)
    elif truncation == "drop_oldest":
        ids, mask, kept = _drop_oldest(head, turns, max_length - len(suffix),
                                       len(tokenizer.header("assistant")), origin)
    else:
        ids, mask, kept = _drop_last_exchange(head, turns, suffix, max_length, counts,
                                              not add_generation_prompt, origin)
    head_mask = ([False] * len(head) if style == "llada" or add_generation_prompt
                 else [i in structural for i in head])
    return EncodedIds(head + ids + suffix, head_mask + mask + [False] * len(suffix),
                      sum(t.images for t in kept))


def _encode_plain(messages: Sequence[dict], tokenizer: Tokenizer, counts: list[int],
                  add_generation_prompt: bool, max_length: int | None,
                  origin: str) -> EncodedIds:
    """`llada_plain`: image tokens + caption + "\\n" (the caption maskable); a prompt is the
    image alone."""
    wanted = 1 if add_generation_prompt else 2
    if (len(messages) != wanted or messages[0]["role"] != "user" or len(counts) != 1
            or IMAGE_MARK not in messages[0]["content"]
            or (wanted == 2 and messages[1]["role"] != "assistant")):
        raise BadRecordError(origin, f"a 'llada_plain' (stage 1) record needs exactly one "
                             f"human turn with one {IMAGE_MARK} and one gpt caption, found "
                             f"{[m['role'] for m in messages]} with {len(counts)} image(s)")
    image_ids = [IMAGE_PLACEHOLDER_ID] * counts[0]
    caption = [] if add_generation_prompt else tokenizer.encode(
        messages[1]["content"] + PLAIN_SEPARATOR)
    ids = image_ids + caption
    if max_length is not None and len(ids) > max_length:
        raise BadRecordError(origin, f"caption too long: {len(ids)} tokens ({len(image_ids)} of "
                             f"them image tokens) for config.train.seq_len={max_length}",
                             "overlong")
    return EncodedIds(ids, [False] * len(image_ids) + [True] * len(caption), 1)


def build_sft_example(messages: Sequence[dict], tokenizer: Tokenizer, seq_len: int,
                      multiturn: str = "sample_turn", rng: np.random.Generator | None = None,
                      origin: str = "", fill_maskable: bool = True) -> dict[str, np.ndarray]:
    """One text SFT row: `tokens` int32 [seq_len], `maskable` bool [seq_len], `fill` bool
    [seq_len] (style 'llada', truncation 'drop_oldest').

    `messages` must already be valid (`parse_messages`). `rng` draws the target turn in
    `sample_turn` mode (required when there is more than one assistant turn). `fill_maskable`:
    whether the EOS padding is trained on (True for objective 'sft', False for
    'masked_response').
    """
    if multiturn not in SFT_MULTITURN:
        fail("data.sft_multiturn", f"one of {SFT_MULTITURN}", multiturn)
    # `parse_messages` guarantees at least one assistant turn.
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if multiturn == "all_responses":
        trained = set(assistant_turns)
    elif len(assistant_turns) == 1:
        trained = {assistant_turns[0]}
    elif rng is None:
        raise ValueError("build_sft_example: sample_turn with several assistant turns needs "
                         "an rng")
    else:
        trained = {assistant_turns[int(rng.integers(len(assistant_turns)))]}
    # What follows the last trained answer is dropped.
    encoded = encode_conversation(messages[:max(trained) + 1], tokenizer, trained_turns=trained,
                                  max_length=seq_len, origin=origin)
    return pad_row(encoded, seq_len, tokenizer.eos_id, fill_maskable)


def pad_row(encoded: EncodedIds, seq_len: int, eos_id: int,
            fill_maskable: bool) -> dict[str, np.ndarray]:
    """A conversation padded with EOS to `seq_len`: `tokens` int32, `maskable` bool (the fill:
    `fill_maskable`) and `fill` bool (the padding, a suffix)."""
    padding = seq_len - len(encoded.ids)
    return {"tokens": np.array([*encoded.ids, *([eos_id] * padding)], np.int32),
            "maskable": np.array([*encoded.maskable, *([fill_maskable] * padding)], bool),
            "fill": np.arange(seq_len) >= len(encoded.ids)}
