"""LLaDA-V data: image-text conversations -> token rows with image placeholders, pixels, plans.

Sources (`config.data.source` / `data.eval_source` when `vision.enabled`):

    shapes[@train|@test]   the built-in coloured-shapes set (`llada_jax.data.synthetic_images`)
    files:GLOB             LLaVA-style records in `*.jsonl` (one per line) or `*.json` (one list,
                           as LLaVA's `llava_v1_5_mix665k.json`, or one record per line):
                               {"image": "a.jpg" | ["a.jpg", "b.jpg"],
                                "conversations": [{"from": "human", "value": "<image>\\nWhat..."},
                                                  {"from": "gpt", "value": "..."}]}
                           Relative image paths are taken from `data.image_folder` ('' : the
                           directory of the JSON file). Records without "image" are text-only.

Two conversation formats, LLaDA-V's `--version` (`config.data.conversation_format`):

`llava_llada` (stage 2, the default): LLaDA-V's `preprocess_llada`. One conversation becomes
one row of `train.seq_len`:

    tokens    <BOS> <system turn> <user header> P P ... P \\nWhat...<eot> <assistant turn> <EOS>...
    labelled    T    specials      T  F   T  F  F F ... F     F       T         T ... T       F
    fill        F    F ...                                                                    T

* BOS, then always a system turn holding `LLAVA_SYSTEM_MESSAGE` (a record's own leading system
  turn replaces it), then the record's turns (human -> user, gpt -> assistant; a leading gpt turn
  is dropped), each `<|start_header_id|>role<|end_header_id|>\\n\\n` + content + `<|eot_id|>`.
  Content is NOT stripped in training (the training template has no `| trim`); at inference
  (`add_generation_prompt`) it is, as the released tokenizer's chat template does.
* A record with images: a message holding exactly one `<image>` not at its start becomes
  `"<image>\\n" + rest.strip()` (LLaVA's `preprocess_multimodal`). Every `<image>` becomes N
  copies of the placeholder id `multimodal.IMAGE_PLACEHOLDER_ID` (-200), N = that image's token
  count; the text around it is encoded piece by piece (a mark is a hard token boundary).
* `maskable` (LLaDA-V's labels != -100) = every assistant turn whole (its header, content and
  `<|eot_id|>`) plus every BOS, `<|start_header_id|>`, `<|end_header_id|>` and `<|eot_id|>` of
  the system and user turns. The trainer noises them all with one `t`. Image positions, role
  names and user/system content are never maskable.
* `fill` (bool [L]) marks the EOS padding up to `seq_len`; it is never maskable, and the row
  also carries `segment_ids` (1 on the conversation, 0 on the fill) so that the trainer never
  attends to it either: the released runs train one row per device, so no padding exists.
  `data.label_eos_padding=True` (a deliberate deviation, used by the tiny preset) instead makes
  the fill maskable and attended, as in LLaDA's SFT.

`llada_plain` (stage 1, projector pre-training on captions): LLaDA-V's `preprocess_plain` with
`conv_llada_plain`: `<image>` + caption + `\\n`, no BOS, no chat template, the instruction
dropped; the caption and its `\\n` are maskable. Each image is one square view of
`image_size` whose tokens are merged flat (no newline token: 729 tokens at 384 px). Its EOS
`fill` IS maskable: the released stage-1 collator pads the labels of its 16-row batches with
the pad id (EOS) rather than -100, so the padding up to the longest row is trained on.

Images: a record with one image is processed by `vision.image_aspect_ratio` (`square`: one view
+ a newline; `anyres_max_N`: base view then tiles); every image of a multi-image record gets ONE
view padded to a square with the mean colour (`images.padded_square_pixels`): its tokens and one
newline. Pixels are uint8, stacked into `pixel_values` [max_views, S, S, 3] (zero padding views),
with the gather plan of each image token (`images.anyres_token_sources`) laid out at its
positions: `image_source_index` [L, 4] (row-local: into this row's views), `image_source_weight`
[L, 4], `image_is_newline` [L] (`multimodal.IMAGE_FIELDS`).

A conversation that does not fit keeps dropping its last exchange (user turn + answer, with
their images) while another answer is left; otherwise, and for unreadable, truncated or
oversized images, a wrong number of `<image>` marks or more views than `vision.max_views`, the
record is bad (`BadRecordError`, one line naming `file:line` and the image path): raised or
skipped by `data.bad_records` as in the text pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from llada_jax import config as config_lib
from llada_jax.data import images, sources
from llada_jax.data.chat import BadRecordError, parse_messages
from llada_jax.data.llava_format import (
    DEFAULT_TEMPLATE,
    LLADA_PLAIN,
    PLAIN_SEPARATOR,
    ConversationTemplate,
)
from llada_jax.data.pipeline import batch_and_prefetch, handle_bad_record
from llada_jax.data.synthetic_images import ShapesDataset
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.model.multimodal import IMAGE_FIELDS, IMAGE_PLACEHOLDER_ID

IMAGE_MARK = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system"}
SHAPES = "shapes"

# --- source specs -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MultimodalSource:
    """A parsed multimodal source: kind 'shapes' (argument = split) or 'files' (a glob)."""

    kind: str
    argument: str


def parse_multimodal_source(spec: str, field: str = "data.source") -> MultimodalSource:
    """'shapes[@train|@test]' or 'files:GLOB' -> MultimodalSource; ValueError naming `field`."""
    if isinstance(spec, str):
        name, at, split = spec.partition("@")
        if name == SHAPES and split in (("train", "test") if at else ("",)):
            return MultimodalSource(SHAPES, split or "train")
        kind, sep, pattern = spec.partition(":")
        if kind == "files" and sep and pattern:
            return MultimodalSource("files", pattern)
    raise ValueError(f"config.{field}: expected an image-text source with vision.enabled: "
                     f"'shapes', 'shapes@test' or 'files:GLOB' (LLaVA JSON/JSONL), found {spec!r}")


class ShapesSource:
    """The coloured-shapes set as LLaVA-style records (the image is a uint8 array); with
    `task='caption'` the stage-1 caption records."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0,
                 task: str = "question") -> None:
        self.split = split
        self._shapes = ShapesDataset(size=image_size, num_examples=size, split=split, seed=seed,
                                     task=task)

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)
        record = self._shapes[index]
        record[sources.ORIGIN] = f"{SHAPES}@{self.split}[{index}]"
        return record


class LlavaFilesSource:
    """LLaVA-style records from `*.json` / `*.jsonl` files, image paths made absolute.

    A `.json` file whose first non-blank character is `[` is one JSON list (read whole, as
    LLaVA does; each record remembers the line it starts on, so errors name `file:line`); any
    other file is read line by line (`sources.FileLinesSource`).
    """

    def __init__(self, pattern: str, image_folder: str = "") -> None:
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"config.data.source: no files match 'files:{pattern}'")
        self.image_folder = image_folder
        # (path, list of (line, record) or a line source, length)
        self._parts: list[tuple[str, Any, int]] = []
        for path in paths:
            if path.endswith(".json") and _starts_with_bracket(path):
                records = read_json_list(path)
                self._parts.append((path, records, len(records)))
            else:
                lines = sources.FileLinesSource(path)
                self._parts.append((path, lines, len(lines)))
        self._offsets = np.cumsum([0] + [n for _, _, n in self._parts])
        if self._offsets[-1] == 0:
            raise ValueError(f"config.data.source: the files matching 'files:{pattern}' hold "
                             f"no record")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        path, records, _ = self._parts[part]
        local = index - int(self._offsets[part])
        if isinstance(records, list):
            line, record = records[local]
            origin = f"{path}:{line}"
            record = (dict(record, **{sources.ORIGIN: origin}) if isinstance(record, dict) else
                      {sources.ORIGIN: origin, sources.ERROR: f"expected a JSON object, found "
                                                              f"{type(record).__name__}"})
        else:
            record = records[local]
        folder = self.image_folder or os.path.dirname(os.path.abspath(path))
        value = record.get("image")
        if isinstance(value, str):
            record["image"] = os.path.join(folder, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            record["image"] = [os.path.join(folder, v) for v in value]
        return record


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_json_list(path: str) -> list[tuple[int, Any]]:
    """The elements of a file holding one JSON list, each with the (1-based) line it starts on.

    Raises ValueError `config.data.source: FILE:LINE: ...` for bytes that are not UTF-8, JSON
    that does not parse, or a document that is not one list.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"config.data.source: {path}:{line}: not UTF-8 text ({e.reason} at "
                         f"byte {e.start})") from None
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    line, counted = 1, 0

    def fail(at: int, reason: str) -> None:
        raise ValueError(f"config.data.source: {path}:{text.count(chr(10), 0, at) + 1}: "
                         f"{reason}")

    at = _WHITESPACE.match(text, 0).end()
    if text[at:at + 1] != "[":
        fail(at, "expected a JSON list of records")
    at = _WHITESPACE.match(text, at + 1).end()
    if text[at:at + 1] == "]":
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            fail(e.pos, f"not valid JSON ({e.msg})")
        line += text.count("\n", counted, at)
        counted = at
        records.append((line, value))
        at = _WHITESPACE.match(text, end).end()
        if text[at:at + 1] == ",":
            at = _WHITESPACE.match(text, at + 1).end()
        elif text[at:at + 1] == "]":
            if text[_WHITESPACE.match(text, at + 1).end():]:
                fail(at + 1, "unexpected data after the closing ']' of the list")
            return records
        else:
            fail(at, "not valid JSON (expected ',' or ']' after a record)")


def open_multimodal_source(spec: MultimodalSource, config: ml_collections.ConfigDict) -> Any:
    if spec.kind == SHAPES:
        size = config.data.synthetic_size
        if spec.argument == "test":
            size = max(size // 10, 1)
        task = ("caption" if ConversationTemplate.from_config(config).format == LLADA_PLAIN
                else "question")
        return ShapesSource(spec.argument, size, config.vision.image_size, config.train.seed,
                            task=task)
    return LlavaFilesSource(spec.argument, config.data.image_folder)


# --- images -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """How one image becomes views and a token plan, for a given vision config.

    max_num_tiles None: one `image_size` view (its tokens, then a newline unless `newline` is
    False, the flat merge of stage 1); else AnyRes (`anyres_max_{max_num_tiles}` over grids up
    to max_grid x max_grid). `pad_to_square=True` (each image of a multi-image record) gives one
    view padded to a square with the mean colour, its tokens and a newline, whatever the mode.
    Like a Hugging Face multimodal processor it also carries the conversation `template` of the
    model, so that whoever builds it from a config (training, `launch/chat.py --image`, the
    notebooks) renders conversations exactly as the model was trained.
    """

    image_size: int
    patch_size: int
    max_num_tiles: int | None
    max_grid: int
    newline: bool = True
    template: ConversationTemplate = DEFAULT_TEMPLATE

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ImageProcessor:
        v = config.vision
        max_num_tiles = config_lib.anyres_max_tiles(v.image_aspect_ratio)
        template = ConversationTemplate.from_config(config)
        plain = template.format == LLADA_PLAIN
        if plain and max_num_tiles is not None:
            raise ValueError(f"config.vision.image_aspect_ratio: expected 'square' with "
                             f"data.conversation_format='{LLADA_PLAIN}' (stage 1: one square "
                             f"view per image, flat), found {v.image_aspect_ratio!r}")
        return cls(v.image_size, v.patch_size, max_num_tiles, v.max_grid, newline=not plain,
                   template=template)

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        return self.tokens_per_side ** 2

    def _single_view_plan(self, newline: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        plan = images.anyres_token_sources((self.image_size, self.image_size), num_views=1,
                                           tokens_per_side=self.tokens_per_side)
        return plan if newline else tuple(a[:self.tokens_per_view] for a in plan)

    def __call__(self, image: Image.Image | np.ndarray | str | os.PathLike[str],
                 pad_to_square: bool = False
                 ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(views uint8 [n, S, S, 3], plan (index [T, 4], weight [T, 4], is_newline [T]))."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image arrays must be uint8 [H, W, 3], found {image.dtype} "
                                 f"{image.shape}")
            image = Image.fromarray(image)
        if isinstance(image, Image.Image):
            image = images.to_rgb(image)
        elif isinstance(image, (str, os.PathLike)):
            image = images.load_image(image)
        else:
            raise ValueError(f"an image must be a file path, a PIL image or a uint8 array, "
                             f"found {type(image).__name__}")
        if pad_to_square:
            views = images.padded_square_pixels(image, self.image_size)[None]
            return views, self._single_view_plan(newline=True)
        if self.max_num_tiles is None:
            views = images.square_pixels(image, self.image_size)[None]
            return views, self._single_view_plan(self.newline)
        views, size = images.anyres_pixels(image, self.image_size, self.max_grid)
        plan = images.anyres_token_sources(size, len(views), self.image_size, self.max_grid,
                                           self.max_num_tiles, self.tokens_per_side)
        return views, plan

    def num_tokens(self, image_size: tuple[int, int], pad_to_square: bool = False) -> int:
        """Image tokens of an image of (width, height) `image_size`."""
        if pad_to_square:
            return self.tokens_per_view + 1
        if self.max_num_tiles is None:
            return self.tokens_per_view + int(self.newline)
        return images.anyres_num_tokens(image_size, self.image_size, self.max_grid,
                                        self.max_num_tiles, self.tokens_per_side)


# --- conversations ------------------------------------------------------------------------------
def llava_messages(record: dict[str, Any]) -> list[dict]:
    """A LLaVA record's `conversations` as validated chat messages (human -> user, gpt ->
    assistant; a leading gpt turn is dropped, as `preprocess_llada` does); BadRecordError
    naming the record for anything malformed."""
    origin = str(record.get(sources.ORIGIN, ""))
    if sources.ERROR in record:
        raise BadRecordError(origin, str(record[sources.ERROR]), "unreadable")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(origin, "expected a non-empty list in field 'conversations'")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_NAMES:
            raise BadRecordError(origin, f"conversation turn {i} must be an object with 'from' "
                                 f"in {sorted(ROLE_NAMES)} and 'value', found {turn!r}"[:300])
        messages.append({"role": ROLE_NAMES[turn["from"]], "content": turn.get("value")})
    if messages[0]["role"] == "assistant":   # the reference skips a conversation's leading answer
        messages = messages[1:]
    parse_messages({"messages": messages, sources.ORIGIN: origin})
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_MARK in m["content"]:
            raise BadRecordError(origin, f"conversation turn {i} (gpt) holds {IMAGE_MARK}; images "
                                 f"belong in human turns")
    return messages


def record_images(record: dict[str, Any]) -> list[Any]:
    """The record's images (paths, arrays or PIL images) in order; [] for a text-only record.
    BadRecordError for an 'image' field of another type."""
    value = record.get("image")
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, (str, os.PathLike, np.ndarray, Image.Image)):
            raise BadRecordError(str(record.get(sources.ORIGIN, "")),
                                 f"field 'image' must be a path or a list of paths, found "
                                 f"{value!r}"[:300])
    return items


def move_image_to_front(content: str) -> str:
    """LLaVA's `preprocess_multimodal`: a message holding exactly one `<image>`, not at its
    start, becomes `"<image>\\n" + rest.strip()` (stripped again); others are unchanged."""
    if content.count(IMAGE_MARK) == 1 and not content.startswith(IMAGE_MARK):
        content = (IMAGE_MARK + "\n" + content.replace(IMAGE_MARK, "").strip()).strip()
    return content


def render_turn(tokenizer: Tokenizer, role: str, content: str,
                image_token_counts: Sequence[int]) -> list[int]:
    """`<|start_header_id|>role<|end_header_id|>\\n\\n` + content + `<|eot_id|>` as ids, content
    as given (not stripped), each `<image>` expanded into its count of placeholder ids.

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


@dataclasses.dataclass
class EncodedConversation:
    """A rendered conversation: ids (placeholders included), maskable, and its images' data."""

    ids: list[int]
    maskable: list[bool]
    views: list[np.ndarray]                      # per image: uint8 [n_views, S, S, 3]
    plans: list[tuple[np.ndarray, np.ndarray, np.ndarray]]

    @property
    def num_views(self) -> int:
        return sum(len(v) for v in self.views)


def _process_images(image_list: Sequence[Any], processor: ImageProcessor, origin: str
                    ) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Each image's (views, plan); a multi-image record gives one padded square view each."""
    multi = len(image_list) > 1
    processed = []
    for image in image_list:
        try:
            processed.append(processor(image, pad_to_square=multi))
        except (FileNotFoundError, ValueError) as e:
            raise BadRecordError(origin, str(e), "unreadable") from e
    return processed


def encode_conversation(messages: Sequence[dict], image_list: Sequence[Any],
                        tokenizer: Tokenizer, processor: ImageProcessor, *,
                        add_generation_prompt: bool = False, origin: str = "",
                        max_length: int | None = None,
                        template: ConversationTemplate | None = None) -> EncodedConversation:
    """A conversation in `template`'s format (default: `processor.template`; see the module
    docstring) with its images.

    `messages`: `{"role", "content"}` dicts (a leading system message replaces the template's
    system message). With `add_generation_prompt` the result is a prompt to sample from: the
    assistant header is appended (llava_llada; llada_plain: just the image) and contents are
    stripped as the released chat template does at inference. `max_length`: drop trailing
    exchanges (with their images) while longer and another answer is left; BadRecordError
    ('overlong') if it still does not fit.
    """
    template = processor.template if template is None else template
    marks = [m["content"].count(IMAGE_MARK) for m in messages]
    if sum(marks) != len(image_list):
        raise BadRecordError(origin, f"the conversation has {sum(marks)} {IMAGE_MARK} mark(s) but "
                             f"the record has {len(image_list)} image(s)")
    if template.format == LLADA_PLAIN:
        return _encode_plain(messages, image_list, tokenizer, processor, add_generation_prompt,
                             origin, max_length)
    messages = [dict(m) for m in messages]
    system = template.system_message
    if messages and messages[0]["role"] == "system":
        if marks[0]:
            raise BadRecordError(origin, f"the system message holds {IMAGE_MARK}; images belong "
                                 f"in user turns")
        system = messages.pop(0)["content"]
        marks = marks[1:]
    if add_generation_prompt:     # the released chat template trims every message
        system = system.strip()
        for m in messages:
            m["content"] = m["content"].strip()
    elif image_list:              # training rows of records with images (preprocess_multimodal)
        for m in messages:
            m["content"] = move_image_to_front(m["content"])
    processed = _process_images(image_list, processor, origin)
    counts = [plan[0].shape[0] for _, plan in processed]

    head = [tokenizer.bos_id, *render_turn(tokenizer, "system", system, [])]
    turns: list[tuple[str, list[int], int]] = []   # (role, ids, images)
    used = 0
    for m, n in zip(messages, marks, strict=True):
        turns.append((m["role"], render_turn(tokenizer, m["role"], m["content"],
                                             counts[used:used + n]), n))
        used += n
    suffix = ([tokenizer.start_header_id, *tokenizer.encode("assistant"),
               tokenizer.end_header_id, *tokenizer.encode("\n\n")]
              if add_generation_prompt else [])

    def length(ts):
        return len(head) + sum(len(t[1]) for t in ts) + len(suffix)

    if max_length is not None:
        while length(turns) > max_length and not add_generation_prompt:
            answers = [i for i, t in enumerate(turns) if t[0] == "assistant"]
            if len(answers) < 2:
                break
            turns = turns[:answers[-2] + 1]   # drop the last exchange
        if length(turns) > max_length:
            raise BadRecordError(origin, f"conversation too long: {length(turns)} tokens "
                                 f"({sum(counts[:sum(t[2] for t in turns)])} of them image "
                                 f"tokens) for config.train.seq_len={max_length}", "overlong")
    kept_images = sum(t[2] for t in turns)
    ids = head + [i for t in turns for i in t[1]] + suffix
    in_answer = ([False] * len(head) + [t[0] == "assistant" for t in turns for _ in t[1]]
                 + [False] * len(suffix))
    # preprocess_llada labels the answers whole and, everywhere, these structural tokens.
    structural = {tokenizer.bos_id, tokenizer.start_header_id, tokenizer.end_header_id,
                  tokenizer.eot_id}
    maskable = [a or (i in structural) for i, a in zip(ids, in_answer, strict=True)]
    if add_generation_prompt:     # a prompt: nothing is trained on
        maskable = [False] * len(ids)
    return EncodedConversation(ids, maskable, [v for v, _ in processed[:kept_images]],
                               [p for _, p in processed[:kept_images]])


def _encode_plain(messages: Sequence[dict], image_list: Sequence[Any], tokenizer: Tokenizer,
                  processor: ImageProcessor, add_generation_prompt: bool, origin: str,
                  max_length: int | None) -> EncodedConversation:
    """`llada_plain`: image tokens + caption + "\\n" (the caption maskable); a prompt is the
    image alone."""
    wanted = 1 if add_generation_prompt else 2
    if (len(messages) != wanted or messages[0]["role"] != "user" or len(image_list) != 1
            or IMAGE_MARK not in messages[0]["content"]
            or (wanted == 2 and messages[1]["role"] != "assistant")):
        raise BadRecordError(origin, f"a '{LLADA_PLAIN}' (stage 1) record needs exactly one "
                             f"human turn with one {IMAGE_MARK} and one gpt caption, found "
                             f"{[m['role'] for m in messages]} with {len(image_list)} image(s)")
    views, plan = _process_images(image_list, processor, origin)[0]
    image_ids = [IMAGE_PLACEHOLDER_ID] * plan[0].shape[0]
    caption = [] if add_generation_prompt else tokenizer.encode(
        messages[1]["content"] + PLAIN_SEPARATOR)
    ids = image_ids + caption
    if max_length is not None and len(ids) > max_length:
        raise BadRecordError(origin, f"caption too long: {len(ids)} tokens ({len(image_ids)} of "
                             f"them image tokens) for config.train.seq_len={max_length}",
                             "overlong")
    return EncodedConversation(ids, [False] * len(image_ids) + [True] * len(caption), [views],
                               [plan])


def image_inputs(tokens: np.ndarray, conversations: Sequence[EncodedConversation],
                 max_views: int, image_size: int, tokens_per_view: int,
                 origins: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The `multimodal.IMAGE_FIELDS` arrays of rows `tokens` [B, L] (placeholders where the
    conversations' image tokens go, in order; padding anywhere else is fine)."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    pixels = np.zeros((batch, max_views, image_size, image_size, 3), np.uint8)
    index = np.zeros((batch, length, 4), np.int32)
    weight = np.zeros((batch, length, 4), np.float32)
    newline = np.zeros((batch, length), bool)
    for b, conversation in enumerate(conversations):
        if conversation.num_views > max_views:
            origin = origins[b] if origins else ""
            raise BadRecordError(origin, f"its images need {conversation.num_views} views, more "
                                 f"than config.vision.max_views={max_views}", "overlong")
        if conversation.views:
            pixels[b, :conversation.num_views] = np.concatenate(conversation.views)
        plan = images.place_token_sources(tokens[b:b + 1], [conversation.plans],
                                          [[len(v) for v in conversation.views]],
                                          IMAGE_PLACEHOLDER_ID, tokens_per_view)
        index[b], weight[b], newline[b] = (a[0] for a in plan)
    return dict(zip(IMAGE_FIELDS, (pixels, index, weight, newline), strict=True))


class MultimodalRows:
    """record -> one training row (tokens, maskable, fill, image fields), or None when skipped."""

    def __init__(self, tokenizer: Tokenizer, processor: ImageProcessor, seq_len: int,
                 max_views: int, bad_records: str) -> None:
        self.tokenizer, self.processor, self.seq_len = tokenizer, processor, seq_len
        self.max_views, self.bad_records = max_views, bad_records

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
        origin = str(record.get(sources.ORIGIN, ""))
        try:
            messages = llava_messages(record)
            encoded = encode_conversation(messages, record_images(record), self.tokenizer,
                                          self.processor, origin=origin, max_length=self.seq_len)
            padding = self.seq_len - len(encoded.ids)
            tokens = np.array(encoded.ids + [self.tokenizer.eos_id] * padding, np.int32)
            fill = np.arange(self.seq_len) >= len(encoded.ids)
            fill_labelled = self.processor.template.fill_is_labelled
            maskable = np.array(encoded.maskable + [fill_labelled] * padding, bool)
            fields = image_inputs(tokens[None], [encoded], self.max_views,
                                  self.processor.image_size, self.processor.tokens_per_view,
                                  [origin])
        except BadRecordError as error:
            handle_bad_record(error, self.bad_records)
            return None
        row = {"tokens": tokens, "maskable": maskable, "fill": fill}
        if not fill_labelled:
            # The released stage-2 runs train one row per device: nothing follows a row's last
            # token. Segment 0 makes the EOS fill exactly that (never attended, noised or
            # counted); attending to it would also tell the model where every answer ends.
            row["segment_ids"] = (~fill).astype(np.int32)
        row.update({k: v[0] for k, v in fields.items()})
        return row


def build_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  source: str | None = None, shuffle: bool | None = None,
                  num_epochs: int | None = None, batch_size: int | None = None,
                  seed: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This host's LLaDA-V batches as a grain IterDataset (checkpointable iterator).

    Batches: `tokens` int32 [b, L], `maskable` bool [b, L], `fill` bool [b, L] (the EOS padding
    of each row), `segment_ids` int32 [b, L] (llava_llada: 0 on the fill) and
    `multimodal.IMAGE_FIELDS`, with b = batch_size / process_count. Defaults
    come from the config as in `pipeline.build_dataset`.
    """
    data, train = config.data, config.train
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    spec = parse_multimodal_source(data.source if source is None else source)
    shuffle = data.shuffle if shuffle is None else shuffle
    num_epochs = data.num_epochs if num_epochs is None else num_epochs
    batch_size = train.batch_size if batch_size is None else batch_size
    seed = train.seed if seed is None else seed
    if batch_size % process_count:
        raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the number "
                         f"of processes ({process_count})")
    records = grain.MapDataset.source(open_multimodal_source(spec, config))
    if len(records) < process_count:
        raise ValueError(f"config.data.source: {len(records)} records, fewer than the "
                         f"{process_count} hosts")
    records = records[process_index::process_count]
    if shuffle:
        records = records.shuffle(seed=seed)
    records = records.repeat(num_epochs or None)
    rows = records.map(MultimodalRows(tokenizer, ImageProcessor.from_config(config),
                                      train.seq_len, config.vision.max_views, data.bad_records))
    dataset = rows.to_iter_dataset(grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size))
    return batch_and_prefetch(dataset, data, batch_size // process_count)


def build_eval_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, **kwargs: Any
                       ) -> grain.IterDataset:
    """Batches of `data.eval_source`, unshuffled and repeated (the same first batches always)."""
    if not config.data.eval_source:
        raise ValueError("config.data.eval_source is empty; set it to e.g. 'shapes@test'")
    return build_dataset(config, tokenizer, source=config.data.eval_source, shuffle=False,
                         num_epochs=0, **kwargs)


# --- prompts for sampling -----------------------------------------------------------------------
def prompt_batch(conversations: Sequence[EncodedConversation], gen_length: int, pad_id: int,
                 mask_id: int, max_views: int, image_size: int, tokens_per_view: int,
                 width: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompts (from `encode_conversation(..., add_generation_prompt=True)`) and the
    image fields of their sampling canvas [B, width + gen_length].

    Returns `tokens` int32 [B, width] and `mask` bool [B, width] (what `sampler.pad_prompts`
    gives), plus `multimodal.IMAGE_FIELDS` laid out over the canvas (prompt then gen_length
    generated positions, which hold no image).
    """
    longest = max(len(c.ids) for c in conversations)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest prompt ({longest} tokens)")
    batch = len(conversations)
    tokens = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), bool)
    for b, c in enumerate(conversations):
        tokens[b, width - len(c.ids):] = c.ids
        mask[b, width - len(c.ids):] = True
    canvas = np.concatenate([tokens, np.full((batch, gen_length), mask_id, np.int32)], axis=1)
    fields = image_inputs(canvas, conversations, max_views, image_size, tokens_per_view)
    return {"tokens": tokens, "mask": mask, **fields}
