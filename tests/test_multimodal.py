"""LLaDA-V glue (llada_jax/model/multimodal.py): projector, AnyRes token assembly, splicing.

References: torch's `nn.Sequential(Linear, GELU, Linear)` for `mlp2x_gelu`; an independent torch
re-statement of LLaVA-OneVision's `spatial_unpad` + `anyres_max_4` merge (written below from the
published algorithm) for the token assembly; hand-built expectations for splicing.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llada_jax.config import ModelConfig
from llada_jax.data import images
from llada_jax.interop import llada_v
from llada_jax.model import multimodal as mm
from llada_jax.model.vision import VisionConfig, VisionEncoder
from tests import image_assembly_reference as eager

P = mm.IMAGE_PLACEHOLDER_ID


# --- projector ----------------------------------------------------------------------------------
def _torch_projector(vision_width: int, d_model: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    proj = torch.nn.Sequential(torch.nn.Linear(vision_width, d_model), torch.nn.GELU(),
                               torch.nn.Linear(d_model, d_model))
    state = {f"model.mm_projector.{k}": v.detach().numpy() for k, v in proj.state_dict().items()}
    state["model.image_newline"] = (torch.randn(d_model) / math.sqrt(d_model)).numpy()
    return proj, state


def test_projector_matches_torch_and_roundtrips():
    proj, state = _torch_projector(12, 20)
    params = llada_v.import_projector(state, vision_width=12, d_model=20)
    x = np.random.default_rng(0).normal(size=(3, 5, 12)).astype(np.float32) * 3
    with torch.no_grad():
        reference = proj(torch.from_numpy(x)).numpy()
    out = mm.Projector(20).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-5)
    newline = mm.Projector(20).apply({"params": params}, method=mm.Projector.newline)
    np.testing.assert_array_equal(np.asarray(newline), state["model.image_newline"])
    back = llada_v.export_projector(params)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert np.array_equal(back[k], v), k
    # The tree matches the module's own params.
    abstract = jax.eval_shape(mm.Projector(20).init, jax.random.key(0), jnp.zeros((1, 12)))
    assert (jax.tree.map(lambda a: a.shape, nn.unbox(abstract["params"]))
            == jax.tree.map(lambda a: a.shape, params))


def test_projector_import_errors():
    _, state = _torch_projector(12, 20)
    with pytest.raises(ValueError, match=r"model\.mm_projector\.0\.weight: expected shape "
                                         r"\(16, 12\).*found \(20, 12\)"):
        llada_v.import_projector(state, vision_width=12, d_model=16)
    del state["model.image_newline"]
    with pytest.raises(ValueError, match=r"missing projector tensor\(s\): model\.image_newline"):
        llada_v.import_projector(state, vision_width=12, d_model=20)


# --- AnyRes assembly ----------------------------------------------------------------------------
def _torch_merge(features: torch.Tensor, image_size, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-OneVision's merge of one image with mm_patch_merge_type=spatial_unpad and
    image_aspect_ratio=anyres_max_4, re-stated in torch: features [views, 27*27, d]."""
    side = 27
    if features.shape[0] == 1:
        return torch.cat([features[0], newline[None]], dim=0)
    base, tiles = features[0], features[1:]
    cols, rows = images.anyres_grid_shape(image_size)          # checked by hand in test_images
    t = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    original_width, original_height = image_size
    current_height, current_width = t.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        pad = (current_height - new_height) // 2
        t = t[:, pad:current_height - pad, :]
    else:
        new_width = int(original_width * (current_height / original_height))
        pad = (current_width - new_width) // 2
        t = t[:, :, pad:current_width - pad]
    h, w = t.shape[1:]
    times = math.sqrt(h * w / (4 * side ** 2))
    if times > 1.1:
        t = torch.nn.functional.interpolate(t[None], [int(h // times), int(w // times)],
                                            mode="bilinear")[0]
    t = torch.cat([t, newline[:, None, None].expand(*t.shape[:-1], 1)], dim=-1)
    return torch.cat([base, t.flatten(1, 2).transpose(0, 1)], dim=0)


SIZES = [(384, 384), (1000, 500), (500, 1000), (100, 50), (2304, 1152), (4608, 768)]


@pytest.mark.parametrize("size", SIZES)
def test_assemble_matches_reference_merge(size):
    cols, rows = images.anyres_grid_shape(size)
    rng = np.random.default_rng(sum(size))
    feats = rng.normal(size=(1 + cols * rows, 729, 8)).astype(np.float32)
    newline = rng.normal(size=8).astype(np.float32)
    reference = _torch_merge(torch.from_numpy(feats), size, torch.from_numpy(newline)).numpy()
    out = eager.assemble_image_tokens(jnp.asarray(feats), size, jnp.asarray(newline))
    assert out.shape == reference.shape == (len(images.anyres_token_sources(size)[2]), 8)
    np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-6, atol=1e-6)
    # The gather plan gives the same tokens.
    index, weight, is_newline = images.anyres_token_sources(size, num_views=1 + cols * rows)
    gathered = mm.gather_image_tokens(jnp.asarray(feats.reshape(-1, 8)), jnp.asarray(index),
                                      jnp.asarray(weight), jnp.asarray(is_newline),
                                      jnp.asarray(newline))
    np.testing.assert_allclose(np.asarray(gathered), reference, rtol=1e-6, atol=1e-6)


def test_assemble_layout_by_hand():
    # 1000x500: 3x2 tiles, grid 54x81, rows 7..47 kept (see test_images). Code each tile token
    # by its (tile, row, col) to check placement: output token 729 + i*82 + j (j < 81) is grid
    # cell (7 + i, j), which lies in tile (row (7+i)//27, col j//27) at ((7+i)%27, j%27).
    feats = np.zeros((7, 729, 3), np.float32)
    for v in range(7):
        for r in range(27):
            for c in range(27):
                feats[v, r * 27 + c] = (v, r, c)
    newline = np.array([-1, -1, -1], np.float32)
    out = np.asarray(eager.assemble_image_tokens(jnp.asarray(feats), (1000, 500),
                                              jnp.asarray(newline)))
    assert out.shape == (729 + 40 * 82, 3)
    np.testing.assert_array_equal(out[:729], feats[0])
    for i in (0, 13, 39):
        for j in (0, 26, 27, 80):
            gy = 7 + i
            tile = 1 + (gy // 27) * 3 + j // 27
            np.testing.assert_array_equal(out[729 + i * 82 + j], (tile, gy % 27, j % 27))
        np.testing.assert_array_equal(out[729 + i * 82 + 81], newline)


def test_single_view_and_view_count_error():
    feats = jnp.ones((1, 729, 4))
    out = eager.assemble_image_tokens(feats, (640, 480), jnp.zeros(4))
    assert out.shape == (730, 4) and float(out[-1].sum()) == 0.0
    index, weight, is_newline = images.anyres_token_sources((640, 480), num_views=1)
    assert index.shape == weight.shape == (730, 4) and is_newline.sum() == 1 and is_newline[-1]
    np.testing.assert_array_equal(weight[:729, 0], 1.0)
    with pytest.raises(ValueError, match=r"2x2 tile grid, so 1 \+ 4 views are expected, found 3"):
        eager.assemble_image_tokens(jnp.ones((3, 729, 4)), (640, 480), jnp.zeros(4))


@pytest.mark.parametrize("out_size", [(38, 76), (54, 54), (22, 132), (80, 161), (1, 1)])
def test_bilinear_resize_matches_torch(out_size):
    x = np.random.default_rng(1).normal(size=(81, 162, 3)).astype(np.float32)
    reference = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None],
                                                list(out_size), mode="bilinear")[0]
    out = eager.bilinear_resize(jnp.asarray(x), out_size)
    np.testing.assert_allclose(np.asarray(out), reference.permute(1, 2, 0).numpy(),
                               rtol=1e-6, atol=1e-6)


# --- splicing -----------------------------------------------------------------------------------
def _batch():
    # Row 0: text, image A (2 tokens), text, image B (3 tokens). Row 1: image C (4 tokens) at the
    # end. L = 10, D = 2.
    ids = np.array([[5, P, P, 6, P, P, P, 7, 8, 9],
                    [5, 6, 7, 8, 9, 1, P, P, P, P]])
    emb = np.arange(2 * 10 * 2, dtype=np.float32).reshape(2, 10, 2)
    a = np.full((2, 2), 100.0, np.float32) + np.arange(2)[:, None]
    b = np.full((3, 2), 200.0, np.float32) + np.arange(3)[:, None]
    c = np.full((4, 2), 300.0, np.float32) + np.arange(4)[:, None]
    return ids, emb, [a, b, c]


def _expected(ids, emb, feats):
    out = emb.copy()
    out[0, [1, 2]] = feats[0]
    out[0, [4, 5, 6]] = feats[1]
    out[1, [6, 7, 8, 9]] = feats[2]
    return out, ids == P


def test_splice_flat_and_list():
    ids, emb, feats = _batch()
    expected, mask = _expected(ids, emb, feats)
    for image_features in (feats, np.concatenate(feats)):
        out, positions = eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb),
                                                  image_features)
        np.testing.assert_array_equal(np.asarray(out), expected)
        np.testing.assert_array_equal(np.asarray(positions), mask)
    jitted = jax.jit(eager.splice_image_features)(jnp.asarray(ids), jnp.asarray(emb),
                                                jnp.asarray(np.concatenate(feats)))
    np.testing.assert_array_equal(np.asarray(jitted[0]), expected)


def test_splice_per_row_with_padding():
    ids, emb, feats = _batch()
    expected, _ = _expected(ids, emb, feats)
    per_row = np.zeros((2, 6, 2), np.float32)        # row 0 has 5 tokens, row 1 has 4
    per_row[0, :5] = np.concatenate(feats[:2])
    per_row[1, :4] = feats[2]
    out, _ = eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb), per_row,
                                      feature_counts=[5, 4])
    np.testing.assert_array_equal(np.asarray(out), expected)
    with pytest.raises(ValueError, match=r"row 0 has 5 image placeholder positions .* but 6"):
        eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb), per_row)


def test_splice_count_mismatch_and_shapes():
    ids, emb, feats = _batch()
    with pytest.raises(ValueError, match=r"9 image placeholder positions .* but 8 image feature"):
        eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb), np.zeros((8, 2), np.float32))
    with pytest.raises(ValueError, match=r"image_features: expected \[N, 2\]"):
        eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb), np.zeros((9, 3), np.float32))
    with pytest.raises(ValueError, match="embeddings: expected"):
        eager.splice_image_features(jnp.asarray(ids), jnp.asarray(emb[:, :5]), feats)


def test_place_token_sources_batch():
    # Two rows: row 0 holds a 100x50 image (2 views, 1093 tokens) and a plain one (1 view, 730
    # tokens); row 1 a 640x480 image (5 views, 2929 tokens). Views stacked in reading order:
    # [0, 1] row 0 image 0, [2] row 0 image 1, [3..7] row 1, then one padding view [8].
    plans = [[images.anyres_token_sources((100, 50)), images.anyres_token_sources((9, 9), 1)],
             [images.anyres_token_sources((640, 480))]]
    length = 1093 + 730 + 20
    ids = np.full((2, length), 5)
    ids[0, 10:10 + 1093] = P
    ids[0, 1110:1110 + 730] = P
    ids[1, 3:3 + 2929 - 1200] = P          # too few: row 1 needs 2929 positions
    with pytest.raises(ValueError, match="row 1 has 1729 image placeholder positions"):
        images.place_token_sources(ids, plans, [[2, 1], [5]], P)
    ids = np.full((2, 3000), 5)
    ids[0, 10:10 + 1093] = P
    ids[0, 1110:1110 + 730] = P
    ids[1, 3:3 + 2929] = P
    index, weight, is_newline = images.place_token_sources(ids, plans, [[2, 1], [5]], P)
    rng = np.random.default_rng(0)
    views = rng.normal(size=(9, 729, 4)).astype(np.float32)
    newline = rng.normal(size=4).astype(np.float32)
    tokens = mm.gather_image_tokens(jnp.asarray(views.reshape(-1, 4)), jnp.asarray(index),
                                    jnp.asarray(weight), jnp.asarray(is_newline),
                                    jnp.asarray(newline))
    nl = jnp.asarray(newline)
    expect = [
        (0, slice(10, 1103), eager.assemble_image_tokens(jnp.asarray(views[0:2]), (100, 50), nl)),
        (0, slice(1110, 1840), eager.assemble_image_tokens(jnp.asarray(views[2:3]), (9, 9), nl)),
        (1, slice(3, 2932), eager.assemble_image_tokens(jnp.asarray(views[3:8]), (640, 480), nl)),
    ]
    for row, where, tokens_ref in expect:
        np.testing.assert_allclose(np.asarray(tokens[row, where]), np.asarray(tokens_ref),
                                   rtol=1e-6, atol=1e-6)


# --- LLaDA-V ------------------------------------------------------------------------------------
def test_llada_v_smoke():
    lm = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                     mlp_hidden_size=32, max_sequence_length=64, mask_token_id=3, eos_token_id=2,
                     bos_token_id=1, pad_token_id=2)
    vision = VisionConfig(image_size=8, patch_size=4, width=8, n_layers=2, n_heads=2, mlp_dim=16)
    model = mm.LLaDAV(lm, vision)
    # Row 0: a plain image (1 view: 4 tokens + newline = 5 positions); row 1 none. 2 views per
    # row given (row 0's second and both of row 1's are padding); row 0's plan indices are
    # row-local because it is the first row.
    plan = images.anyres_token_sources((8, 8), num_views=1, tokens_per_side=2)
    ids = np.array([[1, P, P, P, P, P, 7, 8], [1, 9, 10, 11, 12, 13, 14, 15]])
    sources = images.place_token_sources(ids, [[plan], []], [[1], []], P, tokens_per_view=4)
    sources = tuple(jnp.asarray(s) for s in sources)
    pixels = jax.random.uniform(jax.random.key(1), (2, 2, 8, 8, 3), minval=-1, maxval=1)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ids), pixels, sources)
    params = nn.unbox(variables)["params"]
    assert sorted(params) == ["language_model", "projector", "vision_tower"]

    logits = jax.jit(model.apply)(variables, jnp.asarray(ids), pixels, sources)
    assert logits.shape == (2, 8, 64) and bool(jnp.isfinite(logits).all())

    emb, positions = jax.jit(lambda v, *a: model.apply(v, *a, method=model.embed))(
        variables, jnp.asarray(ids), pixels, sources)
    np.testing.assert_array_equal(np.asarray(positions), ids == P)
    views = mm.Projector(16).apply({"params": params["projector"]}, VisionEncoder(vision).apply(
        {"params": params["vision_tower"]}, pixels[0]))
    np.testing.assert_allclose(np.asarray(emb[0, 1:5]), np.asarray(views[0]), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(emb[0, 5]), np.asarray(params["projector"]["image_newline"]),
                               rtol=1e-6, atol=1e-6)
    # Text positions are the language model's own embeddings; row 1 is text only.
    wte = np.asarray(params["language_model"]["wte"])
    np.testing.assert_array_equal(np.asarray(emb[1]), wte[ids[1]])
    np.testing.assert_array_equal(np.asarray(emb[0, 6:]), wte[ids[0, 6:]])

    # The vision side of a LLaDA-V checkpoint imports into exactly these subtrees.
    exported = llada_v.export_llada_v_multimodal(
        {"vision_tower": params["vision_tower"], "projector": params["projector"]}, vision)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in exported
    assert "model.mm_projector.2.bias" in exported and "model.image_newline" in exported
    imported = llada_v.import_llada_v_multimodal(exported, vision, d_model=16)
    jax.tree.map(np.testing.assert_array_equal, imported,
                 {"vision_tower": params["vision_tower"], "projector": params["projector"]})
