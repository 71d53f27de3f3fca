"""LLaDA-V rows: images -> views and gather plans, conversations with images -> training rows.

The conversation itself is encoded by `llada_jax.data.chat.encode_conversation` (styles
`llava_llada` and `llada_plain`, truncation `drop_last_exchange`; the formats are described
there); this module adds the images:

* `ImageProcessor`: a record with one image is processed by `vision.image_aspect_ratio`
  (`square`: one view + a newline; `anyres_max_N`: base view then tiles); every image of a
  multi-image record gets ONE view padded to a square with the mean colour
  (`images.expand_to_square`): its tokens and one newline. Stage 1 (`llada_plain`): one
  square view of `image_size` whose tokens are merged flat (no newline token).
* `encode_conversation`: messages + images -> `EncodedConversation` (ids with placeholders,
  maskable, each kept image's views and plan).
* `image_inputs`: the `schema.IMAGE_FIELDS` of rows: pixels uint8 [B, max_views, S, S, 3] (zero
  padding views) and the gather plan of each image token (`images.anyres_token_sources`) laid
  out at its positions (row-local indices into the row's views).
* `MultimodalRows`: record -> one training row. `fill` (bool [L]) marks the EOS padding up to
  `seq_len`; in stage 2 it is never maskable, and the row also carries `segment_ids` (1 on the
  conversation, 0 on the fill) so that the trainer never attends to it either: the released
  runs train one row per device, so no padding exists. `data.label_eos_padding=True` (a
  deliberate deviation, used by the tiny preset) makes the fill maskable and attended, as in
  LLaDA's SFT. Stage 1's fill IS maskable: the released stage-1 collator pads the labels of its
  16-row batches with the pad id (EOS) rather than -100.

Unreadable, truncated or oversized images, a wrong number of `<image>` marks or more views than
`vision.max_views` make the record bad (`BadRecordError`, one line naming `file:line` and the
image path): raised or skipped by `data.bad_records` as in the text pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from llada_jax import config as config_lib
from llada_jax.data import chat, images
from llada_jax.data.bad_records import RowBuilder
from llada_jax.data.llava_format import DEFAULT_TEMPLATE, LLADA_PLAIN, ConversationTemplate
from llada_jax.data.schema import (
    IMAGE_FIELDS,
    IMAGE_MARK,
    IMAGE_PLACEHOLDER_ID,
    ORIGIN,
    BadRecordError,
)
from llada_jax.data.tokenizer import Tokenizer


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

    def __call__(self, image: Image.Image | np.ndarray | str | os.PathLike[str],
                 pad_to_square: bool = False
                 ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(views uint8 [n, S, S, 3], plan (index [T, 4], weight [T, 4], is_newline [T]))."""
        image = images.as_rgb(image)
        if pad_to_square or self.max_num_tiles is None:  # one view: its tokens, then a newline
            square = images.expand_to_square(image) if pad_to_square else image
            plan = images.anyres_token_sources((self.image_size, self.image_size), num_views=1,
                                               tokens_per_side=self.tokens_per_side)
            if not (pad_to_square or self.newline):  # stage 1's flat merge: no newline
                plan = tuple(a[:self.tokens_per_view] for a in plan)
            return images.square_pixels(square, self.image_size)[None], plan
        views, size = images.anyres_pixels(image, self.image_size, self.max_grid)
        return views, images.anyres_token_sources(size, len(views), self.image_size, self.max_grid,
                                                  self.max_num_tiles, self.tokens_per_side)

    def num_tokens(self, image_size: tuple[int, int], pad_to_square: bool = False) -> int:
        """Image tokens of an image of (width, height) `image_size`: one view's tokens (and a
        newline), or for AnyRes the base view's, then h rows of w tile tokens plus one newline
        each (h x w: the tile grid after unpadding and downsampling), as its
        `images.anyres_token_sources` plan lays them out."""
        if pad_to_square or self.max_num_tiles is None:
            return self.tokens_per_view + int(pad_to_square or self.newline)
        return len(images.anyres_token_sources(image_size, None, self.image_size, self.max_grid,
                                               self.max_num_tiles, self.tokens_per_side)[2])


# --- conversations ------------------------------------------------------------------------------
def record_images(record: dict[str, Any]) -> list[Any]:
    """The record's images (paths, arrays or PIL images) in order; [] for a text-only record.
    BadRecordError for an 'image' field of another type."""
    value = record.get("image")
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, (str, os.PathLike, np.ndarray, Image.Image)):
            raise BadRecordError(str(record.get(ORIGIN, "")),
                                 f"field 'image' must be a path or a list of paths, found "
                                 f"{value!r}"[:300])
    return items


@dataclasses.dataclass
class EncodedConversation(chat.EncodedIds):
    """`chat.EncodedIds` with the kept images' data: per image its views (uint8
    [n_views, S, S, 3]) and its gather plan."""

    views: list[np.ndarray] = dataclasses.field(default_factory=list)
    plans: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=list)

    @property
    def num_views(self) -> int:
        return sum(len(v) for v in self.views)


def encode_conversation(messages: Sequence[dict], image_list: Sequence[Any],
                        tokenizer: Tokenizer, processor: ImageProcessor, *,
                        add_generation_prompt: bool = False, origin: str = "",
                        max_length: int | None = None) -> EncodedConversation:
    """A conversation in the format of `processor.template`, with its images.

    `messages`: `{"role", "content"}` dicts (a leading system message replaces the template's
    system message). With `add_generation_prompt` the result is a prompt to sample from (see
    `chat.encode_conversation`). `max_length`: drop trailing exchanges (with their images) while
    longer and another answer is left; BadRecordError ('overlong') if it still does not fit.
    """
    template = processor.template
    marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
    if marks != len(image_list):
        raise BadRecordError(origin, f"the conversation has {marks} {IMAGE_MARK} mark(s) but "
                             f"the record has {len(image_list)} image(s)")
    processed = []
    for image in image_list:  # a multi-image record: one padded square view per image
        try:
            processed.append(processor(image, pad_to_square=len(image_list) > 1))
        except (FileNotFoundError, ValueError) as e:
            raise BadRecordError(origin, str(e), "unreadable") from e
    encoded = chat.encode_conversation(
        messages, tokenizer, style=template.format,
        image_token_counts=[plan[0].shape[0] for _, plan in processed],
        system_message=template.system_message, add_generation_prompt=add_generation_prompt,
        max_length=max_length, origin=origin)
    kept = processed[:encoded.num_images]
    return EncodedConversation(encoded.ids, encoded.maskable, encoded.num_images,
                               [v for v, _ in kept], [p for _, p in kept])


def image_inputs(tokens: np.ndarray, conversations: Sequence[EncodedConversation],
                 max_views: int, image_size: int, tokens_per_view: int,
                 origins: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The `schema.IMAGE_FIELDS` arrays of rows `tokens` [B, L] (placeholders where the
    conversations' image tokens go, in order; padding anywhere else is fine)."""
    tokens = np.asarray(tokens)
    pixels = np.zeros((len(tokens), max_views, image_size, image_size, 3), np.uint8)
    plans = []  # (index, weight, is_newline) of each row, its view indices row-local
    for b, conversation in enumerate(conversations):
        if conversation.num_views > max_views:
            raise BadRecordError(origins[b] if origins else "", f"its images need "
                                 f"{conversation.num_views} views, more than "
                                 f"config.vision.max_views={max_views}", "overlong")
        if conversation.views:
            pixels[b, :conversation.num_views] = np.concatenate(conversation.views)
        plans.append(images.place_token_sources(tokens[b:b + 1], [conversation.plans],
                                                [[len(v) for v in conversation.views]],
                                                IMAGE_PLACEHOLDER_ID, tokens_per_view))
    index, weight, newline = (np.concatenate(rows) for rows in zip(*plans, strict=True))
    return dict(zip(IMAGE_FIELDS, (pixels, index, weight, newline), strict=True))


class MultimodalRows(RowBuilder):
    """record -> one training row (tokens, maskable, fill, image fields), or None when skipped."""

    def __init__(self, tokenizer: Tokenizer, processor: ImageProcessor, seq_len: int,
                 max_views: int, bad_records: str) -> None:
        self.tokenizer, self.processor, self.seq_len = tokenizer, processor, seq_len
        self.max_views, self.bad_records = max_views, bad_records

    def row(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        origin = str(record.get(ORIGIN, ""))
        encoded = encode_conversation(chat.llava_messages(record), record_images(record),
                                      self.tokenizer, self.processor, origin=origin,
                                      max_length=self.seq_len)
        fill_labelled = self.processor.template.fill_is_labelled
        row = chat.pad_row(encoded, self.seq_len, self.tokenizer.eos_id, fill_labelled)
        fields = image_inputs(row["tokens"][None], [encoded], self.max_views,
                              self.processor.image_size, self.processor.tokens_per_view, [origin])
        if not fill_labelled:
            # The released stage-2 runs train one row per device: nothing follows a row's last
            # token. Segment 0 makes the EOS fill exactly that (never attended, noised or
            # counted); attending to it would also tell the model where every answer ends.
            row["segment_ids"] = (~row["fill"]).astype(np.int32)
        row.update({k: v[0] for k, v in fields.items()})
        return row
