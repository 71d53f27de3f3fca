"""HFTokenizer: special ids read from the files, and chats rendered like the released template.

Tokenizers are built here with the `tokenizers` library (a byte-level BPE trained on a few
sentences; a word-level vocabulary holding the real special tokens at their real ids). The chat
template is the real one from LLaDA's tokenizer_config.json, rendered with jinja2 the way
`transformers.apply_chat_template` renders it, then tokenized as one string as transformers does.
"""

import json
import os
import shutil

import jinja2.sandbox
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer

from llada_jax.data.tokenizer import HFTokenizer, load_tokenizer

# The real metadata from shared/hf_reference, copied into tests/data.
REAL = os.path.join(os.path.dirname(__file__), "data", "hf_reference",
                    "llada_v_language_tower")
REAL_CONFIG = os.path.join(REAL, "tokenizer_config.json")

# Llama-3 / cl100k-style pre-tokenizer pattern (newlines split off from the words after them).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Special tokens in the order the trainer numbers them (0, 1, 2, ...).
SPECIALS = ["<|endoftext|>", "<|eot_id|>", "<|startoftext|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|mdm_mask|>", "<image>"]
SENTENCES = [
    "What is two plus two? It is four.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Tell me a joke about cats.\n\nWhy did the cat sit on the computer?",
    "Hello! How can I help you today?",
    "Line one\n\nLine two\twith a tab, and café naïve 東京.",
] * 3

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "  Hi there!\n"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a joke about cats."}],
    [{"role": "user", "content": "Line one\n\nLine two\twith a tab, café naïve 東京 <image>"}],
]


def real_tokenizer_config() -> dict:
    with open(REAL_CONFIG) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json + the real tokenizer_config.json (template, token names)."""
    directory = tmp_path_factory.mktemp("bpe")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(directory / "tokenizer.json"))
    shutil.copy(REAL_CONFIG, directory / "tokenizer_config.json")
    return directory


def render_template(messages: list[dict]) -> str:
    """The real chat template, rendered with transformers' jinja settings."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(real_tokenizer_config()["chat_template"])
    return template.render(messages=messages, bos_token="<|startoftext|>",
                           add_generation_prompt=True)


def test_special_ids_are_read_from_the_file(bpe_dir):
    tok = HFTokenizer(str(bpe_dir))
    assert (tok.eos_id, tok.eot_id, tok.bos_id, tok.start_header_id, tok.end_header_id,
            tok.mask_id, tok.image_id) == (0, 1, 2, 3, 4, 5, 6)
    assert tok.pad_id == 0   # tokenizer_config.json: pad_token is <|endoftext|>
    with open(bpe_dir / "tokenizer.json") as f:
        saved = json.load(f)
    tokens = set(saved["model"]["vocab"]) | {t["content"] for t in saved["added_tokens"]}
    assert tok.vocab_size == len(tokens) > 256 + len(SPECIALS)
    assert tok.chat_template == real_tokenizer_config()["chat_template"]


def test_real_tokenizer_config_special_ids():
    config = real_tokenizer_config()
    ids = {token["content"]: int(i) for i, token in config["added_tokens_decoder"].items()}
    assert ids["<|mdm_mask|>"] == 126336
    assert ids["<|startoftext|>"] == 126080 and config["bos_token"] == "<|startoftext|>"
    assert ids["<|endoftext|>"] == 126081 and config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert (ids["<|start_header_id|>"], ids["<|end_header_id|>"], ids["<|eot_id|>"]) == \
        (126346, 126347, 126348)
    for name in HFTokenizer.NAMES.values():
        assert config["added_tokens_decoder"][str(ids[name])]["special"], name


def test_real_special_tokens_at_real_ids(tmp_path):
    """A vocabulary holding every real added token at its real id (sparse) is read correctly."""
    config = real_tokenizer_config()
    added = {token["content"]: int(i) for i, token in config["added_tokens_decoder"].items()}
    vocab = {"[UNK]": 0, "user": 1, "assistant": 2, "hello": 3, "world": 4, **added}
    tok = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(REAL_CONFIG, tmp_path / "tokenizer_config.json")

    hf_tok = load_tokenizer(f"hf:{tmp_path}")
    assert isinstance(hf_tok, HFTokenizer)
    assert (hf_tok.mask_id, hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == \
        (126336, 126080, 126081, 126081)
    assert (hf_tok.start_header_id, hf_tok.end_header_id, hf_tok.eot_id) == \
        (126346, 126347, 126348)
    ids = hf_tok.render_chat([{"role": "user", "content": "hello world"}])
    assert ids == [126080, 126346, 1, 126347, 3, 4, 126348, 126346, 2, 126347]
    assert hf_tok.decode(ids) == "user hello world assistant"


def test_template_renders_reference_format():
    # REFERENCE.md section 1, written out by hand.
    assert render_template(CONVERSATIONS[0]) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_render_chat_equals_real_template(bpe_dir, conversation):
    messages = CONVERSATIONS[conversation]
    tok = HFTokenizer(str(bpe_dir))
    text = render_template(messages)
    raw = RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    expected = raw.encode(text, add_special_tokens=False).ids   # as apply_chat_template does
    ids = tok.render_chat(messages)
    assert ids == expected
    assert tok.decode(ids, skip_special=False) == text
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.eot_id) == len(messages)


def test_turn_starts_with_its_header(bpe_dir):
    """The SFT code finds the trained part of a turn by the header's length."""
    tok = HFTokenizer(str(bpe_dir))
    for role in ("system", "user", "assistant"):
        for content in ("Hello!", " Why did the cat sit on the computer?", "\n\nLine one"):
            turn = tok.render_turn(role, content)
            header = tok.header(role)
            assert turn[:len(header)] == header
            assert tok.decode(turn[len(header):], skip_special=False) == \
                content.strip() + "<|eot_id|>"
    with pytest.raises(ValueError, match="role must be system, user or assistant"):
        tok.render_turn("tool", "x")


def test_missing_files_and_tokens_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(str(tmp_path))
    tok = RawTokenizer(models.WordLevel({"[UNK]": 0, "<|startoftext|>": 1, "<|endoftext|>": 2},
                                        unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"no special token '<\|mdm_mask\|>' \(mask_id\)"):
        HFTokenizer(str(tmp_path))
