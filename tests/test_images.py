"""Image loading, normalisation and AnyRes geometry (llada_jax/data/images.py).

The AnyRes numbers are worked out by hand from the rules of LLaVA-OneVision / LLaDA-V
(`anyres_max_4`, grid "(1x1),...,(6x6)" of 384 px tiles, `spatial_unpad`), the arithmetic in the
comments; none is taken from the implementation's output.
"""

import os

import numpy as np
import pytest
from PIL import Image

from llada_jax.data import images
from tests import image_assembly_reference as eager

# (width, height), canvas, (cols, rows), unpadded grid (h, w), final grid (h, w), tokens.
# Tokens = 27*27 (base view) + h * (w + 1) (one newline per row).
ANYRES_TABLE = [
    # 384x384: every canvas holds the whole image (scale >= 1, effective = 147456 for all), so
    # the least waste wins: (384, 384), waste 0 -> 1x1. Grid 27x27; aspect 1 == 27/27 so the
    # "pad at the sides" branch: kept = int(384 * 27/384) = 27, pad 0. times = sqrt(729/2916)
    # = 0.5 <= 1.1. Tokens 729 + 27*28 = 1485.
    ((384, 384), (384, 384), (1, 1), (27, 27), (27, 27), 1485),
    # 1000x500 (area 500000): only canvases with W >= 1000 and H >= 500 keep everything (a
    # scale < 1 keeps < 500000); the smallest is (1152, 768), waste 884736 - 500000 -> 3x2.
    # Grid 54x81; aspect 2.0 > 81/54 = 1.5 so padded at top/bottom: kept = int(500 * 81/1000)
    # = int(40.5) = 40, pad (54 - 40)//2 = 7 -> rows 7..47 = 40. times = sqrt(40*81/2916)
    # = sqrt(1.111) = 1.054 <= 1.1, no downsampling (although 3240 > 1.1 * 2916 = 3207.6).
    # Tokens 729 + 40*82 = 4009.
    ((1000, 500), (1152, 768), (3, 2), (40, 81), (40, 81), 4009),
    # 500x1000: the transpose: canvas (768, 1152) -> 2x3, grid 81x54; aspect 0.5 < 54/81 so
    # padded at the sides: kept = int(500 * 81/1000) = 40, pad 7 -> cols 7..47. Tokens
    # 729 + 81*41 = 4050.
    ((500, 1000), (768, 1152), (2, 3), (81, 40), (81, 40), 4050),
    # 640x480 (area 307200): W >= 640 and H >= 480 -> smallest (768, 768) -> 2x2. Grid 54x54;
    # aspect 1.333 > 1: kept = int(480 * 54/640) = int(40.5) = 40, pad 7. times = sqrt(2160/2916)
    # < 1. Tokens 729 + 40*55 = 2929.
    ((640, 480), (768, 768), (2, 2), (40, 54), (40, 54), 2929),
    # 100x50: every canvas holds it; least waste (384, 384) -> 1x1. Grid 27x27; aspect 2 > 1:
    # kept = int(50 * 27/100) = int(13.5) = 13, pad (27-13)//2 = 7 -> rows 7..20 = 13.
    # Tokens 729 + 13*28 = 1093.
    ((100, 50), (384, 384), (1, 1), (13, 27), (13, 27), 1093),
    # 2304x2304: only (2304, 2304) keeps everything -> 6x6. Grid 162x162, kept =
    # int(2304 * 162/2304) = 162. times = sqrt(26244/2916) = sqrt(9) = 3 > 1.1 -> downsample to
    # (162 // 3, 162 // 3) = (54, 54). Tokens 729 + 54*55 = 3699.
    ((2304, 2304), (2304, 2304), (6, 6), (162, 162), (54, 54), 3699),
    # 4608x4608: larger than every canvas; the scale min(W, H)/4608 is largest (0.5) only for
    # (2304, 2304): effective 2304*2304 -> 6x6 and then as above (kept = int(4608 * 162/4608)).
    ((4608, 4608), (2304, 2304), (6, 6), (162, 162), (54, 54), 3699),
    # 2304x1152: (2304, 1152) keeps everything with no waste -> 6x3. Grid 81x162; aspect 2 ==
    # 162/81: sides branch, kept = int(2304 * 81/1152) = 162. times = sqrt(13122/2916) =
    # sqrt(4.5) = 2.1213 -> (int(81 // 2.1213), int(162 // 2.1213)) = (38, 76).
    # Tokens 729 + 38*77 = 3655.
    ((2304, 1152), (2304, 1152), (6, 3), (81, 162), (38, 76), 3655),
    # 4608x768 (6:1): scale min(W/4608, H/768) is at most 2304/4608 = 0.5, reached by (2304, H)
    # for every H >= 384: effective int(2304.0) * int(384.0) = 884736 for all of them, least
    # waste for H = 384 -> 6x1. Grid 27x162; aspect 6 == 6: kept = int(4608 * 27/768) = 162.
    # times = sqrt(4374/2916) = sqrt(1.5) = 1.2247 -> (int(27 // 1.2247), int(162 // 1.2247))
    # = (22, 132). Tokens 729 + 22*133 = 3655.
    ((4608, 768), (2304, 384), (6, 1), (27, 162), (22, 132), 3655),
]


@pytest.mark.parametrize("size,canvas,grid,unpadded,final,tokens", ANYRES_TABLE)
def test_anyres_geometry_table(size, canvas, grid, unpadded, final, tokens):
    assert images.select_best_resolution(size, images.grid_resolutions()) == canvas
    assert images.anyres_grid_shape(size) == grid
    cols, rows = grid
    r0, r1, c0, c1 = images.unpad_crop(size, (rows * 27, cols * 27))
    assert (r1 - r0, c1 - c0) == unpadded
    assert (images.downsampled_shape(unpadded) or unpadded) == final
    assert len(images.anyres_token_sources(size)[2]) == tokens


def test_unpad_crop_offsets():
    # 1000x500 on a 54x81 grid: rows 7..47 (pad (54 - 40) // 2 = 7 on both ends).
    assert images.unpad_crop((1000, 500), (54, 81)) == (7, 47, 0, 81)
    # 100x50 on 27x27: kept 13, pad 7 -> rows 7..20.
    assert images.unpad_crop((100, 50), (27, 27)) == (7, 20, 0, 27)
    # Odd remainder: 10000x10 on 27x162: kept = int(10 * 162/10000) = 0, pad 13 -> rows 13..14,
    # one row is kept (the reference cuts the same pad from both ends).
    assert images.unpad_crop((10000, 10), (27, 162)) == (13, 14, 0, 162)


def test_downsample_threshold_is_on_the_square_root():
    # times = sqrt(h * w / 2916) > 1.1 <=> h * w > 1.21 * 2916 = 3528.36.
    assert images.downsampled_shape((40, 81)) is None        # 3240: above 1.1*2916, kept
    assert images.downsampled_shape((59, 59)) is None        # 3481 < 3528.36
    # 3540 > 3528.36: times = sqrt(3540/2916) = 1.10182; (60 // 1.10182, 59 // 1.10182) = (54, 53)
    assert images.downsampled_shape((60, 59)) == (54, 53)


def test_grid_resolutions_order_and_count():
    res = images.grid_resolutions()
    assert len(res) == 36
    assert res[:3] == [(384, 384), (384, 768), (384, 1152)]   # i (width) outer, j inner
    assert res[-1] == (2304, 2304)


def test_select_best_resolution_waste_tie_break():
    # 200x100 fits everywhere unscaled-or-larger: effective 20000 for all -> least waste.
    assert images.select_best_resolution((200, 100), [(768, 384), (384, 384)]) == (384, 384)
    # Equal effective and equal waste: the first candidate wins.
    assert images.select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)


def test_resized_size_in_canvas():
    # 1000x500 into 1152x768: scale_w = 1.152 < scale_h = 1.536 -> width fills,
    # height = ceil(500 * 1.152) = 576.
    assert images.resized_size_in_canvas((1000, 500), (1152, 768)) == (1152, 576)
    # 500x1000 into 768x1152: scale_h = 1.152 < scale_w = 1.536 -> height fills, width 576.
    assert images.resized_size_in_canvas((500, 1000), (768, 1152)) == (576, 1152)


def test_normalize_values():
    img = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))
    x = images.normalize(img)
    assert x.dtype == np.float32 and x.shape == (1, 1, 3)
    # (0/255 - 0.5)/0.5 = -1; (255/255 - 0.5)/0.5 = 1; (128/255 - 0.5)/0.5 = 1/255.
    np.testing.assert_allclose(x[0, 0], [-1.0, 1.0, 1 / 255], rtol=0, atol=1e-7)


def test_anyres_views_pixels():
    # A flat colour 1000x500: canvas 1152x768, image resized to 1152x576 and pasted at
    # y = (768 - 576) // 2 = 96, so tile row 0 (y 0..383) is black for local rows 0..95 and
    # tile row 1 (y 384..767) is black from y 672 = local row 288 on.
    colour = np.array([200, 40, 120], np.uint8)
    img = Image.fromarray(np.broadcast_to(colour, (500, 1000, 3)).copy())
    views, size = eager.anyres_views(img)
    assert size == (1000, 500)
    assert views.shape == (1 + 6, 384, 384, 3) and views.dtype == np.float32
    value = (colour / 255 - 0.5) / 0.5
    np.testing.assert_allclose(views[0], np.broadcast_to(value, (384, 384, 3)), atol=1e-6)
    for tile in range(1, 4):       # first row of tiles
        np.testing.assert_array_equal(views[tile, :96], -1.0)
        np.testing.assert_allclose(views[tile, 96:], np.broadcast_to(value, (288, 384, 3)),
                                   atol=1e-6)
    for tile in range(4, 7):       # second row
        np.testing.assert_allclose(views[tile, :288], np.broadcast_to(value, (288, 384, 3)),
                                   atol=1e-6)
        np.testing.assert_array_equal(views[tile, 288:], -1.0)


def test_anyres_views_tile_order():
    # 768x384 with a left half of one colour and a right half of another: canvas (768, 384),
    # no padding, tile 1 = left half, tile 2 = right half.
    arr = np.zeros((384, 768, 3), np.uint8)
    arr[:, :384] = (255, 0, 0)
    arr[:, 384:] = (0, 0, 255)
    views, _ = eager.anyres_views(Image.fromarray(arr))
    assert views.shape[0] == 3
    np.testing.assert_array_equal(views[1, ..., 0], 1.0)
    np.testing.assert_array_equal(views[2, ..., 2], 1.0)


def test_preprocess_square_and_load_converts_modes(tmp_path):
    path = tmp_path / "palette.png"
    Image.new("P", (30, 20), 3).save(path)
    img = images.load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    np.asarray(img)               # still readable after the file was closed
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba)
    assert images.load_image(rgba).getpixel((0, 0)) == (10, 20, 30)   # alpha dropped
    x = eager.preprocess_square(path)
    assert x.shape == (384, 384, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


# --- bad images ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        images.load_image(path)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        images.load_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*not a recognised image format"):
        images.load_image(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all")
    with pytest.raises(ValueError, match=r"notes\.jpg"):
        images.load_image(path)


def test_truncated_file(tmp_path):
    full = tmp_path / "full.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.png"):
        images.load_image(path)


def test_16_bit_mode_refused(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(path)
    with pytest.raises(ValueError, match=r"depth\.png has unsupported mode 'I;16'"):
        images.load_image(path)


def test_float_mode_refused(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
    with pytest.raises(ValueError, match=r"float\.tiff has unsupported mode 'F'"):
        images.load_image(path)


def test_zero_size_image():
    with pytest.raises(ValueError, match=r"zero size \(0x5\)"):
        eager.preprocess_square(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="positive"):
        images.select_best_resolution((0, 5), images.grid_resolutions())


def test_pathlike_and_str_paths(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (5, 7), 255).save(path)
    assert images.load_image(os.fspath(path)).size == (5, 7)
    views, size = eager.anyres_views(path)
    assert size == (5, 7) and views.shape == (2, 384, 384, 3)   # 1x1 grid: base + one tile
