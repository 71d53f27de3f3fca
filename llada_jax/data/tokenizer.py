"""Tokenizers behind one interface: the built-in characters, SentencePiece and Hugging Face.

Every tokenizer exposes `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size` and the
special ids the diffusion code needs (`mask_id`, `bos_id`, `eos_id`, `pad_id`, and for chat
`start_header_id`, `end_header_id`, `eot_id`). `render_chat(messages, add_generation_prompt)`
renders the LLaDA instruct format of REFERENCE.md section 1 as ids:

    <BOS><|start_header_id|>user<|end_header_id|>\\n\\n{text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

This module does no I/O beyond reading the tokenizer files it is pointed at.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
import re
import string
import tempfile
from collections.abc import Iterable, Sequence
from typing import ClassVar

SPECIAL_TOKENS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")


class Tokenizer(abc.ABC):
    """Interface shared by every tokenizer of the project."""

    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    start_header_id: int
    end_header_id: int
    eot_id: int
    image_id: int | None = None
    # The special ids every tokenizer has, by the token that is each one (pad is EOS by default).
    NAMES: ClassVar[dict[str, str]] = {
        "bos_id": "<|startoftext|>", "eos_id": "<|endoftext|>", "mask_id": "<|mdm_mask|>",
        "start_header_id": "<|start_header_id|>", "end_header_id": "<|end_header_id|>",
        "eot_id": "<|eot_id|>"}

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without any special token."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens dropped unless `skip_special` is False."""

    @property
    def special_ids(self) -> frozenset[int]:
        ids = {getattr(self, attr) for attr in (*self.NAMES, "pad_id", "image_id")}
        return frozenset(ids - {None})  # image_id is None without an <image> token

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    add_bos: bool = True) -> list[int]:
        """Ids of a conversation in the LLaDA chat format (BOS only at the very start).

        `messages` are `{"role": "system"|"user"|"assistant", "content": str}` dicts. With
        `add_generation_prompt`, the assistant header that the model continues from is appended.
        """
        ids = [self.bos_id] if add_bos else []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', "
                                 f"found {message!r}")
            ids += self.render_turn(message["role"], message["content"])
        if add_generation_prompt:
            ids += self.header("assistant")
        return ids

    def header(self, role: str) -> list[int]:
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    def render_turn(self, role: str, content: str) -> list[int]:
        _check_role(role)
        # The released chat template trims each message (`| trim`).
        return [*self.header(role), *self.encode(content.strip()), self.eot_id]

    def _vocabulary_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as ints; ValueError for the first one outside the vocabulary."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


def _check_role(role: str) -> None:
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"chat role must be system, user or assistant, found {role!r}")


class CharTokenizer(Tokenizer):
    """Built-in character tokenizer: the special tokens, then printable ASCII.

    Needs no files, so the built-in tiny training job runs with no downloads. Characters outside
    its alphabet map to `unk_id`.
    """

    ALPHABET = string.printable  # 100 characters, includes "\n"

    def __init__(self) -> None:
        specials = (*SPECIAL_TOKENS, "<|unk|>")
        self._itos = list(specials) + list(self.ALPHABET)
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        (self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.start_header_id,
         self.end_header_id, self.eot_id, self.image_id, self.unk_id) = range(len(specials))
        self.pad_id = self.eos_id  # as in LLaDA: EOS pads, and padding is trained on
        self._num_special = len(specials)
        self.vocab_size = len(self._itos)

    def encode(self, text: str) -> list[int]:
        return [self._stoi.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return "".join(self._itos[i] for i in self._vocabulary_ids(ids)
                       if not (skip_special and i < self._num_special))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special tokens were reserved as user-defined symbols.

    Models made by `SentencePieceTokenizer.train` (and `launch/train_tokenizer.py`) hold `<unk>`
    at id 0 and `SPECIAL_TOKENS` at ids 1..8 in that order; text is kept byte-exact (identity
    normalisation, no dummy prefix, byte fallback), so `decode(encode(text)) == text` and the
    chat markup (`"\\n\\n"`, role names) encodes the same wherever it appears. As in LLaDA, EOS
    is also the padding id (`<|pad|>` stays reserved but unused).
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()

        def piece(name: str) -> int | None:
            """The id of a piece; None when the model lacks it (`piece_to_id` gives unk's id)."""
            i, unk = self._sp.piece_to_id(name), self._sp.unk_id()
            return None if i == unk and name != self._sp.id_to_piece(unk) else i

        for attr, name in self.NAMES.items():
            setattr(self, attr, piece(name))
            if getattr(self, attr) is None:
                raise ValueError(f"SentencePiece model {model_path} has no special token "
                                 f"{name!r}; train it with launch/train_tokenizer.py")
        self.pad_id = self.eos_id  # as in LLaDA: EOS pads, and padding is trained on
        self.image_id = piece("<image>")

    @classmethod
    def train(cls, texts: Iterable[str], model_path: str, vocab_size: int,
              model_type: str = "bpe", character_coverage: float = 1.0,
              input_sentence_size: int = 0, max_sentence_length: int = 1 << 16,
              num_threads: int = 1) -> SentencePieceTokenizer:
        """Trains a model on `texts`, writes it to `model_path` and returns its tokenizer.

        `SPECIAL_TOKENS` are reserved as user-defined symbols (ids 1..8 after `<unk>`), so they
        are never split and never produced from other text. `vocab_size` counts them, the 256
        byte-fallback pieces and `<unk>`. `input_sentence_size` > 0 samples that many texts.
        """
        import sentencepiece as spm

        reserved = 1 + len(SPECIAL_TOKENS) + 256
        if vocab_size <= reserved:
            raise ValueError(f"vocab_size must exceed the {reserved} reserved pieces (<unk>, "
                             f"{len(SPECIAL_TOKENS)} special tokens, 256 bytes), found "
                             f"{vocab_size}")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', found {model_type!r}")
        directory = os.path.dirname(os.path.abspath(model_path))
        os.makedirs(directory, exist_ok=True)
        # Written to a temporary file in the same directory and renamed over `model_path` only
        # once training succeeded: a failed run never truncates an existing good model.
        handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(model_path)}.",
                                           suffix=".tmp", dir=directory)
        try:
            with os.fdopen(handle, "wb") as model_file:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(texts), model_writer=model_file,
                    vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage,
                    user_defined_symbols=list(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1,
                    pad_id=-1, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
                    split_digits=True, allow_whitespace_only_pieces=True,
                    max_sentence_length=max_sentence_length,
                    input_sentence_size=input_sentence_size,
                    shuffle_input_sentence=input_sentence_size > 0, num_threads=num_threads,
                    minloglevel=2)
            os.replace(staging, model_path)
        except RuntimeError as e:  # SentencePiece reports every training failure this way
            raise ValueError(_training_error(str(e), vocab_size)) from None
        finally:
            if os.path.exists(staging):
                os.remove(staging)
        return cls(model_path)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [i for i in self._vocabulary_ids(ids) if not (skip_special and i in self.special_ids)]
        return self._sp.decode(ids)


def _training_error(message: str, vocab_size: int) -> str:
    """One line for a SentencePiece training failure (its message carries a C++ source
    location and an internal check), with the limit on vocab_size when it gives one."""
    limit = re.search(r"value <= (\d+)", message)
    if "Vocabulary size too high" in message and limit:
        return (f"vocab_size={vocab_size} is larger than this corpus supports: at most "
                f"{limit.group(1)} pieces (265 of them reserved) can be learnt from it; lower "
                f"vocab_size or add text")
    if "Vocabulary size is smaller than required_chars" in message:
        return (f"vocab_size={vocab_size} is smaller than the number of distinct characters "
                f"of the corpus; raise vocab_size or lower character_coverage")
    if "sentences_.empty()" in message:
        return "no text to train on: the corpus yielded no non-empty text"
    detail = " ".join(message.split("]")[-1].split()) if "]" in message else message
    return f"SentencePiece training failed: {detail or message}"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` plus `tokenizer_config.json` (the released LLaDA format).

    Special ids are read from the files (mask 126336, BOS 126080, EOS 126081, header 126346/7
    and eot 126348 for LLaDA); BOS/EOS/pad are the tokens `tokenizer_config.json` names, if any.
    Chat turns are rendered as the released chat template renders them (content stripped, as
    its `| trim` does) and tokenized as whole strings, as `apply_chat_template` tokenizes the
    rendered text; the special tokens split the text, so turns concatenate to the same ids.
    """

    # tokenizer_config.json fields that name a special token.
    CONFIG_NAMES: ClassVar[dict[str, str]] = {
        "bos_id": "bos_token", "eos_id": "eos_token", "pad_id": "pad_token"}

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as _HFTok

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {path}")
        self._tok = _HFTok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = pathlib.Path(directory, "tokenizer_config.json")   # optional
        tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = tokenizer_config.get("chat_template")
        names = dict(self.NAMES, pad_id=self.NAMES["eos_id"])
        for attr, field in self.CONFIG_NAMES.items():
            value = tokenizer_config.get(field)
            if isinstance(value, dict):   # {"content": "<|endoftext|>", "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                names[attr] = value
        for attr, name in names.items():
            i = self._tok.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer {path} has no special token {name!r} ({attr})")
            setattr(self, attr, i)
        self.image_id = self._tok.token_to_id("<image>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        kept = [int(i) for i in ids if not (skip_special and int(i) in self.special_ids)]
        return self._tok.decode(kept, skip_special_tokens=False)

    def _header_text(self, role: str) -> str:
        token = self._tok.id_to_token
        return f"{token(self.start_header_id)}{role}{token(self.end_header_id)}\n\n"

    def header(self, role: str) -> list[int]:
        return self.encode(self._header_text(role))

    def render_turn(self, role: str, content: str) -> list[int]:
        _check_role(role)
        return self.encode(f"{self._header_text(role)}{content.strip()}"
                           f"{self._tok.id_to_token(self.eot_id)}")


def load_tokenizer(spec: str) -> Tokenizer:
    """`char`, `sentencepiece:PATH` or `hf:DIR` -> a Tokenizer."""
    if spec == "char":
        return CharTokenizer()
    kind, _, path = spec.partition(":")
    by_kind = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
    if kind in by_kind and path:
        return by_kind[kind](path)
    raise ValueError(f"config.data.tokenizer: expected 'char', 'sentencepiece:PATH' or "
                     f"'hf:DIR', found {spec!r}")
