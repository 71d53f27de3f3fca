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

One conversation becomes one row of `train.seq_len` (the LLaDA-V masked-response setup):

    tokens    <BOS> <user header> P P ... P \\nWhat...<eot> <assistant header> red <eot> <EOS> ...
    maskable    F       F         F F ... F      F      F          F          T T  T    T    T

* roles: human -> user, gpt -> assistant (system stays system); rendered with the tokenizer's
  chat format (`Tokenizer.render_turn`), BOS only at the very start;
* every literal `<image>` of the text is replaced by N copies of the placeholder id
  `multimodal.IMAGE_PLACEHOLDER_ID` (-200), N = that image's token count
  (`images.anyres_num_tokens` for AnyRes, tokens_per_view + 1 for a square view); the text around
  it is encoded piece by piece, as LLaVA's `tokenizer_image_token` does;
* `maskable` = every assistant answer (after its header, with its `<|eot_id|>`) and the EOS
  padding; the trainer noises all of them with one `t` (REFERENCE.md section 2). Image, prompt
  and header positions are never maskable;
* pixels: each image's views (`square`: one `image_size` view; `anyres_max_N`: base view then
  tiles) as uint8, stacked into `pixel_values` [max_views, S, S, 3] (zero padding views), with
  the gather plan of each image token (`images.anyres_token_sources`) laid out at its positions:
  `image_source_index` [L, 4] (row-local: into this row's views), `image_source_weight` [L, 4],
  `image_is_newline` [L] (`multimodal.IMAGE_FIELDS`).

A conversation that does not fit keeps dropping its last exchange (user turn + answer, with
their images) while another answer is left; otherwise, and for unreadable images, a wrong number
of `<image>` marks or more views than `vision.max_views`, the record is bad (`BadRecordError`,
naming the record and the file): raised or skipped by `data.bad_records` as in the text pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from llada_jax import config as config_lib
from llada_jax.data import images, sources
from llada_jax.data.chat import BadRecordError, parse_messages
from llada_jax.data.pipeline import batch_and_prefetch, handle_bad_record
from llada_jax.data.synthetic_images import ShapesDataset
from llada_jax.data.tokenizer import HFTokenizer, Tokenizer
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
    """The coloured-shapes set as LLaVA-style records (the image is a uint8 array)."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0) -> None:
        self.split = split
        self._shapes = ShapesDataset(size=image_size, num_examples=size, split=split, seed=seed)

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
    LLaVA does); any other file is read line by line (`sources.FileLinesSource`).
    """

    def __init__(self, pattern: str, image_folder: str = "") -> None:
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"config.data.source: no files match 'files:{pattern}'")
        self.image_folder = image_folder
        self._parts: list[tuple[str, Any, int]] = []   # (path, list or line source, length)
        for path in paths:
            if path.endswith(".json") and _starts_with_bracket(path):
                with open(path) as f:
                    try:
                        records = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: not valid JSON ({e})") from None
                if not isinstance(records, list):
                    raise ValueError(f"{path}: expected a JSON list of records")
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
            record = records[local]
            origin = f"{path}[{local}]"
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


def open_multimodal_source(spec: MultimodalSource, config: ml_collections.ConfigDict) -> Any:
    if spec.kind == SHAPES:
        size = config.data.synthetic_size
        if spec.argument == "test":
            size = max(size // 10, 1)
        return ShapesSource(spec.argument, size, config.vision.image_size, config.train.seed)
    return LlavaFilesSource(spec.argument, config.data.image_folder)


# --- images -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """How one image becomes views and a token plan, for a given vision config.

    max_num_tiles None: one `image_size` view (its tokens, then a newline); else AnyRes
    (`anyres_max_{max_num_tiles}` over grids up to max_grid x max_grid).
    """

    image_size: int
    patch_size: int
    max_num_tiles: int | None
    max_grid: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ImageProcessor:
        v = config.vision
        return cls(v.image_size, v.patch_size, config_lib.anyres_max_tiles(v.image_aspect_ratio),
                   v.max_grid)

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        return self.tokens_per_side ** 2

    def __call__(self, image: Image.Image | np.ndarray | str | os.PathLike[str]
                 ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(views uint8 [n, S, S, 3], plan (index [T, 4], weight [T, 4], is_newline [T]))."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image arrays must be uint8 [H, W, 3], found {image.dtype} "
                                 f"{image.shape}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            image = images.load_image(image)
        else:
            image = images.to_rgb(image)
        if self.max_num_tiles is None:
            views = images.square_pixels(image, self.image_size)[None]
            plan = images.anyres_token_sources(image.size, num_views=1,
                                               tokens_per_side=self.tokens_per_side)
            return views, plan
        views, size = images.anyres_pixels(image, self.image_size, self.max_grid)
        plan = images.anyres_token_sources(size, len(views), self.image_size, self.max_grid,
                                           self.max_num_tiles, self.tokens_per_side)
        return views, plan

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        """Image tokens of an image of (width, height) `image_size`."""
        if self.max_num_tiles is None:
            return self.tokens_per_view + 1
        return images.anyres_num_tokens(image_size, self.image_size, self.max_grid,
                                        self.max_num_tiles, self.tokens_per_side)


# --- conversations ------------------------------------------------------------------------------
def llava_messages(record: dict[str, Any]) -> list[dict]:
    """A LLaVA record's `conversations` as validated chat messages (human -> user, gpt ->
    assistant); BadRecordError naming the record for anything malformed."""
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
    parse_messages({"messages": messages, sources.ORIGIN: origin})
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_MARK in m["content"]:
            raise BadRecordError(origin, f"conversation turn {i} (gpt) holds {IMAGE_MARK}; images "
                                 f"belong in human turns")
    return messages


def record_images(record: dict[str, Any]) -> list[Any]:
    """The record's images (paths, arrays or PIL images) in order; [] for a text-only record."""
    value = record.get("image")
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def render_turn(tokenizer: Tokenizer, role: str, content: str,
                image_token_counts: Sequence[int]) -> list[int]:
    """One turn's ids with each `<image>` expanded into its count of placeholder ids.

    Without images this is exactly `tokenizer.render_turn`; with images the text pieces between
    the marks are encoded separately (a mark is a hard boundary, as in LLaVA), after the
    tokenizer's header and before its `<|eot_id|>`.
    """
    marks = content.count(IMAGE_MARK)
    if marks != len(image_token_counts):
        raise ValueError(f"a turn with {marks} {IMAGE_MARK} mark(s) got "
                         f"{len(image_token_counts)} image(s)")
    if not marks:
        return tokenizer.render_turn(role, content)
    if isinstance(tokenizer, HFTokenizer):
        content = content.strip()   # as its chat template's `| trim`
    ids = list(tokenizer.header(role))
    for k, piece in enumerate(content.split(IMAGE_MARK)):
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


def encode_conversation(messages: Sequence[dict], image_list: Sequence[Any],
                        tokenizer: Tokenizer, processor: ImageProcessor, *,
                        add_generation_prompt: bool = False, origin: str = "",
                        max_length: int | None = None) -> EncodedConversation:
    """BOS + every turn (images expanded), assistant answers maskable after their header.

    With `add_generation_prompt` the assistant header is appended (a prompt to sample from).
    `max_length`: drop trailing exchanges (with their images) while longer and another answer is
    left; BadRecordError ('overlong') if it still does not fit.
    """
    marks = [m["content"].count(IMAGE_MARK) for m in messages]
    if sum(marks) != len(image_list):
        raise BadRecordError(origin, f"the conversation has {sum(marks)} {IMAGE_MARK} mark(s) but "
                             f"the record has {len(image_list)} image(s)")
    processed = []
    for image in image_list:
        try:
            processed.append(processor(image))
        except (FileNotFoundError, ValueError) as e:
            raise BadRecordError(origin, str(e), "unreadable") from e
    counts = [plan[0].shape[0] for _, plan in processed]

    turns: list[tuple[str, list[int], list[bool], int]] = []   # (role, ids, maskable, images)
    used = 0
    for m, n in zip(messages, marks, strict=True):
        ids = render_turn(tokenizer, m["role"], m["content"], counts[used:used + n])
        mask = [False] * len(ids)
        if m["role"] == "assistant":
            header = len(tokenizer.header("assistant"))
            mask[header:] = [True] * (len(ids) - header)
        turns.append((m["role"], ids, mask, n))
        used += n
    if not add_generation_prompt:  # trailing non-answer turns are not trained on
        while turns and turns[-1][0] != "assistant":
            turns.pop()
    suffix = list(tokenizer.header("assistant")) if add_generation_prompt else []

    def length(ts):
        return 1 + sum(len(t[1]) for t in ts) + len(suffix)

    if max_length is not None:
        while length(turns) > max_length and not add_generation_prompt:
            answers = [i for i, t in enumerate(turns) if t[0] == "assistant"]
            if len(answers) < 2:
                break
            turns = turns[:answers[-2] + 1]   # drop the last exchange
        if length(turns) > max_length:
            raise BadRecordError(origin, f"conversation too long: {length(turns)} tokens "
                                 f"({sum(counts[:sum(t[3] for t in turns)])} of them image "
                                 f"tokens) for config.train.seq_len={max_length}", "overlong")
    kept_images = sum(t[3] for t in turns)
    ids = [tokenizer.bos_id] + [i for t in turns for i in t[1]] + suffix
    maskable = [False] + [b for t in turns for b in t[2]] + [False] * len(suffix)
    return EncodedConversation(ids, maskable, [v for v, _ in processed[:kept_images]],
                               [p for _, p in processed[:kept_images]])


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
    """record -> one training row (tokens, maskable, image fields), or None for a skipped record."""

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
            maskable = np.array(encoded.maskable + [True] * padding, bool)
            fields = image_inputs(tokens[None], [encoded], self.max_views,
                                  self.processor.image_size, self.processor.tokens_per_view,
                                  [origin])
        except BadRecordError as error:
            handle_bad_record(error, self.bad_records)
            return None
        row = {"tokens": tokens, "maskable": maskable}
        row.update({k: v[0] for k, v in fields.items()})
        return row


def build_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  source: str | None = None, shuffle: bool | None = None,
                  num_epochs: int | None = None, batch_size: int | None = None,
                  seed: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This host's LLaDA-V batches as a grain IterDataset (checkpointable iterator).

    Batches: `tokens` int32 [b, L], `maskable` bool [b, L] and `multimodal.IMAGE_FIELDS`, with
    b = batch_size / process_count. Defaults come from the config as in `pipeline.build_dataset`.
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
