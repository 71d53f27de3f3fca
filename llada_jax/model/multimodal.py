"""LLaDA-V glue between the vision tower and the language model.

* `Projector`: LLaVA's `mlp2x_gelu` (Linear(vision_width -> d_model), exact GELU,
  Linear(d_model -> d_model), with biases) plus the learned `image_newline` vector [d_model].
* `gather_image_tokens`: image tokens from a host-computed gather plan
  (`images.anyres_token_sources` / `images.place_token_sources`): static shapes, so one jitted
  program serves every image geometry (the eager per-image assembly it matches lives in
  tests/image_assembly_reference.py).
* `LLaDAV`: vision tower -> projector -> image tokens at the placeholders -> the LLaDA
  `Transformer` called with `inputs_embeds`.

The placeholder convention and the batch's image fields are `llada_jax.data.schema`'s
(`IMAGE_PLACEHOLDER_ID`, re-exported here, and `IMAGE_FIELDS`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.data import images as image_geometry
from llada_jax.data.schema import IMAGE_PLACEHOLDER_ID
from llada_jax.model.layers import Projection
from llada_jax.model.transformer import Transformer
from llada_jax.model.vision import VisionConfig, VisionEncoder


class Projector(nn.Module):
    """Vision features [..., vision_width] -> language-model embeddings [..., d_model].

    LLaVA's `mlp2x_gelu`: Linear, GELU (exact erf form: torch's `nn.GELU()` default), Linear.
    Also owns `image_newline` (LLaVA's `model.image_newline`), read with
    `apply(..., method=Projector.newline)` or `self.projector.newline()` from a parent module.
    """

    d_model: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self) -> None:
        def dense(name: str, in_axis: str, out_axis: str) -> Projection:
            return Projection((self.d_model,), (in_axis,), (out_axis,), dtype=self.dtype,
                              param_dtype=self.param_dtype, use_bias=True, name=name,
                              kernel_init=nn.initializers.lecun_normal())

        # Megatron-style: the first matmul's output and the second's input on `mlp` (tensor),
        # the d_model side on `embed` (fsdp), as in the language model.
        self.linear_1 = dense("linear_1", "embed", "mlp")
        self.linear_2 = dense("linear_2", "mlp", "embed")
        # LLaVA initialises it as randn(d) / sqrt(d).
        self.image_newline = self.param(
            "image_newline",
            nn.with_logical_partitioning(nn.initializers.normal(self.d_model ** -0.5), ("embed",)),
            (self.d_model,), self.param_dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        h = nn.gelu(self.linear_1(features), approximate=False)
        return self.linear_2(h)

    def newline(self) -> jax.Array:
        """The learned vector [d_model] appended after each row of tile tokens."""
        return jnp.asarray(self.image_newline, self.dtype)


# --- gather plans -------------------------------------------------------------------------------
def gather_image_tokens(view_tokens: jax.Array, index: jax.Array, weight: jax.Array,
                        is_newline: jax.Array, newline: jax.Array) -> jax.Array:
    """Image tokens from a gather plan: `sum_k weight[..., k] * view_tokens[index[..., k]]`, or
    `newline` where `is_newline`.

    view_tokens: [N, d], the projected features of all views flattened (view-major); index and
    weight: [..., 4] (from `images.anyres_token_sources`, or `images.place_token_sources` for a
    whole batch, [B, L, 4]); is_newline: [...]. Returns [..., d] in view_tokens' dtype. The four
    sources are accumulated one at a time so no [..., 4, d] intermediate is built.
    """
    if index.shape != weight.shape or index.shape[:-1] != is_newline.shape:
        raise ValueError(f"plan shapes disagree: index {index.shape}, weight {weight.shape}, "
                         f"is_newline {is_newline.shape}")
    weight = weight.astype(view_tokens.dtype)
    out = weight[..., 0, None] * view_tokens[index[..., 0]]
    for k in range(1, index.shape[-1]):
        out = out + weight[..., k, None] * view_tokens[index[..., k]]
    return jnp.where(is_newline[..., None], newline.astype(view_tokens.dtype), out)


def normalize_pixels(pixels: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] exactly as `images.normalize` computes them (a lookup
    in its 256-entry table); floating-point pixels are taken as already normalised."""
    if jnp.issubdtype(pixels.dtype, jnp.integer):
        return jnp.asarray(image_geometry.normalization_table())[pixels.astype(jnp.int32)]
    return pixels


class LLaDAV(nn.Module):
    """The LLaDA-V mask predictor: images and (noisy) text in, logits out.

    `input_ids` [B, L] hold `image_placeholder_id` at every image-token position. The image
    tokens come from `pixel_values` [B, V, H, W, 3] and the gather plan `image_sources = (index,
    weight, is_newline)`, whose indices point into the row's own V views
    (`images.place_token_sources` of one row); padding views are allowed. Pixels are uint8
    (normalised on device by `normalize_pixels`) or already-normalised floats.
    Or pass `image_embeddings` [B, L, d_model] computed once by `image_embeddings(...)` (the
    sampler does: the tower runs once, not at every step).

    Params: `vision_tower`, `projector` (with `image_newline`), `language_model`; `init` creates
    all three even when called with text only. Like `Transformer`, it knows nothing about masking
    or time: the losses must skip the image positions (`maskable` is False there).
    """

    config: ModelConfig
    vision: VisionConfig
    image_placeholder_id: int = IMAGE_PLACEHOLDER_ID

    def setup(self) -> None:
        self.vision_tower = VisionEncoder(self.vision)
        self.projector = Projector(self.config.d_model, dtype=self.config.dtype,
                                   param_dtype=self.config.param_dtype)
        self.language_model = Transformer(self.config)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """Views [..., H, W, 3] -> projected view features [..., tokens_per_view, d_model]."""
        lead = pixel_values.shape[:-3]
        flat = pixel_values.reshape((-1, *pixel_values.shape[-3:]))
        features = self.projector(self.vision_tower(normalize_pixels(flat)))
        return features.reshape(lead + features.shape[-2:])

    def image_embeddings(self, pixel_values: jax.Array,
                         image_sources: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """The image token at every position [B, L, d_model] (zeros where the plan is empty)."""
        index, weight, is_newline = image_sources
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values: expected [B, V, H, W, C], found shape "
                             f"{pixel_values.shape}")
        views = self.encode_images(pixel_values)              # [B, V, T, d]
        batch, num_views, tokens, dim = views.shape
        if index.shape[0] != batch:
            raise ValueError(f"image_sources: expected {batch} rows like pixel_values, "
                             f"found {index.shape[0]}")
        return jax.vmap(gather_image_tokens, in_axes=(0, 0, 0, 0, None))(
            views.reshape(batch, num_views * tokens, dim), index, weight, is_newline,
            self.projector.newline())

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              image_sources: tuple[jax.Array, jax.Array, jax.Array] | None = None,
              image_embeddings: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(embeddings [B, L, d_model], image_positions [B, L] bool)."""
        image_positions = input_ids == self.image_placeholder_id
        # Placeholders are looked up as the pad id (in range); image tokens overwrite those rows.
        text = self.language_model.embed(
            jnp.where(image_positions, self.config.pad_token_id, input_ids))
        if image_embeddings is None and pixel_values is not None:
            if image_sources is None:
                raise ValueError("LLaDAV: pixel_values need image_sources "
                                 "(images.place_token_sources)")
            image_embeddings = self.image_embeddings(pixel_values, image_sources)
        if image_embeddings is None:
            if self.is_initializing():
                # A text-only init still creates the tower and projector params (one dummy view
                # per row keeps the batch-sharding constraints divisible).
                dummy = (input_ids.shape[0], self.vision.image_size, self.vision.image_size,
                         self.vision.num_channels)
                self.encode_images(jnp.zeros(dummy, jnp.uint8))
            return text, image_positions
        if image_embeddings.shape != text.shape:
            raise ValueError(f"image_embeddings: expected shape {text.shape} (the tokens' "
                             f"[batch, length, d_model]), found {image_embeddings.shape}")
        return jnp.where(image_positions[..., None], image_embeddings.astype(text.dtype),
                         text), image_positions

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 image_sources: tuple[jax.Array, jax.Array, jax.Array] | None = None, *,
                 image_embeddings: jax.Array | None = None,
                 **language_model_kwargs: Any) -> Any:
        """Logits [B, L, vocab]; keyword arguments go to `Transformer` (attention_mask,
        positions, kv_cache, cache_index, return_kv, ...)."""
        embeddings, _ = self.embed(input_ids, pixel_values, image_sources, image_embeddings)
        return self.language_model(inputs_embeds=embeddings, **language_model_kwargs)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The language model's LM head (see `Transformer.logits_from_hidden`)."""
        return self.language_model.logits_from_hidden(hidden)

