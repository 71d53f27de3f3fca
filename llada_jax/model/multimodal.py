"""LLaDA-V glue between the vision tower and the language model.

* `Projector`: LLaVA's `mlp2x_gelu` (Linear(vision_width -> d_model), exact GELU,
  Linear(d_model -> d_model), with biases) plus the learned `image_newline` vector [d_model].
* `assemble_image_tokens`: one image's projected view features -> its token sequence
  (AnyRes `anyres_max_N` + `spatial_unpad`: base view, then the unpadded, maybe downsampled tile
  grid with a newline after each row). Geometry comes from `llada_jax/data/images.py`, so the data
  side and this function agree on the number of tokens (`images.anyres_num_tokens`).
* `gather_image_tokens`: the same tokens from a host-computed gather plan
  (`images.anyres_token_sources` / `images.place_token_sources`): static shapes, so one jitted
  program serves every image geometry. This is what `LLaDAV` uses.
* `splice_image_features`: writes image tokens into the token embeddings at the placeholder
  positions and returns the mask of those positions (never masked, never scored).
* `LLaDAV`: vision tower -> projector -> image tokens at the placeholders -> the LLaDA
  `Transformer` called with `inputs_embeds`.

Two equivalent paths from view features to embeddings: eager/per image, `assemble_image_tokens`
then `splice_image_features`; jitted/batched, `gather_image_tokens` with a plan laid out at the
placeholder positions (the test checks they agree).

Placeholder convention (the one used everywhere: data, training, sampling): the text's literal
`<image>` marks are expanded into exactly N copies of `IMAGE_PLACEHOLDER_ID` = -200, N being that
image's token count (`llada_jax/data/multimodal_data.py`); images fill the placeholders in order
(row by row for a batch). -200 is LLaVA's `IMAGE_TOKEN_INDEX`: an id outside any vocabulary, so it
can never collide with text, and it needs no `<image>` token in the tokenizer (the released
LLaDA tokenizer has none; `Tokenizer.image_id` is not used for this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.data import images as image_geometry
from llada_jax.model.transformer import Transformer
from llada_jax.model.vision import VisionConfig, VisionEncoder

IMAGE_PLACEHOLDER_ID = -200   # LLaVA's IMAGE_TOKEN_INDEX


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
        def dense(name: str, axes: tuple[str, str]) -> nn.Dense:
            return nn.Dense(
                self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                name=name)

        # Megatron-style: the first matmul's output and the second's input on `mlp` (tensor),
        # the d_model side on `embed` (fsdp), as in the language model.
        self.linear_1 = dense("linear_1", ("embed", "mlp"))
        self.linear_2 = dense("linear_2", ("mlp", "embed"))
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


# --- one image's tokens -------------------------------------------------------------------------
def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[h, w, d] -> [size[0], size[1], d] like torch's bilinear `interpolate` (align_corners=False,
    no antialias). `jax.image.resize` antialiases when shrinking, which the reference does not."""
    lo, hi, frac = image_geometry.bilinear_sources(x.shape[0], size[0])
    f = jnp.asarray(frac, x.dtype)[:, None, None]
    x = x[lo] * (1 - f) + x[hi] * f
    lo, hi, frac = image_geometry.bilinear_sources(x.shape[1], size[1])
    f = jnp.asarray(frac, x.dtype)[None, :, None]
    return x[:, lo] * (1 - f) + x[:, hi] * f


def assemble_image_tokens(
        view_features: jax.Array, image_size: tuple[int, int], newline: jax.Array, *,
        tile_size: int = image_geometry.TILE_SIZE, max_grid: int = image_geometry.MAX_GRID,
        max_num_tiles: int = image_geometry.MAX_NUM_TILES) -> jax.Array:
    """One image's projected features -> its token sequence [num_tokens, d].

    view_features: [num_views, t * t, d], the base view first then the tiles row by row (the
    order of `images.anyres_views`); image_size: the original (width, height); newline: [d].

    * one view (a plain, non-AnyRes image): its t * t tokens then one newline;
    * AnyRes: the base view's t * t tokens, then the tiles' grid `[rows * t, cols * t]` cut to the
      image (`images.unpad_crop`), bilinearly downsampled when too large
      (`images.downsampled_shape`), with `newline` appended to each row, flattened row-major.

    The length equals `images.anyres_num_tokens(image_size)`. Shapes depend on `image_size`, a
    Python tuple: the function jits with it static (one program per distinct geometry).
    """
    num_views, tokens, dim = view_features.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"view_features: expected a square number of tokens per view, "
                         f"found {tokens}")
    if newline.shape != (dim,):
        raise ValueError(f"newline: expected shape ({dim},), found {tuple(newline.shape)}")
    newline = newline.astype(view_features.dtype)
    if num_views == 1:
        return jnp.concatenate([view_features[0], newline[None]], axis=0)

    cols, rows = image_geometry.anyres_grid_shape(image_size, tile_size, max_grid)
    if num_views != 1 + cols * rows:
        raise ValueError(f"view_features: an image of size {tuple(image_size)} has a {cols}x{rows} "
                         f"tile grid, so 1 + {cols * rows} views are expected, found {num_views}")
    grid = view_features[1:].reshape(rows, cols, side, side, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    r0, r1, c0, c1 = image_geometry.unpad_crop(image_size, (rows * side, cols * side))
    grid = grid[r0:r1, c0:c1]
    target = image_geometry.downsampled_shape(grid.shape[:2], max_num_tiles, side)
    if target is not None:
        grid = bilinear_resize(grid, target)
    h, w = grid.shape[:2]
    grid = jnp.concatenate([grid, jnp.broadcast_to(newline, (h, 1, dim))], axis=1)
    return jnp.concatenate([view_features[0], grid.reshape(h * (w + 1), dim)], axis=0)


# --- splicing into the text ---------------------------------------------------------------------
def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def text_ids_for_embedding(input_ids: jax.Array, placeholder_id: int = IMAGE_PLACEHOLDER_ID,
                           fill_id: int = 0) -> jax.Array:
    """input_ids with placeholders swapped for `fill_id`, so the text embedding lookup stays in
    range; the rows it produces there are overwritten by `splice_image_features`."""
    return jnp.where(input_ids == placeholder_id, fill_id, input_ids)


def splice_image_features(
        input_ids: jax.Array, embeddings: jax.Array,
        image_features: jax.Array | Sequence[jax.Array],
        placeholder_id: int = IMAGE_PLACEHOLDER_ID,
        feature_counts: jax.Array | Sequence[int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Writes image tokens at the placeholder positions of the embeddings.

    input_ids: [B, L] with `placeholder_id` at every image-token position.
    embeddings: [B, L, D], the text embeddings (whatever they hold at placeholders is replaced).
    image_features, one of:
      * [N_total, D]: all images of the batch, concatenated in reading order (row 0's images in
        order of position, then row 1's, ...). The k-th placeholder of the batch (row-major) gets
        row k. Convenient when images have different token counts (AnyRes).
      * a sequence of [n_i, D] arrays, one per image in that same order: concatenated to the above.
      * [B, N, D]: per row; the k-th placeholder of row b gets `image_features[b, k]`. Rows may be
        padded at the end when `feature_counts` [B] says how many are real.
    Returns (embeddings [B, L, D] in the embeddings' dtype, image_positions [B, L] bool).

    Counts are checked when `input_ids` is concrete (not traced): placeholders must equal the
    number of feature rows (or `feature_counts`), else ValueError. Under `jax.jit` the function
    is a gather plus a select with static shapes; there it cannot check, and a row with more
    placeholders than features repeats the last feature (indices are clipped).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, length], found shape {input_ids.shape}")
    batch, length = input_ids.shape
    if embeddings.shape[:2] != (batch, length) or embeddings.ndim != 3:
        raise ValueError(f"embeddings: expected [{batch}, {length}, D], found {embeddings.shape}")
    if not isinstance(image_features, (jax.Array, np.ndarray)):
        image_features = list(image_features)
        if not image_features:
            raise ValueError("image_features: an empty sequence of images")
        image_features = jnp.concatenate([jnp.asarray(f) for f in image_features], axis=0)
    image_features = jnp.asarray(image_features)
    dim = embeddings.shape[-1]
    if image_features.shape[-1] != dim or image_features.ndim not in (2, 3):
        raise ValueError(f"image_features: expected [N, {dim}] or [{batch}, N, {dim}], found "
                         f"{image_features.shape}")
    image_positions = input_ids == placeholder_id
    features = image_features.astype(embeddings.dtype)

    if image_features.ndim == 2:
        total = image_features.shape[0]
        if _is_concrete(input_ids):
            found = int(np.asarray(image_positions).sum())
            if found != total:
                raise ValueError(f"the batch has {found} image placeholder positions (id "
                                 f"{placeholder_id}) but {total} image feature rows were given")
        index = jnp.cumsum(image_positions.reshape(-1)) - 1
        gathered = features[jnp.clip(index, 0, total - 1)].reshape(batch, length, dim)
    else:
        if image_features.shape[0] != batch:
            raise ValueError(f"image_features: expected {batch} rows (the batch), found "
                             f"{image_features.shape[0]}")
        per_row = image_features.shape[1]
        if _is_concrete(input_ids):
            found = np.asarray(image_positions).sum(axis=1)
            expected = (np.full(batch, per_row) if feature_counts is None
                        else np.asarray(feature_counts))
            if expected.shape != (batch,) or (expected > per_row).any():
                raise ValueError(f"feature_counts: expected {batch} counts of at most "
                                 f"{per_row}, found {expected.tolist()}")
            bad = np.nonzero(found != expected)[0]
            if bad.size:
                b = int(bad[0])
                raise ValueError(f"row {b} has {int(found[b])} image placeholder positions (id "
                                 f"{placeholder_id}) but {int(expected[b])} image feature rows")
        index = jnp.clip(jnp.cumsum(image_positions, axis=1) - 1, 0, per_row - 1)
        gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(image_positions[..., None], gathered, embeddings), image_positions


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


# The fields a LLaDA-V batch adds to `tokens` / `maskable` (llada_jax/data/multimodal_data.py):
#   pixel_values         uint8 [B, V, H, W, 3]  each row's views (base view, tiles; zero padding)
#   image_source_index   int32 [B, L, 4]        the gather plan of `images.anyres_token_sources`,
#   image_source_weight  float32 [B, L, 4]      indices into the row's own views flattened to
#   image_is_newline     bool [B, L]            [V * tokens_per_view] (row-local: shards with B)
IMAGE_FIELDS = ("pixel_values", "image_source_index", "image_source_weight", "image_is_newline")


class LLaDAV(nn.Module):
    """The LLaDA-V mask predictor: images and (noisy) text in, logits out.

    `input_ids` [B, L] hold `image_placeholder_id` at every image-token position. The image
    tokens come from `pixel_values` and the gather plan `image_sources = (index, weight,
    is_newline)`, in one of two layouts:
      * per row (what training batches use): pixel_values [B, V, H, W, 3], plan indices into the
        row's own V views (`images.place_token_sources` of one row); padding views are allowed;
      * flat: pixel_values [V, H, W, 3], all views of the batch in reading order, plan indices
        into all of them (`images.place_token_sources` of the whole batch).
    Pixels are uint8 (normalised on device by `normalize_pixels`) or already-normalised floats.
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
        views = self.encode_images(pixel_values)
        newline = self.projector.newline()
        if pixel_values.ndim == 5:              # per row: [B, V, T, d], row-local indices
            batch, num_views, tokens, dim = views.shape
            if index.shape[0] != batch:
                raise ValueError(f"image_sources: expected {batch} rows like pixel_values, "
                                 f"found {index.shape[0]}")
            return jax.vmap(gather_image_tokens, in_axes=(0, 0, 0, 0, None))(
                views.reshape(batch, num_views * tokens, dim), index, weight, is_newline, newline)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values: expected [B, V, H, W, C] or [V, H, W, C], found "
                             f"shape {pixel_values.shape}")
        return gather_image_tokens(views.reshape(-1, views.shape[-1]), index, weight, is_newline,
                                   newline)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              image_sources: tuple[jax.Array, jax.Array, jax.Array] | None = None,
              image_embeddings: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(embeddings [B, L, d_model], image_positions [B, L] bool)."""
        image_positions = input_ids == self.image_placeholder_id
        text = self.language_model.embed(
            text_ids_for_embedding(input_ids, self.image_placeholder_id, self.config.pad_token_id))
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


def image_conditioned_forward(model: LLaDAV, params: Any,
                              images: Sequence[jax.Array]) -> Any:
    """The sampler's `forward` for a LLaDA-V model, with the images fixed.

    images: `(pixel_values [B, V, H, W, 3], index [B, L, 4], weight [B, L, 4], is_newline
    [B, L])` over the whole sampling canvas of length L. The vision tower and projector run HERE,
    once; every call of the returned `forward(tokens [R, Lw], **Transformer kwargs)` embeds the
    current tokens and splices the stored image tokens of its window (`cache_index` is the
    window's start) at the placeholder positions. R may be a multiple of B (the sampler's CFG
    twins): rows are repeated, and a twin whose placeholders were replaced by the mask id gets
    no image, which is what classifier-free guidance's unconditional prompt means.
    """
    pixel_values, *sources = images
    variables = {"params": params}
    embeddings = model.apply(variables, pixel_values, tuple(sources),
                             method=LLaDAV.image_embeddings)          # [B, L, d_model]

    def forward(tokens: jax.Array, *, cache_index: Any = None, **kwargs: Any) -> Any:
        rows, width = tokens.shape
        start = 0 if cache_index is None else cache_index
        window = jax.lax.dynamic_slice_in_dim(embeddings, start, width, axis=1)
        if rows != window.shape[0]:
            window = jnp.repeat(window, rows // window.shape[0], axis=0)
        return model.apply(variables, tokens, image_embeddings=window, cache_index=cache_index,
                           **kwargs)

    return forward
