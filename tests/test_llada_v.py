"""LLaDA-V end to end: data rows, the masked-response loss, stage 1 / stage 2 optimisation,
a tiny image-conditioned training run measured with the sampler, and whole-checkpoint interop.

Expected values come from hand counts (token layouts written out with CharTokenizer ids, the
AnyRes geometry worked by hand), a numpy re-statement of the loss, and first-principles schedule
formulas; the accuracy test compares with chance (colour 1/4, shape 1/3).
"""

import json
import os
import string
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llada_jax import config as config_lib
from llada_jax.data import images
from llada_jax.data import multimodal_data as md
from llada_jax.data.chat import BadRecordError
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.interop import siglip
from llada_jax.model import multimodal as mm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import llada_v_tiny  # noqa: E402

TOK = CharTokenizer()
P = mm.IMAGE_PLACEHOLDER_ID
BOS, EOS, START, END, EOT = 1, 2, 4, 5, 6


def _chars(text):
    """CharTokenizer ids by its definition: 9 special tokens, then string.printable in order."""
    return [9 + string.printable.index(ch) for ch in text]


def _header(role):
    return [START, *_chars(role), END, *_chars("\n\n")]


def _tiny_config(**vision):
    c = llada_v_tiny.get_config()
    for k, v in vision.items():
        c.vision[k] = v
    return c


def _write_png(path, width, height, colour=(200, 30, 30)):
    Image.new("RGB", (width, height), colour).save(path)
    return str(path)


# --- data ---------------------------------------------------------------------------------------
def test_square_row_layout_by_hand():
    """One 32 px view of 4 x 4 patches: 16 tokens + 1 newline = 17 placeholders; only the
    answer, its <|eot_id|> and the EOS padding are maskable."""
    c = _tiny_config()
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), seq_len=80, max_views=1,
                             bad_records="error")
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    row = rows({"image": image, "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]})
    prompt = ([BOS, *_header("user"), *[P] * 17, *_chars("\nColour?"), EOT, *_header("assistant")])
    answer = [*_chars("red"), EOT]
    expected = prompt + answer + [EOS] * (80 - len(prompt) - len(answer))
    np.testing.assert_array_equal(row["tokens"], expected)
    np.testing.assert_array_equal(row["maskable"], [False] * len(prompt) + [True] * (80 - len(prompt)))
    assert row["pixel_values"].shape == (1, 32, 32, 3) and row["pixel_values"].dtype == np.uint8
    np.testing.assert_array_equal(row["pixel_values"][0], image)   # 32 px: resize is the identity
    # The plan: placeholder k < 16 reads view token k with weight 1, the 17th is the newline.
    at = np.flatnonzero(row["tokens"] == P)
    np.testing.assert_array_equal(row["image_source_index"][at[:16], 0], np.arange(16))
    np.testing.assert_array_equal(row["image_source_weight"][at[:16]], [[1, 0, 0, 0]] * 16)
    assert row["image_is_newline"][at[16]] and row["image_is_newline"].sum() == 1
    assert not row["image_source_weight"][np.setdiff1d(np.arange(80), at)].any()


def test_anyres_expansion_counts_and_views(tmp_path):
    """AnyRes with 32 px tiles of 4 x 4 tokens. A 64 x 32 image fits the 2x1 canvas exactly:
    views = base + 2 tiles; token grid 4 x 8, no unpadding (same aspect), no downsampling
    (sqrt(32 / 64) < 1.1): 16 + 4 * (8 + 1) = 52 tokens. A 32 x 32 image: 1x1 canvas, base +
    1 tile, 16 + 4 * (4 + 1) = 36 tokens."""
    c = _tiny_config(image_aspect_ratio="anyres_max_4", max_views=6)
    wide = _write_png(tmp_path / "wide.png", 64, 32)
    square = _write_png(tmp_path / "square.png", 32, 32, (20, 200, 20))
    processor = md.ImageProcessor.from_config(c)
    assert processor.num_tokens((64, 32)) == 52 and processor.num_tokens((32, 32)) == 36
    rows = md.MultimodalRows(TOK, processor, seq_len=160, max_views=6, bad_records="error")
    row = rows({"image": [wide, square], ORIGIN_KEY: "r", "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "ok"}]})
    positions = np.flatnonzero(row["tokens"] == P)
    assert positions.size == 52 + 36
    # Two runs of placeholders separated by the text " and ".
    assert np.all(np.diff(positions[:52]) == 1) and np.all(np.diff(positions[52:]) == 1)
    assert positions[52] - positions[51] == 1 + len(" and ")
    assert not row["maskable"][positions].any()
    # Views: [base, tile, tile] of the wide image, then [base, tile] of the square one, 1 padding.
    pixels = row["pixel_values"]
    assert pixels.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(pixels[3, 0, 0], (20, 200, 20))
    np.testing.assert_array_equal(pixels[5], 0)
    # Row-local indices: the square image's tokens read views 3 and 4 only.
    second = row["image_source_index"][positions[52:]][~row["image_is_newline"][positions[52:]]]
    assert second[:, 0].min() >= 3 * 16 and second.max() < 5 * 16
    # Too many views for max_views is a bad record naming the limit.
    small = md.MultimodalRows(TOK, processor, seq_len=160, max_views=4, bad_records="error")
    with pytest.raises(BadRecordError, match=r"r: its images need 5 views, more than "
                                             r"config.vision.max_views=4"):
        small({"image": [wide, square], ORIGIN_KEY: "r", "conversations": [
            {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "ok"}]})


ORIGIN_KEY = "_origin"


def test_multiturn_maskable_is_every_answer_and_never_image_or_prompt():
    c = _tiny_config()
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), seq_len=120, max_views=1,
                             bad_records="error")
    row = rows({"image": np.full((32, 32, 3), 9, np.uint8), "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]})
    expected_tokens = ([BOS, *_header("user"), *[P] * 17, *_chars("\nQ1"), EOT,
                        *_header("assistant"), *_chars("A1"), EOT,
                        *_header("user"), *_chars("Q2"), EOT, *_header("assistant"),
                        *_chars("A2"), EOT])
    expected_mask = ([False] * (1 + 8 + 17 + 3 + 1 + 13) + [True] * 3
                     + [False] * (8 + 2 + 1 + 13) + [True] * 3)
    padding = 120 - len(expected_tokens)
    np.testing.assert_array_equal(row["tokens"], expected_tokens + [EOS] * padding)
    np.testing.assert_array_equal(row["maskable"], expected_mask + [True] * padding)


def test_overlong_drops_last_exchange_then_fails():
    c = _tiny_config()
    processor = md.ImageProcessor.from_config(c)
    record = {"image": np.zeros((32, 32, 3), np.uint8), ORIGIN_KEY: "rec:7", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2" * 20}, {"from": "gpt", "value": "A2"}]}
    # BOS + 8 + 17 + 3 + 1 + 13 + 3 = 46 tokens for the first exchange alone.
    row = md.MultimodalRows(TOK, processor, seq_len=50, max_views=1, bad_records="error")(record)
    assert row["maskable"].sum() == 3 + 4 and (row["tokens"] == P).sum() == 17
    with pytest.raises(BadRecordError, match=r"rec:7: conversation too long: 46 tokens \(17 of "
                                             r"them image tokens\).*seq_len=45"):
        md.MultimodalRows(TOK, processor, seq_len=45, max_views=1, bad_records="error")(record)
    assert md.MultimodalRows(TOK, processor, seq_len=45, max_views=1,
                             bad_records="skip")(record) is None


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_llava_files_json_list_jsonl_and_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_png(folder / "a.png", 40, 20)
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    with open(tmp_path / "data.json", "w") as f:
        json.dump([{"image": "imgs/a.png", "conversations": conversation},
                   {"conversations": [{"from": "human", "value": "text only"},
                                      {"from": "gpt", "value": "y"}]}], f, indent=1)
    _write_jsonl(tmp_path / "more.jsonl", [{"image": "a.png", "conversations": conversation}])
    src = md.LlavaFilesSource(str(tmp_path / "data.json"))
    assert len(src) == 2 and src[0]["image"] == str(tmp_path / "imgs" / "a.png")
    assert src[0][ORIGIN_KEY] == f"{tmp_path / 'data.json'}[0]"
    src = md.LlavaFilesSource(str(tmp_path / "more.jsonl"), image_folder=str(folder))
    assert src[0]["image"] == str(folder / "a.png")

    c = _tiny_config()
    c.data.source = f"files:{tmp_path}/data.json"
    c.data.shuffle = False
    batch = next(iter(md.build_dataset(c, TOK, batch_size=2, process_index=0, process_count=1)))
    assert (batch["tokens"][0] == P).sum() == 17 and (batch["tokens"][1] == P).sum() == 0
    np.testing.assert_array_equal(batch["pixel_values"][1], 0)    # text-only row: no views
    # 40 x 20 red image squashed to 32 x 32 stays uniformly red.
    np.testing.assert_array_equal(batch["pixel_values"][0, 0, 5, 5], (200, 30, 30))


def test_bad_image_path_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    _write_jsonl(tmp_path / "data.jsonl", [{"image": "missing.png", "conversations": conversation},
                                           {"image": "broken.png", "conversations": conversation}])
    c = _tiny_config()
    c.data.source = f"files:{tmp_path}/data.jsonl"
    c.data.shuffle = False
    iterator = iter(md.build_dataset(c, TOK, batch_size=1, process_index=0, process_count=1))
    missing = str(tmp_path / "missing.png")
    with pytest.raises(BadRecordError, match=rf"data.jsonl:1: image file not found: {missing}"):
        next(iterator)
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), 80, 1, "error")
    with pytest.raises(BadRecordError, match=rf"cannot read image {tmp_path / 'broken.png'}"):
        rows(md.LlavaFilesSource(str(tmp_path / "data.jsonl"))[1])


def test_malformed_records_and_source_specs(tmp_path):
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(_tiny_config()), 80, 1, "error")
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(BadRecordError, match=r"1 <image> mark\(s\) but the record has 0 image"):
        rows({"conversations": [{"from": "human", "value": "<image>"},
                                {"from": "gpt", "value": "x"}]})
    with pytest.raises(BadRecordError, match=r"turn 1 \(gpt\) holds <image>"):
        rows({"image": image, "conversations": [{"from": "human", "value": "hi"},
                                                {"from": "gpt", "value": "<image>"}]})
    with pytest.raises(BadRecordError, match=r"turn 0 must be an object with 'from'"):
        rows({"conversations": [{"from": "robot", "value": "hi"}]})
    with pytest.raises(ValueError, match=r"config.data.source: expected an image-text source"):
        md.parse_multimodal_source("synthetic_chat")
    c = _tiny_config()
    c.data.eval_source = "shapes@valid"
    with pytest.raises(ValueError, match=r"config.data.eval_source: expected an image-text"):
        config_lib.validate(c)


def test_config_validation_names_fields():
    c = _tiny_config()
    config_lib.validate(c)
    for field, value, message in [
            ("vision.image_aspect_ratio", "anyres", r"config.vision.image_aspect_ratio: expected "
                                                    r"'square' or 'anyres_max_N'"),
            ("train.trainable", "projector,decoder", r"config.train.trainable: expected 'all' or"),
            ("train.objective", "pretrain", r"config.train.objective: expected 'sft' with "
                                            r"vision.enabled=True"),
            ("vision.n_heads", 5, r"config.vision: .*n_heads: expected a divisor of width=64"),
            ("train.group_learning_rates.vision_tower", -1.0,
             r"config.train.group_learning_rates.vision_tower: expected a learning rate >= 0")]:
        c = _tiny_config()
        section, *rest = field.split(".")
        target = c[section]
        for part in rest[:-1]:
            target = target[part]
        target[rest[-1]] = value
        with pytest.raises(ValueError, match=message):
            config_lib.validate(c)
    plain = config_lib.default_config()
    plain.train.trainable = "projector"
    with pytest.raises(ValueError, match=r"config.train.trainable: expected 'all' or "
                                         r"'language_model' without a vision tower"):
        config_lib.validate(plain)


# --- model plumbing -----------------------------------------------------------------------------
def _tiny_model(c=None):
    c = c or _tiny_config()
    return mm.LLaDAV(config_lib.model_config(c), config_lib.vision_config(c))


def test_per_row_views_splice_the_right_image_and_uint8_normalises_like_the_host():
    c = _tiny_config()
    model = _tiny_model(c)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 3), jnp.int32)))[
        "params"]
    assert sorted(params) == ["language_model", "projector", "vision_tower"]
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    conversations = [md.encode_conversation(
        [{"role": "user", "content": "<image>" + q}], [pictures[b]], TOK,
        md.ImageProcessor.from_config(c), add_generation_prompt=True)
        for b, q in enumerate(["a", "longer question"])]
    batch = md.prompt_batch(conversations, gen_length=4, pad_id=EOS, mask_id=3, max_views=1,
                            image_size=32, tokens_per_view=16)
    canvas = np.concatenate([batch["tokens"], np.full((2, 4), 3, np.int32)], axis=1)
    sources = tuple(jnp.asarray(batch[k]) for k in mm.IMAGE_FIELDS[1:])
    embed = jax.jit(lambda *a: model.apply({"params": params}, *a, method=mm.LLaDAV.embed))
    embeddings, positions = embed(jnp.asarray(canvas), jnp.asarray(batch["pixel_values"]), sources)
    # Reference: the tower on host-normalised float pixels, then the projector, per row.
    tower = mm.VisionEncoder(config_lib.vision_config(c))
    reference = jax.jit(lambda x: mm.Projector(64).apply(
        {"params": params["projector"]}, tower.apply({"params": params["vision_tower"]}, x)))
    for b in range(2):
        views = reference(jnp.asarray(images.normalize(pictures[b]))[None])
        at = np.flatnonzero(canvas[b] == P)
        assert at.size == 17
        np.testing.assert_allclose(np.asarray(embeddings[b, at[:16]]), np.asarray(views[0]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(embeddings[b, at[16]]),
                                   np.asarray(params["projector"]["image_newline"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(positions), canvas == P)
    table = np.asarray(mm.normalize_pixels(jnp.arange(256, dtype=jnp.uint8)))
    np.testing.assert_array_equal(table, images.normalize(np.arange(256, dtype=np.uint8)))


# --- interop ------------------------------------------------------------------------------------
def test_llada_v_checkpoint_export_import_roundtrip_bit_identical(tmp_path):
    c = _tiny_config()
    model = _tiny_model(c)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 2), jnp.int32)))["params"]
    model_cfg, vision = config_lib.model_config(c), config_lib.vision_config(c)
    out = tmp_path / "llada_v_hf"
    summary = siglip.export_llada_v(params, model_cfg, vision, out, dtype="float32",
                                    image_aspect_ratio="square")
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    # Llama-named language tower + LLaDA-V-named vision side, one index.
    assert weight_map["model.layers.0.self_attn.q_proj.weight"].startswith("model-0")
    assert weight_map["lm_head.weight"].startswith("model-0")
    assert weight_map["model.mm_projector.0.weight"] == siglip.VISION_SHARD
    assert weight_map["model.image_newline"] == siglip.VISION_SHARD
    tower_layers = {k.split(".")[6] for k in weight_map if ".encoder.layers." in k}
    assert tower_layers == {"0", "1"}                    # 3 blocks, the last one dropped
    assert summary.num_tensors == len(weight_map)
    with open(out / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["mm_projector_type"] == "mlp2x_gelu" and hf_config["hidden_size"] == 64
    assert hf_config["mm_hidden_size"] == 64 and hf_config["mm_vision_select_layer"] == -2

    model_back, vision_back, params_back = siglip.import_llada_v(out)
    assert model_back == model_cfg and vision_back == vision
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    back = dict(jax.tree_util.tree_flatten_with_path(params_back)[0])
    assert len(back) == len(flat)
    for path, value in flat:
        found = np.asarray(back[path])
        assert found.dtype == np.asarray(value).dtype, path
        assert np.array_equal(found.view(np.uint32), np.asarray(value).view(np.uint32)), path
    with pytest.raises(FileExistsError, match="already exists"):
        siglip.export_llada_v(params, model_cfg, vision, out)
