"""What flows through the data layer: record fields, batch fields and their dtypes, image fields.

Records (what a source yields, `llada_jax.data.sources`) are dicts; every one carries `ORIGIN`
("path:line", "tfds:NAME@SPLIT[i]", "synthetic_chat@train[i]", ...) so that an error can name
it, and a record that could not even be read carries `ERROR` (why) instead of its fields.

Batches (what `llada_jax.data.pipeline.build_dataset` yields, host-local numpy arrays [B, L]):

    tokens               int32   every batch
    maskable             bool    the positions the loss may noise (SFT: answers; pack: documents)
    fill                 bool    conversations: the EOS padding up to seq_len (a suffix)
    segment_ids          int32   pack / LLaDA-V stage 2: 1, 2, ... per segment, 0 on padding
  and with images (LLaDA-V), `IMAGE_FIELDS`:
    pixel_values         uint8   [B, V, H, W, 3]  each row's views (base view, tiles; zero padding)
    image_source_index   int32   [B, L, 4]        the gather plan of `images.anyres_token_sources`:
    image_source_weight  float32 [B, L, 4]        indices into the row's own views flattened to
    image_is_newline     bool    [B, L]           [V * tokens_per_view] (row-local: shards with B)

Image positions hold `IMAGE_PLACEHOLDER_ID` (-200, LLaVA's IMAGE_TOKEN_INDEX): an id outside any
vocabulary, so it never collides with text and needs no `<image>` token in the tokenizer. A
conversation's literal `IMAGE_MARK` becomes N placeholders, N the image's token count; images
fill the placeholders in order (row by row for a batch). Model, training and sampling import
these names from here.
"""

from __future__ import annotations

ORIGIN = "_origin"     # record field: where the record came from
ERROR = "_error"       # record field: why the record could not be read (malformed JSON, ...)

IMAGE_PLACEHOLDER_ID = -200   # LLaVA's IMAGE_TOKEN_INDEX
IMAGE_MARK = "<image>"        # where an image goes in a conversation's text
IMAGE_FIELDS = ("pixel_values", "image_source_index", "image_source_weight", "image_is_newline")


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
