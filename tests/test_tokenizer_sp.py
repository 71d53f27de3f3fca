"""SentencePiece: training with reserved special tokens, exact round trips, chat rendering."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "über", "naïve", "x = 42;",
         "def f(a, b):", "    return a")


def _corpus(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(WORDS[i] for i in rng.integers(len(WORDS), size=10)) +
            ("\n\n  indented line" if k % 3 == 0 else "") for k in range(n)]


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> SentencePieceTokenizer:
    path = str(tmp_path_factory.mktemp("sp") / "tok.model")
    return SentencePieceTokenizer.train(_corpus(1500), path, vocab_size=400)


def test_special_tokens_take_reserved_ids(sp):
    # <unk> is 0, then SPECIAL_TOKENS in order: <|pad|>=1, <|startoftext|>=2, <|endoftext|>=3,
    # <|mdm_mask|>=4, <|start_header_id|>=5, <|end_header_id|>=6, <|eot_id|>=7, <image>=8.
    assert sp.vocab_size == 400
    assert (sp.bos_id, sp.eos_id, sp.mask_id) == (2, 3, 4)
    assert (sp.start_header_id, sp.end_header_id, sp.eot_id, sp.image_id) == (5, 6, 7, 8)
    assert sp.pad_id == sp.eos_id  # EOS pads, as in LLaDA
    for i, name in enumerate(SPECIAL_TOKENS, start=1):
        assert sp.encode(name) == [i]  # never split into pieces


def test_round_trip_is_byte_exact(sp):
    texts = ["hello\n\nworld   spaced\ttab", "über naïve 😀 漢字", "  leading and trailing  ",
             "\n", "x = 42;\ndef f(a, b):\n    return a", "digits 1234567890"]
    for text in texts:
        ids = sp.encode(text)
        assert all(0 <= i < sp.vocab_size for i in ids)
        assert sp.decode(ids) == text
    # Ordinary text never produces a special id (they only come from their literal spelling).
    for text in _corpus(50):
        assert not set(sp.encode(text)) & set(range(1, 9))


def test_specials_inside_text_and_decode_skipping(sp):
    ids = sp.encode("a<|mdm_mask|>b<|eot_id|>")
    assert ids.count(sp.mask_id) == 1 and ids.count(sp.eot_id) == 1
    assert sp.decode(ids) == "ab"
    assert sp.decode(ids, skip_special=False) == "a<|mdm_mask|>b<|eot_id|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sp.decode([sp.vocab_size])


def test_chat_rendering_matches_the_llada_format(sp):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = sp.render_chat(messages)
    expected = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert sp.decode(ids, skip_special=False) == expected
    assert ids.count(sp.bos_id) == 1 and ids[0] == sp.bos_id


def test_pickles_for_worker_processes_and_loads_by_spec(sp):
    clone = pickle.loads(pickle.dumps(sp))
    assert clone.encode("the cat sat") == sp.encode("the cat sat")
    loaded = load_tokenizer(f"sentencepiece:{sp.model_path}")
    assert loaded.mask_id == 4 and loaded.encode("über") == sp.encode("über")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must exceed the 265"):
        SentencePieceTokenizer.train(["abc"], str(tmp_path / "t.model"), vocab_size=100)
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))


def test_launch_program_trains_from_files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text in _corpus(600):
            f.write(json.dumps({"text": text}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "über question"},
                                         {"role": "assistant", "content": "answer"}]}) + "\n")
    output = tmp_path / "out" / "sp.model"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train_tokenizer.py"),
         f"--source=files:{corpus}", f"--output={output}", "--vocab_size=350",
         "--num_threads=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["vocab_size"] == 350 and report["special_ids"]["mask"] == 4
    tok = SentencePieceTokenizer(str(output))
    assert tok.decode(tok.encode("über question")) == "über question"


def test_failed_training_keeps_the_existing_model_and_says_why(tmp_path):
    # A good model first; then a run that must fail (the corpus has a few dozen distinct
    # pieces, far fewer than 5000): the old file stays byte-identical and no staging file is
    # left behind. Before: the model was truncated to 0 bytes and a C++ check was printed.
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text in _corpus(300):
            f.write(json.dumps({"text": text}) + "\n")
    output = tmp_path / "sp.model"
    SentencePieceTokenizer.train(_corpus(300), str(output), vocab_size=350)
    good = output.read_bytes()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train_tokenizer.py"),
         f"--source=files:{corpus}", f"--output={output}", "--vocab_size=5000",
         "--num_threads=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vocab_size=5000 is larger than this corpus supports: at most "
                           ), result.stderr[-2000:]
    assert "trainer_interface" not in result.stderr
    assert output.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "sp.model"]
    with pytest.raises(ValueError, match=r"^no text to train on"):
        SentencePieceTokenizer.train([], str(output), vocab_size=350)
    assert output.read_bytes() == good
