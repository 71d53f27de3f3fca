"""LLaDA-V's data formats against the released recipe, written out by hand.

Expected token rows and labelled masks come from the official templates (LLaDA-V
`train/llava/train/train.py`: `preprocess_llada`, `preprocess_multimodal`, `preprocess_plain`;
`train/llava/conversation.py`: `conv_llava_llada`, `conv_llada_plain`), rendered as strings here
and mapped to ids by the definition of the character tokenizer (9 special tokens, then
`string.printable`), never through the project's rendering helpers. Image token counts are
worked by hand from the geometry (patch 8 on 32 px: 4 x 4 = 16 tokens; patch 14 on 384 px:
27 x 27 = 729). Also: the data errors of issue 12 (missing, truncated, oversized images,
malformed records) as one line naming `file:line` and the image.
"""

import json
import os
import string
import sys

import numpy as np
import pytest
from PIL import Image

from llada_jax.data import chat, pipeline, sources
from llada_jax.data import multimodal_data as md
from llada_jax.data.llava_format import LLAVA_SYSTEM_MESSAGE
from llada_jax.data.schema import BadRecordError
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.model.multimodal import IMAGE_PLACEHOLDER_ID as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import llada_v
import llada_v_tiny

TOK = CharTokenizer()
BOS, EOS, START, END, EOT = 1, 2, 4, 5, 6
# conv_llava_llada.system, copied by hand from the reference.
OFFICIAL_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                   "the visual content that the user provides, and assist the user with a "
                   "variety of tasks using natural language.")
RED = (200, 30, 30)


def _chars(text):
    return [9 + string.printable.index(ch) for ch in text]


def _turn(role, content, images=()):
    """`<|start_header_id|>role<|end_header_id|>\\n\\n` + content + `<|eot_id|>` as char ids,
    each `<image>` of content replaced by the given number of placeholders, and its labels as
    preprocess_llada sets them: the assistant turn whole; in other turns only the header start /
    end and the eot."""
    ids = [START, *_chars(role), END]
    for k, piece in enumerate(("\n\n" + content).split("<image>")):
        if k:
            ids += [P] * images[k - 1]
        ids += _chars(piece)
    ids.append(EOT)
    if role == "assistant":
        return ids, [True] * len(ids)
    labels = [i in (START, END, EOT) for i in ids]
    return ids, labels


def _processor(config=None, **vision):
    c = config or llada_v_tiny.get_config()
    for k, v in vision.items():
        c.vision[k] = v
    return md.ImageProcessor.from_config(c)


def _default_processor():
    """The tiny tower's geometry with the official template (LLaVA system message)."""
    return md.ImageProcessor(32, 8, None, 6)


def _png(path, width, height, colour=RED):
    Image.new("RGB", (width, height), colour).save(path)
    return str(path)


# --- llava_llada (stage 2) ----------------------------------------------------------------------
def test_official_template_row_by_hand():
    """BOS, the LLaVA system turn, the turns unstripped; the single <image> moved to the front
    of its message; labels = assistant turns whole + BOS/header/eot of the other turns."""
    rows = md.MultimodalRows(TOK, _default_processor(), seq_len=400, max_views=1,
                             bad_records="error")
    image = np.full((32, 32, 3), 50, np.uint8)
    row = rows({"image": image, "conversations": [
        {"from": "human", "value": "Colour? <image>"}, {"from": "gpt", "value": "red "},
        {"from": "human", "value": "  Q2 "}, {"from": "gpt", "value": "A2"}]})
    system, system_labels = _turn("system", OFFICIAL_SYSTEM)
    # preprocess_multimodal: "<image>\n" + "Colour?" (the rest stripped).
    user1, user1_labels = _turn("user", "<image>\nColour?", [17])
    answer1, answer1_labels = _turn("assistant", "red ")
    user2, user2_labels = _turn("user", "  Q2 ")
    answer2, answer2_labels = _turn("assistant", "A2")
    ids = [BOS, *system, *user1, *answer1, *user2, *answer2]
    labels = [True, *system_labels, *user1_labels, *answer1_labels, *user2_labels,
              *answer2_labels]
    used = len(ids)
    assert used == 1 + (1 + 6 + 1 + 2 + 186 + 1) + (1 + 4 + 1 + 2 + 17 + 8 + 1) + (13 + 4 + 1) \
        + (8 + 5 + 1) + (13 + 2 + 1)
    np.testing.assert_array_equal(row["tokens"], ids + [EOS] * (400 - used))
    np.testing.assert_array_equal(row["maskable"], labels + [False] * (400 - used))
    np.testing.assert_array_equal(row["fill"], [False] * used + [True] * (400 - used))
    # One row per device in the released runs: the fill is segment 0 (never attended either).
    np.testing.assert_array_equal(row["segment_ids"], [1] * used + [0] * (400 - used))
    # Labelled outside the answers: BOS + 3 (system) + 3 (user 1) + 3 (user 2).
    assert sum(labels) == 1 + 3 + 3 + 3 + len(answer1) + len(answer2)
    assert LLAVA_SYSTEM_MESSAGE == OFFICIAL_SYSTEM


def test_image_move_rule():
    """preprocess_multimodal moves a single <image> not already first; it leaves two marks,
    or one at the start, alone."""
    assert chat.move_image_to_front(" What is it? <image> ") == "<image>\nWhat is it?"
    assert chat.move_image_to_front("<image>What") == "<image>What"
    assert chat.move_image_to_front("a <image> b <image>") == "a <image> b <image>"
    assert chat.move_image_to_front("no image ") == "no image "


def test_leading_answer_dropped_and_record_system_turn_kept():
    rows = md.MultimodalRows(TOK, _default_processor(), seq_len=120, max_views=1,
                             bad_records="error")
    image = np.zeros((32, 32, 3), np.uint8)
    row = rows({"image": image, "conversations": [
        {"from": "gpt", "value": "Hello!"}, {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]})
    system, _ = _turn("system", "Be brief.")
    user, _ = _turn("user", "<image>\nQ", [17])
    answer, _ = _turn("assistant", "A")
    ids = [BOS, *system, *user, *answer]
    np.testing.assert_array_equal(row["tokens"][:len(ids)], ids)
    assert row["fill"][len(ids):].all() and not row["fill"][:len(ids)].any()
    with pytest.raises(BadRecordError, match=r"the system message holds <image>"):
        rows({"image": image, "conversations": [
            {"from": "system", "value": "<image>"}, {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"}]})


def test_generation_prompt_official_inference_template():
    """At inference the released chat template trims each message and ends with the assistant
    header; the system turn is always there; nothing is labelled."""
    image = np.zeros((32, 32, 3), np.uint8)
    prompt = md.encode_conversation([{"role": "user", "content": "  <image>\nShape?  "}],
                                    [image], TOK, _default_processor(),
                                    add_generation_prompt=True)
    system, _ = _turn("system", OFFICIAL_SYSTEM)
    user, _ = _turn("user", "<image>\nShape?", [17])
    expected = [BOS, *system, *user, START, *_chars("assistant"), END, *_chars("\n\n")]
    assert prompt.ids == expected
    assert not any(prompt.maskable)
    # The tiny preset's template (empty system message) reaches whoever builds the processor
    # from the config, e.g. launch/chat.py --image.
    tiny = md.encode_conversation([{"role": "user", "content": "<image>\nShape?"}], [image], TOK,
                                  _processor(), add_generation_prompt=True)
    assert tiny.ids[:12] == [BOS, START, *_chars("system"), END, *_chars("\n\n"), EOT]


# --- multi-image records ------------------------------------------------------------------------
def test_multi_image_record_gets_one_padded_square_view_per_image(tmp_path):
    """In AnyRes mode a 64 x 32 image alone gives base + 2 tiles and 16 + 4 * (8 + 1) = 52
    tokens; in a two-image record each image is ONE view padded to a square with the mean
    colour (127) and gives 16 + 1 = 17 tokens."""
    processor = _processor(image_aspect_ratio="anyres_max_4", max_views=4)
    wide = _png(tmp_path / "wide.png", 64, 32)
    tall = _png(tmp_path / "tall.png", 32, 64, (30, 200, 30))
    rows = md.MultimodalRows(TOK, processor, seq_len=160, max_views=4, bad_records="error")
    conversation = [{"from": "human", "value": "<image> and <image>?"},
                    {"from": "gpt", "value": "ok"}]
    row = rows({"image": [wide, tall], "conversations": conversation})
    positions = np.flatnonzero(row["tokens"] == P)
    assert positions.size == 17 + 17
    assert positions[17] - positions[16] == 1 + len(" and ")   # two marks: nothing moved
    assert row["image_is_newline"].sum() == 2
    assert row["image_is_newline"][positions[16]] and row["image_is_newline"][positions[33]]
    pixels = row["pixel_values"]
    # Wide: red rows 16..47 of a 64 x 64 grey canvas -> rows 8..23 of 32; tall: columns.
    np.testing.assert_array_equal(pixels[0, 0, 16], (127, 127, 127))
    np.testing.assert_array_equal(pixels[0, 16, 16], RED)
    np.testing.assert_array_equal(pixels[1, 16, 0], (127, 127, 127))
    np.testing.assert_array_equal(pixels[1, 16, 16], (30, 200, 30))
    np.testing.assert_array_equal(pixels[2:], 0)
    second = row["image_source_index"][positions[17:33], 0]
    np.testing.assert_array_equal(second, 16 + np.arange(16))   # view 1's tokens, in order
    single = rows({"image": wide, "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                    {"from": "gpt", "value": "ok"}]})
    assert (single["tokens"] == P).sum() == 52
    # The released geometry: 384 px in 14 px patches -> 27 x 27 = 729 tokens + 1 newline.
    full = md.ImageProcessor(384, 14, 4, 6)
    assert full.num_tokens((1000, 500), pad_to_square=True) == 730
    assert full.num_tokens((1000, 500)) > 730


# --- llada_plain (stage 1) ----------------------------------------------------------------------
def test_plain_stage1_row_by_hand():
    """`<image>` + caption + "\\n": no BOS, no template, the instruction dropped; 16 flat image
    tokens (no newline); the caption and the EOS padding (the stage-1 collator pads labels with
    EOS) are labelled."""
    c = llada_v_tiny.get_config("stage1")
    processor = md.ImageProcessor.from_config(c)
    rows = md.MultimodalRows(TOK, processor, seq_len=40, max_views=1, bad_records="error")
    row = rows({"image": np.zeros((32, 32, 3), np.uint8), "conversations": [
        {"from": "human", "value": "Describe this: <image>"},
        {"from": "gpt", "value": "red circle"}]})
    ids = [P] * 16 + _chars("red circle\n")
    np.testing.assert_array_equal(row["tokens"], ids + [EOS] * (40 - 27))
    np.testing.assert_array_equal(row["maskable"], [False] * 16 + [True] * (40 - 16))
    np.testing.assert_array_equal(row["fill"], [False] * 27 + [True] * 13)
    assert "segment_ids" not in row     # stage 1 attends to (and trains on) its EOS padding
    assert not row["image_is_newline"].any()
    np.testing.assert_array_equal(row["image_source_index"][:16, 0], np.arange(16))
    prompt = md.encode_conversation([{"role": "user", "content": "<image>"}],
                                    [np.zeros((32, 32, 3), np.uint8)], TOK, processor,
                                    add_generation_prompt=True)
    assert prompt.ids == [P] * 16
    with pytest.raises(BadRecordError, match=r"r1: a 'llada_plain' \(stage 1\) record needs "
                                             r"exactly one human turn"):
        rows({"_origin": "r1", "image": np.zeros((32, 32, 3), np.uint8), "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "more"}, {"from": "gpt", "value": "b"}]})
    # The 8B stage-1 preset: one 384 px view of 27 x 27 = 729 tokens, no newline.
    full = md.ImageProcessor.from_config(llada_v.get_config("stage1"))
    assert full.num_tokens((640, 480)) == 729 and not full.newline
    views, plan = full(np.zeros((480, 640, 3), np.uint8))
    assert views.shape == (1, 384, 384, 3) and plan[0].shape == (729, 4) and not plan[2].any()
    stage1 = llada_v_tiny.get_config("stage1")
    stage1.vision.image_aspect_ratio = "anyres_max_4"
    with pytest.raises(ValueError, match=r"config.vision.image_aspect_ratio: expected 'square' "
                                         r"with data.conversation_format='llada_plain'"):
        md.ImageProcessor.from_config(stage1)


def test_presets_follow_the_released_stages():
    stage1, stage2 = llada_v.get_config("stage1"), llada_v.get_config("stage2")
    assert stage1.data.conversation_format == "llada_plain"
    assert stage1.vision.image_aspect_ratio == "square" and stage1.train.objective == "sft"
    assert stage1.train.trainable == "projector"
    assert stage2.data.conversation_format == "llava_llada"
    assert stage2.data.system_message == OFFICIAL_SYSTEM
    assert stage2.train.objective == "masked_response"
    assert stage2.vision.image_aspect_ratio == "anyres_max_4"
    assert stage1.data.label_eos_padding and not stage2.data.label_eos_padding
    tiny = llada_v_tiny.get_config()
    assert tiny.train.objective == "masked_response" and tiny.data.label_eos_padding
    source = sources.open_source(sources.parse_image_source_spec("shapes"),
                                 sources.SourceOptions.from_config(llada_v_tiny.get_config("stage1")))
    record = source[0]
    assert record["conversations"][0]["value"] == "<image>"
    colour, shape = record["conversations"][1]["value"].split(" ")
    assert colour in ("red", "green", "blue", "yellow")
    assert shape in ("square", "circle", "triangle")
    with pytest.raises(ValueError, match=r"config.data.conversation_format: expected one of"):
        bad = llada_v_tiny.get_config()
        bad.data.conversation_format = "llava_v1"
        md.ImageProcessor.from_config(bad)


# --- bad data: one line naming file:line and the image (issue 12) -------------------------------
def _one_line(error):
    message = str(error)
    assert "\n" not in message, message
    return message


def test_bad_images_and_records_are_one_line_with_file_and_line(tmp_path, monkeypatch):
    good = _png(tmp_path / "good.png", 32, 32)
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    _png(tmp_path / "huge.png", 64, 64)
    conversation = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    lines = [json.dumps({"image": "missing.png", "conversations": conversation}),
             json.dumps({"image": "truncated.png", "conversations": conversation}),
             json.dumps({"image": "huge.png", "conversations": conversation}),
             '{"image": "good.png", "conversations": [',
             json.dumps([{"image": "good.png"}]),
             json.dumps({"image": 5, "conversations": conversation}),
             json.dumps({"image": good, "conversations": [{"from": "human", "value": 3}]})]
    path = tmp_path / "data.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "\xff"}\n')
    # PIL refuses images above 2 x MAX_IMAGE_PIXELS as decompression bombs: 64 x 64 > 2 x 1500
    # (and 32 x 32 is below the limit).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    source = sources.LlavaFilesSource(str(path))
    rows = md.MultimodalRows(TOK, _processor(), 80, 1, "error")
    expected = {
        1: f"image file not found: {tmp_path / 'missing.png'}",
        2: f"cannot read image {tmp_path / 'truncated.png'}: ",
        3: f"cannot read image {tmp_path / 'huge.png'}: too large to decode safely",
        4: "malformed JSON",
        5: "expected a JSON object, found a JSON list",
        6: "field 'image' must be a path or a list of paths, found 5",
        7: "needs a string 'content'",
        8: "not valid UTF-8"}
    for line, message in expected.items():
        with pytest.raises(BadRecordError) as caught:
            rows(source[line - 1])
        text = _one_line(caught.value)
        assert text.startswith(f"{path}:{line}: ") and message in text, text
    assert md.MultimodalRows(TOK, _processor(), 80, 1, "skip")(source[1]) is None

    # Through the grain pipeline the first bad record surfaces as the same one-line error.
    c = llada_v_tiny.get_config()
    c.data.source = f"files:{path}"
    c.data.shuffle = False
    iterator = iter(pipeline.build_dataset(c, TOK, batch_size=1, process_index=0, process_count=1))
    with pytest.raises(BadRecordError) as caught:
        next(iterator)
    assert _one_line(caught.value) == f"{path}:1: image file not found: {tmp_path / 'missing.png'}"


def test_broken_json_list_files_name_file_and_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"image": "a.png",\n  "conversations": [}\n]\n')
    with pytest.raises(ValueError) as caught:
        sources.LlavaFilesSource(str(broken))
    assert _one_line(caught.value).startswith(f"config.data.source: {broken}:3: not valid JSON")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'[\n {"a": 1},\n {"b": "\xff"}\n]\n')
    with pytest.raises(ValueError, match=rf"config.data.source: {binary}:3: not UTF-8 text"):
        sources.LlavaFilesSource(str(binary))
    trailing = tmp_path / "trailing.json"
    trailing.write_text('[{"a": 1}]\n[]\n')
    with pytest.raises(ValueError, match=rf"{trailing}:1: unexpected data after the closing"):
        sources.LlavaFilesSource(str(trailing))
    listed = tmp_path / "records.json"
    listed.write_text('[{"id": 0},\n\n  {"id": 1}, {"id": 2},\n 7]')
    assert [(line, r) for line, r in sources.read_json_list(str(listed))] == [
        (1, {"id": 0}), (3, {"id": 1}), (3, {"id": 2}), (4, 7)]
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ")
    assert sources.read_json_list(str(empty)) == []


def test_expand_to_square_offsets_by_hand():
    """expand2square: a 5 x 2 image lands at rows (5 - 2) // 2 = 1..2 of a 5 x 5 canvas of
    (127, 127, 127); a 2 x 5 image at columns 1..2; a square image is returned unchanged."""
    from llada_jax.data import images

    wide = images.expand_to_square(Image.new("RGB", (5, 2), RED))
    pixels = np.asarray(wide)
    assert wide.size == (5, 5)
    assert (pixels[1:3] == RED).all() and (pixels[[0, 3, 4]] == 127).all()
    pixels = np.asarray(images.expand_to_square(Image.new("RGB", (2, 5), RED)))
    assert (pixels[:, 1:3] == RED).all() and (pixels[:, [0, 3, 4]] == 127).all()
    square = Image.new("RGB", (3, 3), RED)
    assert images.expand_to_square(square) is square


# --- parity with the released preprocessing on a byte-level BPE (transformers) ----------------
def _official_rows(hf_tokenizer, conversations, system_message):
    """LLaDA-V's `preprocess_multimodal` + `preprocess_llada`, restated with transformers'
    `apply_chat_template` and the reference's own training template: (input_ids, labels),
    -200 at the (single) image token, -100 where not labelled."""
    template = ("{% for message in messages %}{{'<|startoftext|>' + '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>' + '\n\n' + message['content'] + "
                "'<|eot_id|>'}}{% endfor %}{% if add_generation_prompt %}{{ "
                "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    hf_tokenizer.chat_template = template
    image_index = hf_tokenizer.convert_tokens_to_ids("<image>")
    unmask = {hf_tokenizer.convert_tokens_to_ids(t) for t in
              ["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "\n\n"]}
    for sentence in conversations:          # preprocess_multimodal
        value = sentence["value"]
        if value.count("<image>") == 1 and not value.startswith("<image>"):
            value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
        sentence["value"] = value
    def apply(messages):       # newer transformers return a dict of fields
        out = hf_tokenizer.apply_chat_template(messages)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    input_id = apply([{"role": "system", "content": system_message}])
    target = [-100] * len(input_id)
    for turn in conversations:
        role = {"human": "user", "gpt": "assistant"}[turn["from"]]
        encode_id = apply([{"role": role, "content": turn["value"]}])[1:]
        input_id += encode_id
        target += [-100] * len(encode_id) if role == "user" else encode_id
    for i, token in enumerate(input_id):
        if token in unmask:
            target[i] = token
        if token == image_index:
            input_id[i] = -200
    return input_id, target


def test_rows_match_the_released_preprocessing_on_a_bpe_tokenizer(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|eot_id|>", "<|startoftext|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|mdm_mask|>", "<image>"]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        [OFFICIAL_SYSTEM, "What is this?\n\nA red circle.", "Tell me a joke about cats.",
         "  Why did the cat sit on the computer?\n"] * 3,
        trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    from llada_jax.data.tokenizer import HFTokenizer

    ours = HFTokenizer(str(tmp_path))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    conversation = [{"from": "human", "value": "  What is this? <image>\n"},
                    {"from": "gpt", "value": "A red circle. "},
                    {"from": "human", "value": "\n\nTell me a joke about cats."},
                    {"from": "gpt", "value": "  Why did the cat sit on the computer?\n"}]
    expected_ids, expected_labels = _official_rows(reference, [dict(t) for t in conversation],
                                                   OFFICIAL_SYSTEM)
    rows = md.MultimodalRows(ours, _default_processor(), seq_len=200, max_views=1,
                             bad_records="error")
    row = rows({"image": np.zeros((32, 32, 3), np.uint8), "conversations": conversation})
    used = int((~row["fill"]).sum())
    ids, labelled = row["tokens"][:used].tolist(), row["maskable"][:used].tolist()
    first = ids.index(P)     # our 17 image positions are the reference's one image token
    assert ids[first:first + 17] == [P] * 17
    ids, labelled = ids[:first + 1] + ids[first + 17:], labelled[:first + 1] + labelled[first + 17:]
    assert ids == expected_ids
    assert labelled == [t != -100 for t in expected_labels]
