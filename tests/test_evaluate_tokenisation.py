"""Evaluation requests: joint context/continuation tokenisation and `file:line` record errors.

The tokenizer here is a hand-built BPE (explicit vocabulary and merges, GPT-2-style words that
carry their leading space), so every expected id is read off the table below by hand. The
expected pairs follow the official rule (LLaDA's `eval_llada.py` `_encode_pair`, as in
lm-evaluation-harness): trailing whitespace of the context moves into the continuation, the
whole text is tokenised once and the continuation is what follows the context's token count.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from llada_jax.data.eval_records import encode_pair, encode_requests, read_eval_records
from llada_jax.data.tokenizer import HFTokenizer
from tests.test_program_runner import one_device_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The 64-entry vocabulary: letters, then merged pieces, punctuation, digits, special tokens at
# the ids the tiny test models of tests/test_interop.py use (mask 60, BOS 59, EOS 61).
LETTERS = {chr(ord("a") + i): i for i in range(26)}               # a=0 ... z=25
PIECES = {" ": 26, "T": 27, "Th": 28, "The": 29, " c": 30, " ca": 31, " cat": 32, " s": 33,
          " sa": 34, " sat": 35, "\n": 36, "?": 37, ".": 38, ":": 39, "A": 40, "Q": 41, ",": 42}
DIGITS = {str(i): 43 + i for i in range(10)}                       # 0=43 ... 9=52
OTHER = {"!": 53, "'": 54, "-": 55, "(": 56, ")": 57}
SPECIAL = {"<|eot_id|>": 58, "<|startoftext|>": 59, "<|mdm_mask|>": 60, "<|endoftext|>": 61,
           "<|start_header_id|>": 62, "<|end_header_id|>": 63}
VOCAB = {**LETTERS, **PIECES, **DIGITS, **OTHER, **SPECIAL}
MERGES = [("T", "h"), ("Th", "e"), (" ", "c"), (" c", "a"), (" ca", "t"), (" ", "s"),
          (" s", "a"), (" sa", "t")]
# GPT-2-like pre-tokenisation: a word keeps the one space before it; other spaces stand alone.
WORDS = r" ?[^\s]+|\s+(?!\S)|\s+"


def write_bpe_tokenizer(directory) -> str:
    """Writes tokenizer.json of the hand-built BPE into `directory`; returns the directory."""
    assert sorted(VOCAB.values()) == list(range(64))
    tok = RawTokenizer(models.BPE(vocab=VOCAB, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORDS), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return HFTokenizer(write_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


def test_the_tokenizer_is_the_table(tokenizer):
    # Sanity of the fixture itself: " sat" is one token, "sat" alone is three letters.
    assert tokenizer.encode("The cat sat") == [29, 32, 35]
    assert tokenizer.encode("sat") == [18, 0, 19]
    assert tokenizer.encode("The cat ") == [29, 32, 26]
    assert (tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id) == (60, 59, 61)


@pytest.mark.parametrize("context, continuation, expected", [
    # The trailing space moves into the answer: " sat" (35), not " " (26) + s, a, t.
    ("The cat ", "sat", ([29, 32], [35])),
    # Already split the official way: unchanged.
    ("The cat", " sat", ([29, 32], [35])),
    # Several trailing whitespace characters (a newline too) all move.
    ("The cat \n", "sat", ([29, 32], [26, 36, 18, 0, 19])),
    # A context that is only whitespace becomes empty.
    (" ", "sat", ([], [35])),
])
def test_context_and_continuation_are_tokenised_jointly(tokenizer, context, continuation,
                                                         expected):
    assert encode_pair(tokenizer, context, continuation) == expected


def test_encode_requests_prefixes_bos_and_names_the_record(tokenizer):
    contexts, answers = encode_requests(tokenizer, ["The cat "], ["sat"], prefix=[59])
    assert (contexts, answers) == ([[59, 29, 32]], [[35]])
    # "The c" is [The, " c"] alone but "The cat" is [The, " cat"]: the answer "at" merges into
    # the context's last token and has none of its own.
    with pytest.raises(ValueError, match=r"eval\.jsonl:7: the answer 'at' gets no token"):
        encode_requests(tokenizer, ["The c"], ["at"], where=["eval.jsonl:7"])


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode())
    return str(path)


def test_records_are_read_with_their_location(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [
        json.dumps({"prompt": "The cat ", "answer": "sat"}), "",
        json.dumps({"question": "Q?", "choices": ["a", "b"], "label": 1})])
    located = read_eval_records(path)
    assert [where for where, _ in located] == [f"{path}:1", f"{path}:3"]
    assert located[1][1]["label"] == 1


GOOD = json.dumps({"prompt": "p", "answer": "a"})


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "p", "answer": ', r"not valid JSON"),
    (b"\xff\xfe{}\n", r"not UTF-8"),
    ('["prompt", "answer"]', r"expected a JSON object, found list"),
    ('{"prompt": "p"}', r"field 'answer' must be a string, found nothing \(missing\)"),
    ('{"prompt": "p", "answer": 3}', r"field 'answer' must be a string, found 3"),
    ('{"prompt": "p", "answer": ""}', r"field 'answer' is empty"),
    ('{"question": "q", "choices": ["a"], "label": 1}', r"field 'label' must be an integer in \[0, 1\)"),
    ('{"question": "q", "choices": [], "label": 0}', r"field 'choices' must be a non-empty list"),
    ('{"question": "q", "choices": ["a"], "label": true}', r"field 'label' must be an integer"),
    ('{"text": "t"}', r"expected \{'prompt', 'answer'\} or"),
])
def test_bad_records_name_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        read_eval_records(path)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data file not found: .*nope.jsonl"):
        read_eval_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        read_eval_records(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


# ------------------------------------------------------------------------------------------
# launch/evaluate.py end to end on a tiny checkpoint with the BPE above.


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A params checkpoint of the tiny reference LLaDA whose config names the BPE tokenizer."""
    from llada_jax.config import default_config
    from llada_jax.interop import hf
    from llada_jax.train.checkpoint import save_params
    from tests.test_interop import olmo_config, reference, save_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    hf_dir = root / "hf"
    save_checkpoint(hf_dir, reference(2, seed=3).state_dict(), olmo_config(2))
    model, params = hf.import_hf(str(hf_dir))
    config = default_config()
    for name, value in dataclasses.asdict(model).items():
        config.model[name] = value
    config.data.tokenizer = "hf:" + write_bpe_tokenizer(root / "tokenizer")
    save_params(str(root / "ckpt"), config, params)
    return root


def run_evaluate(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=one_device_xla_flags())
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
                          check=False)


def test_evaluate_mc_num_one_and_record_errors(tiny_checkpoint):
    root = tiny_checkpoint
    data = write_lines(root / "eval.jsonl", [
        json.dumps({"prompt": "The cat ", "answer": "sat"}),
        json.dumps({"question": "The cat ", "choices": ["sat", "a"], "label": 0})])
    # The README's `--mc_num=1` with the default --mc_batch_size=16: batches of one, said once.
    result = run_evaluate(f"--checkpoint={root / 'ckpt'}", f"--data={data}", "--mc_num=1",
                          f"--output={root / 'scores.jsonl'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--mc_num=1 is below --mc_batch_size=16; using batches of 1" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["likelihood"]["records"] == 1
    assert summary["multiple_choice"]["records"] == 1
    with open(root / "scores.jsonl") as f:
        scores = [json.loads(line) for line in f]
    assert len(scores[1]["scores"]) == 2 and scores[1]["prediction"] in (0, 1)

    bad = write_lines(root / "bad.jsonl", [GOOD, '{"prompt": "p", "answer": 3}'])
    result = run_evaluate(f"--checkpoint={root / 'ckpt'}", f"--data={bad}", "--mc_num=1")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{bad}:2: field 'answer' must be a string" in last
    assert "Traceback" not in result.stderr

    result = run_evaluate(f"--checkpoint={root / 'ckpt'}", f"--data={data}", "--mc_num=24")
    assert result.returncode != 0
    assert "--mc_num=24 must be a multiple of --mc_batch_size=16" in result.stderr
