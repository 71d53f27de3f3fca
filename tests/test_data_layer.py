"""The data layer's single entry points: the source grammar, the conversation encoder's named
truncation policies, `pipeline.build_dataset` for every split, data validation, and the layering
(`llada_jax.data` never imports `llada_jax.model`).

Expected ids come from the CharTokenizer's definition (9 special tokens, then string.printable),
never from the encoder under test.
"""

import string
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.config import default_config
from llada_jax.data import chat, pipeline, sources
from llada_jax.data.schema import BadRecordError
from llada_jax.data.sources import SourceSpec
from llada_jax.data.synthetic import SyntheticTextSource
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.data.validation import check as validate

TOK = CharTokenizer()
BOS, EOS, START, END, EOT = 1, 2, 4, 5, 6


def _chars(text):
    return [9 + string.printable.index(ch) for ch in text]


def _turn(role, content):
    """The LLaDA chat format of one turn, by definition: <sh>role<eh>\\n\\n content <eot>."""
    return [START, *_chars(role), END, *_chars("\n\n"), *_chars(content), EOT]


def test_one_grammar_names_every_kind():
    assert sources.parse_source_spec("synthetic") == [SourceSpec("synthetic", "", "")]
    assert sources.parse_source_spec("synthetic@eval") == [SourceSpec("synthetic", "", "eval")]
    assert sources.parse_source_spec("shapes@test") == [SourceSpec("shapes", "", "test")]
    assert sources.parse_source_spec("llava:/d/*.json") == [SourceSpec("llava", "/d/*.json", "")]
    # With vision, files: holds LLaVA records; text sources are refused naming the field.
    assert sources.parse_image_source_spec("files:/d/*.jsonl") == SourceSpec(
        "llava", "/d/*.jsonl", "")
    with pytest.raises(ValueError, match=r"config.data.eval_source: expected an image-text"):
        sources.parse_image_source_spec("synthetic_chat", field="data.eval_source")
    for bad, message in [("synthetic@test", "synthetic splits are 'train' and 'eval'"),
                         ("shapes@dev", "shapes splits"),
                         ("mix:shapes=1", "a mixture takes tfds, files and synthetic_chat"),
                         ("llava:", "expected 'tfds")]:
        with pytest.raises(ValueError, match=message):
            sources.parse_source_spec(bad)


def test_records_carry_their_origin():
    shapes = sources.open_source(SourceSpec("shapes", "", "test"), synthetic_size=30)
    assert len(shapes) == 3 and shapes[2]["_origin"] == "shapes@test[2]"
    chats = sources.open_source(SourceSpec("synthetic_chat", "", "train"), synthetic_size=5)
    assert chats[4]["_origin"] == "synthetic_chat@train[4]"
    corpus = sources.open_source(SourceSpec("synthetic", "", ""), default_split="eval")
    assert corpus[7]["_origin"] == "synthetic@eval[7]"


CONVERSATION = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]


def test_truncation_policies_by_hand():
    # Turn lengths: user 8 + 1 + 1 = 10, assistant 13 + 1 + 1 = 15; BOS + all = 51 > 26.
    full = chat.encode_conversation(CONVERSATION, TOK)
    assert full.ids == [BOS, *_turn("user", "a"), *_turn("assistant", "b"),
                        *_turn("user", "c"), *_turn("assistant", "d")]
    oldest = chat.encode_conversation(CONVERSATION, TOK, max_length=26)
    assert oldest.ids == [BOS, *_turn("user", "c"), *_turn("assistant", "d")]
    assert oldest.maskable == [False] * (1 + 10 + 13) + [True, True]
    last = chat.encode_conversation(CONVERSATION, TOK, max_length=26,
                                    truncation="drop_last_exchange")
    assert last.ids == [BOS, *_turn("user", "a"), *_turn("assistant", "b")]
    assert last.maskable == [False] * (1 + 10 + 13) + [True, True]
    # Only the second answer trained: drop_oldest then cuts the prompt from the left, keeping
    # BOS and the assistant header before the answer (13 + 2 trained tokens + BOS = 16).
    cut = chat.encode_conversation(CONVERSATION, TOK, trained_turns={3}, max_length=16)
    assert cut.ids == [BOS, *_turn("assistant", "d")]
    with pytest.raises(BadRecordError, match="conversation too long"):
        chat.encode_conversation(CONVERSATION, TOK, trained_turns={3}, max_length=15,
                                 origin="x.jsonl:3")
    with pytest.raises(ValueError, match="truncation must be one of"):
        chat.encode_conversation(CONVERSATION, TOK, truncation="middle")


def test_llava_style_drops_the_last_exchange_by_default():
    head = [BOS, START, *_chars("system"), END, *_chars("\n\n"), EOT]      # empty system message
    encoded = chat.encode_conversation(CONVERSATION, TOK, style="llava_llada", system_message="",
                                       max_length=len(head) + 25)
    assert encoded.ids == [*head, *_turn("user", "a"), *_turn("assistant", "b")]
    structural = {BOS, START, END, EOT}
    answer = len(head) + 10
    assert encoded.maskable == [i in structural or k >= answer
                                for k, i in enumerate(encoded.ids)]


def _windows(documents, seq_len, rows):
    stream = [t for d in documents for t in [*TOK.encode(d), EOS]]
    return np.array([stream[i * seq_len:(i + 1) * seq_len] for i in range(rows)])


def test_build_dataset_serves_the_builtin_corpus_for_both_splits():
    c = default_config()
    c.train.batch_size, c.train.seq_len, c.data.synthetic_size = 2, 16, 50
    c.data.shuffle = False
    c.data.source = c.data.eval_source = "synthetic"
    for split, corpus_split in (("train", "train"), ("eval", "eval")):
        batch = next(iter(pipeline.build_dataset(c, TOK, split, process_index=0,
                                                 process_count=1)))
        documents = [SyntheticTextSource(50, seed=0, split=corpus_split)[i]["text"]
                     for i in range(10)]
        np.testing.assert_array_equal(batch["tokens"], _windows(documents, 16, 2))


def test_validation_lives_in_the_data_layer():
    c = default_config()
    c.data.source = "shapes"
    with pytest.raises(ValueError, match=r"config.data.source: expected a text source with "
                                         r"vision.enabled=False"):
        validate(c)
    c.data.source, c.data.eval_source = "synthetic", "llava:/x/*.json"
    with pytest.raises(ValueError, match=r"config.data.eval_source: expected a text source"):
        validate(c)


def test_data_never_imports_the_model():
    code = ("import sys; import llada_jax.data.pipeline, llada_jax.data.validation; "
            "bad = [m for m in sys.modules if m.startswith(('llada_jax.model', "
            "'llada_jax.train', 'llada_jax.diffusion'))]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
