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
from llada_jax.data import images, pipeline, sources
from llada_jax.data import multimodal_data as md
from llada_jax.data import validation as data_validation
from llada_jax.data.chat import BadRecordError
from llada_jax.data.schema import IMAGE_FIELDS
from llada_jax.data.synthetic_images import ShapesDataset
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.interop import llada_v
from llada_jax.model import multimodal as mm
from tests import llada_v_prompts
from tests.interop_helpers import llada_v_init_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import llada_v_tiny

TOK = CharTokenizer()
# Trainer runs that test optimisation, not sharding: one device compiles the step much faster.
ONE_DEVICE = jax.devices()[:1]
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
# The tiny preset's system turn (its system message is empty): BOS <sh>system<eh>\n\n<eot>,
# labelled (LLaDA-V's preprocess_llada) on BOS and the header / eot tokens only.
SYSTEM = [BOS, START, *_chars("system"), END, *_chars("\n\n"), EOT]
SYSTEM_LABELS = [True, True] + [False] * 6 + [True, False, False, True]


def test_square_row_layout_by_hand():
    """One 32 px view of 4 x 4 patches: 16 tokens + 1 newline = 17 placeholders. Labelled: the
    whole assistant turn (header included), plus BOS, header and eot tokens of the system and
    user turns; and, in the tiny preset only (`data.label_eos_padding=True`, a documented
    deviation), the EOS padding (`fill`)."""
    c = _tiny_config()
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), seq_len=80, max_views=1,
                             bad_records="error")
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    row = rows({"image": image, "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]})
    user = [START, *_chars("user"), END, *_chars("\n\n"), *[P] * 17, *_chars("\nColour?"), EOT]
    user_labels = [True] + [False] * 4 + [True] + [False] * (2 + 17 + 8) + [True]
    answer = [START, *_chars("assistant"), END, *_chars("\n\nred"), EOT]
    used = len(SYSTEM) + len(user) + len(answer)
    np.testing.assert_array_equal(row["tokens"], SYSTEM + user + answer + [EOS] * (80 - used))
    np.testing.assert_array_equal(row["maskable"], SYSTEM_LABELS + user_labels
                                  + [True] * len(answer) + [True] * (80 - used))
    np.testing.assert_array_equal(row["fill"], [False] * used + [True] * (80 - used))
    assert "segment_ids" not in row      # the labelled padding is attended to, as in SFT
    assert row["pixel_values"].shape == (1, 32, 32, 3) and row["pixel_values"].dtype == np.uint8
    np.testing.assert_array_equal(row["pixel_values"][0], image)   # 32 px: resize is the identity
    # The plan: placeholder k < 16 reads view token k with weight 1, the 17th is the newline.
    at = np.flatnonzero(row["tokens"] == P)
    np.testing.assert_array_equal(row["image_source_index"][at[:16], 0], np.arange(16))
    np.testing.assert_array_equal(row["image_source_weight"][at[:16]], [[1, 0, 0, 0]] * 16)
    assert row["image_is_newline"][at[16]] and row["image_is_newline"].sum() == 1
    assert not row["image_source_weight"][np.setdiff1d(np.arange(80), at)].any()


def test_anyres_expansion_counts_and_views(tmp_path):
    """AnyRes (single-image records) with 32 px tiles of 4 x 4 tokens. A 64 x 32 image fits the
    2x1 canvas exactly: views = base + 2 tiles; token grid 4 x 8, no unpadding (same aspect), no
    downsampling (sqrt(32 / 64) < 1.1): 16 + 4 * (8 + 1) = 52 tokens. A 32 x 32 image: 1x1
    canvas, base + 1 tile, 16 + 4 * (4 + 1) = 36 tokens. (Multi-image records get one padded
    square view per image instead: tests/test_llava_format.py.)"""
    c = _tiny_config(image_aspect_ratio="anyres_max_4", max_views=6)
    wide = _write_png(tmp_path / "wide.png", 64, 32)
    square = _write_png(tmp_path / "square.png", 32, 32, (20, 200, 20))
    processor = md.ImageProcessor.from_config(c)
    assert processor.num_tokens((64, 32)) == 52 and processor.num_tokens((32, 32)) == 36
    rows = md.MultimodalRows(TOK, processor, seq_len=160, max_views=6, bad_records="error")

    def record(image):
        return {"image": image, ORIGIN_KEY: "r", "conversations": [
            {"from": "human", "value": "What? <image>"}, {"from": "gpt", "value": "ok"}]}

    for image, tokens, views in ((wide, 52, 3), (square, 36, 2)):
        row = rows(record(image))
        positions = np.flatnonzero(row["tokens"] == P)
        assert positions.size == tokens and np.all(np.diff(positions) == 1)
        # Moved to the front of its message: "<image>\nWhat?".
        np.testing.assert_array_equal(row["tokens"][positions[-1] + 1:positions[-1] + 7],
                                      _chars("\nWhat?"))
        assert not row["maskable"][positions].any()
        pixels = row["pixel_values"]
        assert pixels.shape == (6, 32, 32, 3)
        assert pixels[:views].any(axis=(1, 2, 3)).all()
        np.testing.assert_array_equal(pixels[views:], 0)
        # Row-local indices: only this image's views are read.
        assert row["image_source_index"][positions].max() < views * 16
    np.testing.assert_array_equal(pixels[1, 0, 0], (20, 200, 20))   # the square's tile
    # Too many views for max_views is a bad record naming the limit.
    small = md.MultimodalRows(TOK, processor, seq_len=160, max_views=2, bad_records="error")
    with pytest.raises(BadRecordError, match=r"r: its images need 3 views, more than "
                                             r"config.vision.max_views=2"):
        small(record(wide))


ORIGIN_KEY = "_origin"


def test_multiturn_maskable_is_every_answer_and_never_image_or_prompt():
    c = _tiny_config()
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), seq_len=120, max_views=1,
                             bad_records="error")
    row = rows({"image": np.full((32, 32, 3), 9, np.uint8), "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]})
    expected_tokens = [*SYSTEM, *_header("user"), *[P] * 17, *_chars("\nQ1"), EOT,
                       *_header("assistant"), *_chars("A1"), EOT,
                       *_header("user"), *_chars("Q2"), EOT, *_header("assistant"),
                       *_chars("A2"), EOT]
    user_labels = [True] + [False] * 4 + [True] + [False] * 2
    expected_mask = (SYSTEM_LABELS + user_labels + [False] * (17 + 3) + [True]
                     + [True] * (8 + 5 + 3) + user_labels + [False] * 2 + [True]
                     + [True] * (13 + 3))
    padding = 120 - len(expected_tokens)
    np.testing.assert_array_equal(row["tokens"], expected_tokens + [EOS] * padding)
    np.testing.assert_array_equal(row["maskable"], expected_mask + [True] * padding)


def test_overlong_drops_last_exchange_then_fails():
    c = _tiny_config()
    processor = md.ImageProcessor.from_config(c)
    record = {"image": np.zeros((32, 32, 3), np.uint8), ORIGIN_KEY: "rec:7", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2" * 20}, {"from": "gpt", "value": "A2"}]}
    # System turn 12 + user (8 + 17 + 3 + 1) + assistant (13 + 3) = 57 tokens for the first
    # exchange alone; labelled: 4 + 3 structural tokens, the 16 of the assistant turn and the
    # 3 of EOS padding (the tiny preset trains on it).
    row = md.MultimodalRows(TOK, processor, seq_len=60, max_views=1, bad_records="error")(record)
    assert row["maskable"].sum() == 4 + 3 + 16 + 3 and (row["tokens"] == P).sum() == 17
    with pytest.raises(BadRecordError, match=r"rec:7: conversation too long: 57 tokens \(17 of "
                                             r"them image tokens\).*seq_len=56"):
        md.MultimodalRows(TOK, processor, seq_len=56, max_views=1, bad_records="error")(record)
    assert md.MultimodalRows(TOK, processor, seq_len=56, max_views=1,
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
    src = sources.LlavaFilesSource(str(tmp_path / "data.json"))
    assert len(src) == 2 and src[0]["image"] == str(tmp_path / "imgs" / "a.png")
    # Records of a JSON list are named by the line they start on: indent=1 puts each record's
    # opening brace alone on a line indented by one space ("[" is line 1).
    starts = [i + 1 for i, line in enumerate((tmp_path / "data.json").read_text().splitlines())
              if line == " {"]
    assert starts[0] == 2 and len(starts) == 2
    assert src[0][ORIGIN_KEY] == f"{tmp_path / 'data.json'}:2"
    assert src[1][ORIGIN_KEY] == f"{tmp_path / 'data.json'}:{starts[1]}"
    src = sources.LlavaFilesSource(str(tmp_path / "more.jsonl"), image_folder=str(folder))
    assert src[0]["image"] == str(folder / "a.png")

    c = _tiny_config()
    c.data.source = f"files:{tmp_path}/data.json"
    c.data.shuffle = False
    batch = next(iter(pipeline.build_dataset(c, TOK, batch_size=2, process_index=0, process_count=1)))
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
    iterator = iter(pipeline.build_dataset(c, TOK, batch_size=1, process_index=0, process_count=1))
    missing = str(tmp_path / "missing.png")
    with pytest.raises(BadRecordError, match=rf"data.jsonl:1: image file not found: {missing}"):
        next(iterator)
    rows = md.MultimodalRows(TOK, md.ImageProcessor.from_config(c), 80, 1, "error")
    with pytest.raises(BadRecordError, match=rf"cannot read image {tmp_path / 'broken.png'}"):
        rows(sources.LlavaFilesSource(str(tmp_path / "data.jsonl"))[1])


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
        sources.parse_image_source_spec("synthetic_chat")
    c = _tiny_config()
    c.data.eval_source = "shapes@valid"
    config_lib.validate(c)   # the schema is fine; the data checks name the source
    with pytest.raises(ValueError, match=r"config.data.eval_source: expected an image-text"):
        data_validation.check(c)


def test_config_validation_names_fields():
    c = _tiny_config()
    config_lib.validate(c)
    for field, value, message in [
            ("vision.image_aspect_ratio", "anyres", r"config.vision.image_aspect_ratio: expected "
                                                    r"'square' or 'anyres_max_N'"),
            ("train.trainable", "projector,decoder", r"config.train.trainable: expected 'all' or"),
            ("train.objective", "pretrain", r"config.train.objective: expected one of \('sft', "
                                            r"'masked_response'\) with vision.enabled=True"),
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
            config_lib.validate(c)   # the schema
            data_validation.check(c)   # the data side (objective and template with vision)
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
    batch = llada_v_prompts.prompt_batch(conversations, gen_length=4, pad_id=EOS, mask_id=3, max_views=1,
                            image_size=32, tokens_per_view=16)
    canvas = np.concatenate([batch["tokens"], np.full((2, 4), 3, np.int32)], axis=1)
    sources = tuple(jnp.asarray(batch[k]) for k in IMAGE_FIELDS[1:])
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
    variables = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 2), jnp.int32))
    params = nn.unbox(variables)["params"]
    model_cfg, vision = config_lib.model_config(c), config_lib.vision_config(c)
    out = tmp_path / "llada_v_hf"
    summary = llada_v.export_llada_v(params, model_cfg, vision, out, dtype="float32",
                                    image_aspect_ratio="square")
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    # Llama-named language tower + LLaDA-V-named vision side, one index.
    assert weight_map["model.layers.0.self_attn.q_proj.weight"].startswith("model-0")
    assert weight_map["lm_head.weight"].startswith("model-0")
    assert weight_map["model.mm_projector.0.weight"] == llada_v.VISION_SHARD
    assert weight_map["model.image_newline"] == llada_v.VISION_SHARD
    tower_layers = {k.split(".")[6] for k in weight_map if ".encoder.layers." in k}
    assert tower_layers == {"0", "1"}                    # 3 blocks, the last one dropped
    assert summary.num_tensors == len(weight_map)
    with open(out / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["mm_projector_type"] == "mlp2x_gelu" and hf_config["hidden_size"] == 64
    assert hf_config["mm_hidden_size"] == 64 and hf_config["mm_vision_select_layer"] == -2

    model_back, vision_back, params_back = llada_v.import_llada_v(out)
    assert model_back == model_cfg and vision_back == vision
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    back = dict(jax.tree_util.tree_flatten_with_path(params_back)[0])
    assert len(back) == len(flat)
    for path, value in flat:
        found = np.asarray(back[path])
        assert found.dtype == np.asarray(value).dtype, path
        assert np.array_equal(found.view(np.uint32), np.asarray(value).view(np.uint32)), path
    with pytest.raises(FileExistsError, match="already exists"):
        llada_v.export_llada_v(params, model_cfg, vision, out)


# --- the masked-response loss -------------------------------------------------------------------
class _FixedLogits:
    """Stands in for the model in the step's loss: fixed logits; records the image inputs."""

    def __init__(self, logits):
        self.logits, self.kwargs = logits, None

    def apply(self, variables, tokens, **kwargs):
        self.kwargs = kwargs
        return self.logits


def _hand_batch():
    # Row 0: BOS, 2 image tokens, a prompt token, then the answer "0" and 3 EOS of padding.
    # Row 1: BOS, a prompt token, 3 image tokens, then the answer "0 4" and 1 EOS of padding.
    tokens = np.array([[1, P, P, 4, 0, 2, 2, 2], [1, 4, P, P, P, 0, 4, 2]], np.int32)
    maskable = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]], bool)
    fields = {"pixel_values": np.zeros((2, 1, 32, 32, 3), np.uint8),
              "image_source_index": np.zeros((2, 8, 4), np.int32),
              "image_source_weight": np.zeros((2, 8, 4), np.float32),
              "image_is_newline": np.zeros((2, 8), bool)}
    return {"tokens": tokens, "maskable": maskable, **fields}


def test_masked_response_loss_by_hand():
    """Every position gets the distribution q = (0.4, 0.1, 0.2, 0.1, 0.2), so CE(target) =
    -log q[target]. With mask_eps -> 1 every maskable token is noised (p ~ 1): row 0 scores its
    answer 0 and three EOS (2): (-log .4 - 3 log .2) / p / 4; row 1 scores 0, 4, 2:
    (-log .4 - 2 log .2) / p / 3; the loss is their mean. Images and prompt are never scored."""
    from llada_jax.train import step as step_lib

    c = _tiny_config()
    c.train.mask_eps = 1 - 1e-6
    q = np.array([0.4, 0.1, 0.2, 0.1, 0.2], np.float32)
    stub = _FixedLogits(jnp.asarray(np.broadcast_to(np.log(q), (2, 8, 5))))
    batch = _hand_batch()
    prepared = step_lib.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()}, c.train,
                                      mask_id=3, rng=jax.random.key(0), allow_cut=True)
    np.testing.assert_array_equal(np.asarray(prepared["noised"]), batch["maskable"])
    p = np.asarray(prepared["mask_prob"], np.float64)
    assert np.all(p >= 1 - 1e-6)
    loss, counts = step_lib.make_loss_fn(stub, "sft")({}, prepared)
    expected = np.mean([(-np.log(0.4) - 3 * np.log(0.2)) / p[0] / 4,
                        (-np.log(0.4) - 2 * np.log(0.2)) / p[1] / 3])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert int(counts["noised"]) == 7
    # The batch's images reached the model.
    assert stub.kwargs["pixel_values"].shape == (2, 1, 32, 32, 3)
    assert [a.shape for a in stub.kwargs["image_sources"]] == [(2, 8, 4), (2, 8, 4), (2, 8)]

    # The usual mask_eps: whatever t is drawn, images and prompts are never noised, and the
    # loss weights each noised token by 1/p and divides by the answer length.
    c.train.mask_eps = 1e-3
    for seed in range(20):
        prepared = step_lib.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()},
                                          c.train, 3, jax.random.key(seed), allow_cut=True)
        noised = np.asarray(prepared["noised"])
        assert not noised[~batch["maskable"]].any()
        p = np.asarray(prepared["mask_prob"], np.float64)
        ce = -np.log(q)[np.where(batch["tokens"] == P, 0, batch["tokens"])]
        expected = np.mean([(ce[b] * noised[b]).sum() / p[b] / batch["maskable"][b].sum()
                            for b in range(2)])
        loss, _ = step_lib.make_loss_fn(stub, "sft")({}, prepared)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


# --- stages -------------------------------------------------------------------------------------
def _initial_params(c):
    from llada_jax import parallel
    from llada_jax.train import state as state_lib
    from llada_jax.train.optimizer import make_optimizer

    mesh = parallel.make_mesh(c, devices=ONE_DEVICE)
    model = state_lib.make_model(c)
    state = state_lib.create_train_state(model, make_optimizer(c.train), mesh,
                                         parallel.logical_rules(c), c.train.seed)
    return jax.device_get(state.params)


def _quick(c, steps):
    c.train.steps = steps
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.train.log_every = steps
    c.train.checkpoint_every = 0
    return c


def test_stage1_trains_only_the_projector(tmp_path):
    from llada_jax.train import trainer

    c = _quick(llada_v_tiny.get_config("stage1"), 3)
    c.train.learning_rate = 1e-2
    before = _initial_params(c)
    result = trainer.train(c, str(tmp_path / "stage1"), devices=ONE_DEVICE)
    after = jax.device_get(result.state.params)
    for group in ("vision_tower", "language_model"):
        for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before[group])[0],
                                    jax.tree.leaves(after[group]), strict=True):
            assert np.array_equal(np.asarray(old).view(np.uint32),
                                  np.asarray(new).view(np.uint32)), (group, path)
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before["projector"])[0],
                                jax.tree.leaves(after["projector"]), strict=True):
        assert np.any(np.asarray(old) != np.asarray(new)), path
    # Adam keeps moments for the projector alone: 2 x its parameters, nothing for frozen groups.
    projector_size = sum(np.size(a) for a in jax.tree.leaves(before["projector"]))
    moments = sum(np.size(a) for a in jax.tree.leaves(result.state.opt_state) if np.ndim(a) > 0)
    assert moments == 2 * projector_size
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_stage2_group_learning_rates(tmp_path):
    """Cosine schedules with each group's peak; and Adam's first update moves every parameter
    with a non-negligible gradient by exactly its group's lr(0) = peak / warmup (m / sqrt(v) =
    sign(g) after bias correction), so the update magnitudes follow the group learning rates."""
    from llada_jax.train import optimizer, trainer

    c = _quick(llada_v_tiny.get_config(), 40)
    c.train.warmup_steps = 4
    c.train.learning_rate = 1e-3
    c.train.group_learning_rates.vision_tower = 2e-4
    c.train.group_learning_rates.language_model = 5e-4
    c.train.weight_decay = 0.0
    peaks = {"vision_tower": 2e-4, "projector": 1e-3, "language_model": 5e-4}
    for group, peak in peaks.items():
        schedule = optimizer.make_schedule(c.train, optimizer.group_peak_learning_rates(c.train)[group])
        for s in (0, 3, 4, 10, 22, 39):
            expected = (peak * (s + 1) / 4 if s < 4 else
                        peak * 0.5 * (1 + np.cos(np.pi * (s - 4) / (40 - 4))))
            np.testing.assert_allclose(float(schedule(s)), expected, rtol=1e-5)  # float32

    before = _initial_params(c)
    after = jax.device_get(trainer.train(c, str(tmp_path / "stage2"), stop_after=1,
                                         devices=ONE_DEVICE).state.params)
    for group, peak in peaks.items():
        delta = np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b)).ravel()
                                for a, b in zip(jax.tree.leaves(after[group]),
                                                jax.tree.leaves(before[group]), strict=True)])
        moved = delta[delta > 0]
        assert moved.size > 0.5 * delta.size, group
        # Tolerances: float32 parameters near 1 (norm scales) round the update by up to an ulp
        # (1.2e-7, i.e. 0.2% of the smallest lr(0) here).
        np.testing.assert_allclose(np.median(moved), peak / 4, rtol=5e-3, err_msg=group)
        assert moved.max() <= peak / 4 * 1.01, group


# --- sampling -----------------------------------------------------------------------------------
def test_image_forward_windows_match_the_full_pass():
    """`image_conditioned_forward` splices the stored image tokens of a window: a cached window
    pass over the image positions equals those positions of the full pass; CFG twins (rows
    repeated) see the same images."""
    from llada_jax.diffusion.sampler import image_conditioned_forward

    c = _tiny_config()
    model = _tiny_model(c)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 2), jnp.int32)))[
        "params"]
    picture = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    conversation = md.encode_conversation([{"role": "user", "content": "<image>\nShape?"}],
                                          [picture], TOK, md.ImageProcessor.from_config(c),
                                          add_generation_prompt=True)
    batch = llada_v_prompts.prompt_batch([conversation], 4, EOS, 3, 1, 32, 16)
    tokens = np.concatenate([batch["tokens"], np.full((1, 4), 3, np.int32)], axis=1)
    images = [jnp.asarray(batch[k]) for k in IMAGE_FIELDS]
    mask = jnp.ones(tokens.shape, bool)
    positions = jnp.arange(tokens.shape[1])[None]

    @jax.jit
    def run(tokens, images):
        forward = image_conditioned_forward(model, params, images)
        full, cache = forward(tokens, attention_mask=mask, positions=positions, return_kv=True)
        start, width = 16, 24       # covers the 17 image tokens (positions 20 to 36)
        window = forward(tokens[:, start:start + width], attention_mask=mask,
                         positions=positions[:, start:start + width], kv_cache=cache,
                         cache_index=start)
        twins = forward(jnp.repeat(tokens, 2, axis=0), attention_mask=jnp.repeat(mask, 2, 0),
                        positions=jnp.repeat(positions, 2, 0))
        return full, window, twins

    full, window, twins = run(jnp.asarray(tokens), images)
    assert np.flatnonzero(tokens[0] == P).tolist() == list(range(20, 37))
    np.testing.assert_allclose(np.asarray(window), np.asarray(full[:, 16:40]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(twins), np.repeat(np.asarray(full), 2, 0), rtol=1e-6,
                               atol=1e-6)
    # The image matters: another picture changes the answer positions' logits.
    other = llada_v_prompts.prompt_batch([md.encode_conversation(
        [{"role": "user", "content": "<image>\nShape?"}], [255 - picture], TOK,
        md.ImageProcessor.from_config(c), add_generation_prompt=True)], 4, EOS, 3, 1, 32, 16)
    changed, _, _ = run(jnp.asarray(tokens), [jnp.asarray(other[k]) for k in IMAGE_FIELDS])
    assert np.abs(np.asarray(changed[0, -4:]) - np.asarray(full[0, -4:])).max() > 1e-4


def test_banned_ids_and_early_exit_on_eot():
    """A forward that always ranks EOS first, then x at generation position 0 and EoT at 1:
    with EOS banned, the answer is x <EoT>; with stop_at_eot the run stops once those two are
    committed (2 passes, one token per step) and the rest is filled with EOS."""
    from llada_jax.diffusion.sampler import SamplerConfig, build_canvas, sample

    vocab, x_id, eot = 12, 9, 6
    prompt = jnp.array([[1, 10, 11]], jnp.int32)

    def forward(tokens, **_):
        logits = np.zeros((1, tokens.shape[1], vocab), np.float32)
        logits[..., EOS] = 6.0
        logits[0, 3, x_id] = 5.0
        logits[0, 4, eot] = 4.0
        logits[0, 5:, 8] = 1.0
        return jnp.asarray(logits)

    base = SamplerConfig(gen_length=6, block_length=6, steps=6, mask_id=3, eos_id=EOS,
                         eot_id=eot, banned_ids=(EOS, 1, 4, 5), stop_at_eot=True, early_exit=True)
    tokens, mask, positions = build_canvas(prompt, jnp.ones((1, 3), bool), 6, 3)
    out = sample(forward, tokens, mask, positions, 3, base, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens[0, 3:]), [x_id, eot, EOS, EOS, EOS, EOS])
    assert int(out.num_forward_passes) == 2
    # Without stop_at_eot the run goes on (EOS is banned, so nothing else can finish it).
    longer = sample(forward, tokens, mask, positions, 3,
                    SamplerConfig(**{**base.__dict__, "stop_at_eot": False, "early_exit": False}),
                    jax.random.key(0))
    assert int(longer.num_forward_passes) == 6
    assert EOS not in np.asarray(longer.tokens[0, 3:]).tolist()
    with pytest.raises(ValueError, match=r"config.sampler.early_exit: expected False when EOS is "
                                         r"never generated"):
        SamplerConfig(**{**base.__dict__, "stop_at_eot": False})


# --- a tiny LLaDA-V learns to answer from the image ---------------------------------------------
def test_tiny_llada_v_answers_from_the_image(llada_v_tiny_run):
    """configs/llada_v_tiny.py (500 steps, whole model) trained by launch/train.py (the session's
    shared run, tests/conftest.py), then the sampler on held-out pictures: the answer (a colour
    among 4, a shape among 3) can only come from the image, so accuracy far above chance (1/4,
    1/3) shows the vision path works end to end."""
    from llada_jax.diffusion.sampler import SamplerConfig, generate
    from llada_jax.train import checkpoint as checkpoint_lib
    from llada_jax.train import state as state_lib

    c = llada_v_tiny.get_config()
    _, params = checkpoint_lib.load_params(llada_v_tiny_run)

    processor = md.ImageProcessor.from_config(c)
    test_set = ShapesDataset(32, 200, "test")
    conversations, answers, kinds = [], [], []
    for i in range(96):
        record = test_set[i]
        question = record["conversations"][0]["value"]
        conversations.append(md.encode_conversation([{"role": "user", "content": question}],
                                                    [record["image"]], TOK, processor,
                                                    add_generation_prompt=True))
        answers.append(record["answer"])
        kinds.append(record["question_kind"])
    sampler = SamplerConfig.from_config(c, eot_id=TOK.eot_id, vocab_limit=TOK.vocab_size)
    batch = llada_v_prompts.prompt_batch(conversations, sampler.gen_length, TOK.pad_id, TOK.mask_id, 1, 32, 16)
    start = time.time()
    out = generate(params, state_lib.make_model(c), batch["tokens"], batch["mask"],
                   sampler, jax.random.key(0), images=[batch[k] for k in IMAGE_FIELDS])
    sample_seconds = time.time() - start
    generated = np.asarray(out)[:, batch["tokens"].shape[1]:]
    correct = {"colour": [], "shape": []}
    for row, answer, kind in zip(generated, answers, kinds, strict=True):
        ids = []
        for i in row:
            if i in (TOK.eos_id, TOK.eot_id):
                break
            ids.append(int(i))
        correct[kind].append(TOK.decode(ids) == answer)
    accuracy = {k: float(np.mean(v)) for k, v in correct.items()}
    print(f"tiny LLaDA-V: sample {sample_seconds:.1f} s, "
          f"accuracy {accuracy} on {len(answers)} held-out pictures")
    assert accuracy["colour"] >= 0.75, accuracy      # chance: 0.25
    assert accuracy["shape"] >= 0.6, accuracy        # chance: 0.33


def test_stage1_init_from_separate_towers():
    """A language tower and a vision tower from elsewhere + a fresh projector = LLaDAV params."""
    c = _tiny_config()
    model_cfg, vision = config_lib.model_config(c), config_lib.vision_config(c)
    params = nn.unbox(jax.jit(_tiny_model(c).init)(jax.random.key(0), jnp.zeros((1, 2),
                                                                                 jnp.int32)))
    params = jax.device_get(params["params"])
    combined = llada_v_init_params(params["language_model"], params["vision_tower"],
                                   model_cfg, vision, seed=1)
    assert jax.tree.structure(combined) == jax.tree.structure(params)
    assert combined["language_model"]["wte"] is params["language_model"]["wte"]
    assert combined["projector"]["linear_1"]["kernel"].shape == (64, 64)
    assert np.abs(combined["projector"]["linear_1"]["kernel"]).max() > 0
    with pytest.raises(ValueError, match=r"vision_tower params do not fit the config"):
        llada_v_init_params(params["language_model"], params["projector"], model_cfg,
                            vision)
