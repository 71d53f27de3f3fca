"""Images for LLaDA-V: loading, resize + normalise, and AnyRes (`anyres_max_4`) tiling.

Pixel side (numpy + PIL, runs in the data pipeline): an image becomes float32 `[H, W, 3]` arrays
in [-1, 1] (`(x / 255 - 0.5) / 0.5`, bicubic resize), channels last as `VisionEncoder` takes them.

AnyRes, as LLaVA-OneVision and LLaDA-V do it (`image_aspect_ratio=anyres_max_4`,
`image_grid_pinpoints="(1x1),...,(6x6)"`, `mm_patch_merge_type=spatial_unpad`):

1. candidate resolutions are every `(i * 384, j * 384)` (width, height) for i, j in 1..6;
2. `select_best_resolution`: the candidate that keeps the most of the image's pixels when the
   image is scaled to fit inside it (its "effective resolution", capped at the original area),
   ties broken by the least wasted area;
3. the image is resized to fit that canvas (aspect ratio kept, bicubic) and centred on black;
4. the canvas is cut into 384 px tiles, row by row; the views are the whole image squashed to
   384 x 384 first, then the tiles.

Feature side (pure Python geometry here; eager jnp assembly: tests/image_assembly_reference.py):
each view gives 27 x 27 tokens. The tiles' tokens are laid out as one `rows*27 x cols*27` grid,
the rows/columns that correspond to the black padding are cut off (`unpad`), the grid is
bilinearly downsampled when `sqrt(h * w / (4 * 729)) > 1.1`, and a learned newline vector is
appended to each row. Tokens of an image = 729 (base view) + h * (w + 1).

For jitted training with static shapes, `anyres_token_sources` turns that geometry into a gather
plan (for each image token: up to 4 source tokens among the image's views and their bilinear
weights, or "newline"), and `place_token_sources` lays the plans of a batch out at the placeholder
positions; `multimodal.gather_image_tokens` then builds every image token with one gather.

Sizes are `(width, height)` everywhere, as PIL's `Image.size` and the reference code have them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

TILE_SIZE = 384           # SigLIP so400m/14 input size
TOKENS_PER_SIDE = 27      # 384 / 14
MAX_GRID = 6              # "(1x1),...,(6x6)"
MAX_NUM_TILES = 4         # the 4 of "anyres_max_4"
# How far above MAX_NUM_TILES * 729 tokens (in the square root of the ratio) the tile grid may go
# before it is downsampled: `times = sqrt(h * w / (4 * 729)); if times > 1.1: downsample`.
DOWNSAMPLE_THRESHOLD = 1.1
IMAGE_MEAN = (0.5, 0.5, 0.5)   # per channel; the std is 0.5 too (`normalize`)
# The background LLaDA-V pads multi-image views to a square with: the image mean in 8 bits,
# `tuple(int(x * 255) for x in image_mean)` = (127, 127, 127).
PAD_BACKGROUND = tuple(int(m * 255) for m in IMAGE_MEAN)

# Modes `convert("RGB")` maps to 8-bit RGB without guessing a value range. 16-bit and float
# images ("I", "I;16", "F", ...) would be clipped to 0..255 silently, so they are refused.
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                                "CMYK", "YCbCr", "LAB", "HSV"})


# --- loading ------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Opens and fully decodes an image file as RGB (alpha dropped, as LLaDA-V's loader does).

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything
    that is not a decodable, non-empty image with a convertible mode, including truncated data
    and images larger than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS` x 2).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"image path is not a regular file: {path}")
    try:
        with Image.open(path) as image:
            image.load()     # decode now: a truncated file must fail here, not later
            rgb = to_rgb(image, source=path)
            # Closing the file releases the decoded data of `image` too: keep a copy.
            return rgb.copy() if rgb is image else rgb
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {path}: not a recognised image format") from e
    except Image.DecompressionBombError as e:   # not an OSError: would escape as a traceback
        raise ValueError(f"cannot read image {path}: too large to decode safely ({e})") from e
    except (OSError, SyntaxError) as e:   # truncated or corrupt data; PIL uses both
        raise ValueError(f"cannot read image {path}: {e}") from e


def to_rgb(image: Image.Image, source: str = "<image>") -> Image.Image:
    """Checks an image (non-zero size, convertible mode) and returns it as RGB."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image {source} has zero size ({width}x{height})")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"image {source} has unsupported mode {image.mode!r} (16-bit or "
                         f"float data); convert it to 8-bit RGB first")
    return image if image.mode == "RGB" else image.convert("RGB")


def as_rgb(image: Image.Image | np.ndarray | str | os.PathLike[str]) -> Image.Image:
    """A file path (`load_image`), a PIL image (`to_rgb`) or a uint8 [H, W, 3] array -> RGB."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image arrays must be uint8 [H, W, 3], found {image.dtype} "
                             f"{image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise ValueError(f"an image must be a file path, a PIL image or a uint8 array, found "
                     f"{type(image).__name__}")


# --- pixels -------------------------------------------------------------------------------------
def normalize(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image (or uint8 array) -> float32 in [-1, 1]: (x / 255 - mean) / std, mean = std = 0.5.

    Rescaling in float64 then normalising in float32, as transformers' `rescale`/`normalize`.
    """
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def normalization_table() -> np.ndarray:
    """float32 [256]: `normalize` of every uint8 value. Pixels travel to the devices as uint8
    (4x less than float32) and become `table[pixels]` there, bit-identical to `normalize`."""
    return normalize(np.arange(256, dtype=np.uint8))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize to (width, height); PIL returns a copy when the size already matches."""
    return image.resize(size, Image.Resampling.BICUBIC)


def square_pixels(image: Image.Image | str | os.PathLike[str], size: int = TILE_SIZE) -> np.ndarray:
    """One view: the whole image resized (aspect ratio not kept) to size x size -> uint8
    [size, size, 3]."""
    return np.asarray(resize(as_rgb(image), (size, size)), dtype=np.uint8)


def expand_to_square(image: Image.Image) -> Image.Image:
    """The image centred on a square canvas of its longer side filled with `PAD_BACKGROUND`
    (LLaDA-V's `expand2square`: offset `(long - short) // 2`); a square image is returned as is."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), PAD_BACKGROUND)
    canvas.paste(image, (0, (width - height) // 2) if width > height else
                 ((height - width) // 2, 0))
    return canvas


# --- AnyRes geometry (pure Python) --------------------------------------------------------------
def grid_resolutions(tile_size: int = TILE_SIZE, max_grid: int = MAX_GRID) -> list[tuple[int, int]]:
    """Candidate canvases (width, height) = (i * tile, j * tile), i outer, j inner, 1..max_grid.

    The order is that of the reference's expansion of "(1x1),...,(6x6)"; it only matters for exact
    ties of both criteria of `select_best_resolution`, where the first candidate wins.
    """
    return [(i * tile_size, j * tile_size)
            for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]


def select_best_resolution(image_size: tuple[int, int],
                           resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (width, height) that keeps most of the image, then wastes least.

    For each candidate the image is scaled by `s = min(W / w, H / h)`; its effective resolution
    is `min(int(w * s) * int(h * s), w * h)` and the waste `W * H - effective`. The first
    candidate with the largest effective resolution and, among those, the smallest waste wins.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, found {image_size}")
    best, best_effective, best_waste = None, 0, math.inf
    for cand_w, cand_h in resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    if best is None:
        raise ValueError(f"no candidate resolution for image size {image_size}: {resolutions}")
    return best


def anyres_grid_shape(image_size: tuple[int, int], tile_size: int = TILE_SIZE,
                      max_grid: int = MAX_GRID) -> tuple[int, int]:
    """(columns, rows) of tiles chosen for an image of `image_size` (width, height)."""
    w, h = select_best_resolution(image_size, grid_resolutions(tile_size, max_grid))
    return w // tile_size, h // tile_size


def resized_size_in_canvas(image_size: tuple[int, int],
                           canvas: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the image once resized to fit the canvas, aspect ratio kept.

    The side that limits the scale fills the canvas; the other is `ceil(side * scale)`, capped.
    """
    width, height = image_size
    canvas_w, canvas_h = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return canvas_w, min(math.ceil(height * scale_w), canvas_h)
    return min(math.ceil(width * scale_h), canvas_w), canvas_h


def unpad_crop(image_size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row_start, row_stop, col_start, col_stop) of the tokens of a `grid_hw` token grid that
    cover the image rather than the padding (the reference's `unpad_image`).

    The original aspect ratio is compared with the grid's: a wider image was padded at the top
    and bottom, otherwise at the sides; the kept extent is `int(side * scale)` and the same
    number of tokens, `(extent - kept) // 2`, is cut from both ends (so an odd remainder keeps
    one token more than `kept`).
    """
    width, height = image_size
    grid_h, grid_w = grid_hw
    if width / height > grid_w / grid_h:
        kept = int(height * (grid_w / width))
        pad = (grid_h - kept) // 2
        return pad, grid_h - pad, 0, grid_w
    kept = int(width * (grid_h / height))
    pad = (grid_w - kept) // 2
    return 0, grid_h, pad, grid_w - pad


def downsampled_shape(grid_hw: tuple[int, int], max_num_tiles: int = MAX_NUM_TILES,
                      tokens_per_side: int = TOKENS_PER_SIDE) -> tuple[int, int] | None:
    """Target (h, w) of the bilinear downsampling of an unpadded grid, or None if none is done.

    `times = sqrt(h * w / (max_num_tiles * tokens_per_side**2))`; when `times > 1.1` the grid
    becomes `(int(h // times), int(w // times))`.
    """
    h, w = grid_hw
    times = math.sqrt(h * w / (max_num_tiles * tokens_per_side ** 2))
    if times > DOWNSAMPLE_THRESHOLD:
        return int(h // times), int(w // times)
    return None


def bilinear_sources(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, weight of high) along one axis for torch's
    `interpolate(mode="bilinear", align_corners=False)` (no antialiasing) from n_in to n_out.

    torch computes, for float32 tensors, a float32 scale and `scale * (i + 0.5) - 0.5` as one
    fused multiply-add rounded once to float32; the float64 product below is exact, so rounding
    it to float32 reproduces those source positions bit for bit (a float32 multiply then subtract
    is off by an ulp at some positions). Negative positions clamp to 0.
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, n_in - 1).astype(np.int32)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


# --- AnyRes pixels ------------------------------------------------------------------------------
def anyres_pixels(image: Image.Image | str | os.PathLike[str], tile_size: int = TILE_SIZE,
                  max_grid: int = MAX_GRID) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> (views uint8 [1 + cols * rows, tile, tile, 3], its (width, height)).

    View 0 is the whole image resized to tile x tile; then the tiles of the canvas (the image
    resized to fit it, aspect ratio kept, centred on black), row by row, left to right. Keep the
    returned size: the feature side needs it to unpad.
    """
    rgb = as_rgb(image)
    canvas = select_best_resolution(rgb.size, grid_resolutions(tile_size, max_grid))
    new_w, new_h = resized_size_in_canvas(rgb.size, canvas)
    padded = Image.new("RGB", canvas, (0, 0, 0))
    padded.paste(resize(rgb, (new_w, new_h)), ((canvas[0] - new_w) // 2, (canvas[1] - new_h) // 2))
    tiles = [padded.crop((x, y, x + tile_size, y + tile_size))
             for y in range(0, canvas[1], tile_size) for x in range(0, canvas[0], tile_size)]
    views = [resize(rgb, (tile_size, tile_size)), *tiles]
    return np.stack([np.asarray(v, dtype=np.uint8) for v in views]), rgb.size


# --- gather plans (static shapes for jit) -------------------------------------------------------
def anyres_token_sources(image_size: tuple[int, int], num_views: int | None = None,
                         tile_size: int = TILE_SIZE, max_grid: int = MAX_GRID,
                         max_num_tiles: int = MAX_NUM_TILES,
                         tokens_per_side: int = TOKENS_PER_SIDE
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How each token of one image is made from its view tokens: (index [T, 4] int32,
    weight [T, 4] float32, is_newline [T] bool), T = the image's token count.

    Token t is `sum_k weight[t, k] * views_flat[index[t, k]]` where `views_flat` is the image's
    view features flattened to [num_views * tokens_per_side**2, d] (base view first), or the
    newline vector when `is_newline[t]`. The same tokens as the eager assembly of
    tests/image_assembly_reference.py, as a table the host computes once, so the device does one
    gather whatever the geometry.
    num_views: 1 for a plain (non-AnyRes) image (its tokens then one newline); default AnyRes.
    """
    per_view = tokens_per_side ** 2
    # The base view (view 0): token t is its token t, weight 1; then the newline of a plain image.
    base_index = np.zeros((per_view + 1, 4), np.int32)
    base_weight = np.zeros((per_view + 1, 4), np.float32)
    base_index[:per_view, 0], base_weight[:per_view, 0] = np.arange(per_view), 1
    base_newline = np.arange(per_view + 1) == per_view
    if num_views == 1:
        return base_index, base_weight, base_newline
    cols, rows = anyres_grid_shape(image_size, tile_size, max_grid)
    if num_views is not None and num_views != 1 + cols * rows:
        raise ValueError(f"an image of size {tuple(image_size)} has a {cols}x{rows} tile grid, so "
                         f"1 + {cols * rows} views, not {num_views}")
    r0, r1, c0, c1 = unpad_crop(image_size, (rows * tokens_per_side, cols * tokens_per_side))
    h, w = r1 - r0, c1 - c0
    target = downsampled_shape((h, w), max_num_tiles, tokens_per_side)
    if target is None:      # identity "interpolation": one source with weight 1
        h_out, w_out = h, w
        y_lo = y_hi = np.arange(h, dtype=np.int32)
        x_lo = x_hi = np.arange(w, dtype=np.int32)
        wy, wx = np.zeros(h, np.float32), np.zeros(w, np.float32)
    else:
        h_out, w_out = target
        y_lo, y_hi, wy = bilinear_sources(h, h_out)
        x_lo, x_hi, wx = bilinear_sources(w, w_out)

    def flat(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Index in views_flat of unpadded-grid cell (y, x) (broadcast)."""
        gy, gx = y + r0, x + c0                  # cell of the full tile grid
        tile = (gy // tokens_per_side) * cols + gx // tokens_per_side
        inner = (gy % tokens_per_side) * tokens_per_side + gx % tokens_per_side
        return (1 + tile) * per_view + inner

    y_lo, y_hi, x_lo, x_hi = y_lo[:, None], y_hi[:, None], x_lo[None, :], x_hi[None, :]
    a, b = wy[:, None], wx[None, :]
    grid_index = np.stack([flat(y_lo, x_lo), flat(y_lo, x_hi), flat(y_hi, x_lo), flat(y_hi, x_hi)],
                          axis=-1)                                    # [h_out, w_out, 4]
    grid_weight = np.stack([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b], axis=-1)
    # Append the newline column: [h_out, w_out + 1, 4].
    grid_index = np.concatenate([grid_index, np.zeros((h_out, 1, 4), grid_index.dtype)], axis=1)
    grid_weight = np.concatenate([grid_weight, np.zeros((h_out, 1, 4), grid_weight.dtype)], axis=1)
    grid_newline = np.tile(np.arange(w_out + 1) == w_out, h_out)   # the last column, per row
    index = np.concatenate([base_index[:per_view], grid_index.reshape(-1, 4)]).astype(np.int32)
    weight = np.concatenate([base_weight[:per_view], grid_weight.reshape(-1, 4)]).astype(np.float32)
    newline = np.concatenate([base_newline[:per_view], grid_newline])
    return index, weight, newline


def place_token_sources(input_ids: np.ndarray, plans: Sequence[Sequence[tuple[np.ndarray, ...]]],
                        views_per_image: Sequence[Sequence[int]], placeholder_id: int,
                        tokens_per_view: int = TOKENS_PER_SIDE ** 2
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lays a batch's per-image plans out at its placeholder positions (host side, numpy).

    input_ids: [B, L]; plans[b]: the `anyres_token_sources` of row b's images in order;
    views_per_image[b]: how many views each of them has. The views of the whole batch are
    expected stacked in the same reading order (row 0's images, then row 1's ...) and flattened
    to [num_views_total * tokens_per_view, d], so each plan's indices are offset by the tokens of
    the views before it. Returns (index [B, L, 4] int32, weight [B, L, 4]
    float32, is_newline [B, L] bool), zero off the placeholders. Raises ValueError naming the
    row when its placeholder count differs from its images' token count.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    if len(plans) != batch or len(views_per_image) != batch:
        raise ValueError(f"plans and views_per_image need one entry per row ({batch}), found "
                         f"{len(plans)} and {len(views_per_image)}")
    index = np.zeros((batch, length, 4), np.int32)
    weight = np.zeros((batch, length, 4), np.float32)
    newline = np.zeros((batch, length), bool)
    view_offset = 0
    for b in range(batch):
        if len(plans[b]) != len(views_per_image[b]):
            raise ValueError(f"row {b}: {len(plans[b])} plans but {len(views_per_image[b])} "
                             "view counts")
        positions = np.nonzero(input_ids[b] == placeholder_id)[0]
        tokens = sum(p[0].shape[0] for p in plans[b])
        if positions.size != tokens:
            raise ValueError(f"row {b} has {positions.size} image placeholder positions (id "
                             f"{placeholder_id}) but its images make {tokens} tokens")
        start = 0
        for (p_index, p_weight, p_newline), views in zip(plans[b], views_per_image[b],
                                                         strict=True):
            at = positions[start:start + p_index.shape[0]]
            index[b, at] = p_index + view_offset * tokens_per_view
            weight[b, at] = p_weight
            newline[b, at] = p_newline
            start += p_index.shape[0]
            view_offset += views
    return index, weight, newline
