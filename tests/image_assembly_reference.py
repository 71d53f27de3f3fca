"""The eager, per-image LLaDA-V image assembly: a test reference for the jitted gather plans.

Moved out of `llada_jax/model/multimodal.py` (the package uses `gather_image_tokens` with the
host-computed plans of `llada_jax.data.images`); tests compare the two paths.

* `assemble_image_tokens`: one image's projected view features -> its token sequence (AnyRes
  `anyres_max_N` + `spatial_unpad`: base view, then the unpadded, maybe downsampled tile grid
  with a newline after each row).
* `preprocess_square` / `anyres_views`: normalised float views of an image, computed eagerly.
* `splice_image_features`: writes image tokens into the token embeddings at the placeholder
  positions and returns the mask of those positions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from llada_jax.data import images as image_geometry
from llada_jax.data.schema import IMAGE_PLACEHOLDER_ID


# --- views ---------------------------------------------------------------------------------------
def preprocess_square(image: Image.Image | str | os.PathLike[str],
                      size: int = image_geometry.TILE_SIZE) -> np.ndarray:
    """One view: the whole image resized (aspect ratio not kept) to size x size -> float32
    [size, size, 3] in [-1, 1]."""
    return image_geometry.normalize(image_geometry.square_pixels(image, size))


def anyres_views(image: Image.Image | str | os.PathLike[str],
                 tile_size: int = image_geometry.TILE_SIZE,
                 max_grid: int = image_geometry.MAX_GRID) -> tuple[np.ndarray, tuple[int, int]]:
    """`anyres_pixels` normalised: (views [1 + cols * rows, tile, tile, 3] float32 in [-1, 1],
    the image's (width, height))."""
    views, size = image_geometry.anyres_pixels(image, tile_size, max_grid)
    return image_geometry.normalize(views), size


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

    The length equals that of `images.anyres_token_sources(image_size)`'s plan. Shapes depend on
    `image_size`, a Python tuple: the function jits with it static (one program per distinct
    geometry).
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
