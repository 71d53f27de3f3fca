"""Tokenizers behind one interface: the built-in character tokenizer, SentencePiece and Hugging Face.

Every tokenizer exposes `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size` and the
special ids the diffusion code needs (`mask_id`, `bos_id`, `eos_id`, `pad_id`, and for chat
`start_header_id`, `end_header_id`, `eot_id`). `render_chat(messages, add_generation_prompt)`
renders the LLaDA instruct format of REFERENCE.md section 1 as ids:

    <BOS><|start_header_id|>user<|end_header_id|>\\n\\n{text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

This module does no I/O beyond reading the tokenizer files it is pointed at.
"""

from __future__ import annotations

import json
import os
import string
from typing import Iterable, Sequence

SPECIAL_TOKENS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")


class Tokenizer:
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

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        ids = {self.mask_id, self.bos_id, self.eos_id, self.pad_id, self.start_header_id,
               self.end_header_id, self.eot_id}
        if self.image_id is not None:
            ids.add(self.image_id)
        return frozenset(ids)

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
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"chat role must be system, user or assistant, found {role!r}")
        return [*self.header(role), *self.encode(content), self.eot_id]


class CharTokenizer(Tokenizer):
    """Built-in character tokenizer: the special tokens, then printable ASCII.

    Needs no files, so the built-in tiny training job runs with no downloads. Characters outside
    its alphabet map to `unk_id`.
    """

    ALPHABET = string.printable  # 100 characters, includes "\n"

    def __init__(self) -> None:
        specials = SPECIAL_TOKENS + ("<|unk|>",)
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
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < self._num_special and skip_special:
                continue
            out.append(self._itos[i])
        return "".join(out)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special tokens were reserved as user-defined symbols."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()

        def piece(name: str, required: bool = True) -> int | None:
            i = self._sp.piece_to_id(name)
            if i == self._sp.unk_id() and name != self._sp.id_to_piece(self._sp.unk_id()):
                if required:
                    raise ValueError(f"SentencePiece model {model_path} has no special token "
                                     f"{name!r}; train it with launch/train_tokenizer.py")
                return None
            return i

        self.pad_id = piece("<|pad|>")
        self.bos_id = piece("<|startoftext|>")
        self.eos_id = piece("<|endoftext|>")
        self.mask_id = piece("<|mdm_mask|>")
        self.start_header_id = piece("<|start_header_id|>")
        self.end_header_id = piece("<|end_header_id|>")
        self.eot_id = piece("<|eot_id|>")
        self.image_id = piece("<image>", required=False)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` plus `tokenizer_config.json` (the released LLaDA format).

    Special ids are read from the files (e.g. mask 126336, EOS 126081, eot 126348 for LLaDA).
    """

    NAMES = {"bos_id": "<|startoftext|>", "eos_id": "<|endoftext|>", "mask_id": "<|mdm_mask|>",
             "start_header_id": "<|start_header_id|>", "end_header_id": "<|end_header_id|>",
             "eot_id": "<|eot_id|>"}

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as _HFTok

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {path}")
        self._tok = _HFTok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = os.path.join(directory, "tokenizer_config.json")
        self.chat_template = None
        if os.path.isfile(config_path):
            with open(config_path) as f:
                self.chat_template = json.load(f).get("chat_template")
        for attr, name in self.NAMES.items():
            i = self._tok.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer {path} has no special token {name!r} ({attr})")
            setattr(self, attr, i)
        self.pad_id = self.eos_id
        self.image_id = self._tok.token_to_id("<image>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`char`, `sentencepiece:PATH` or `hf:DIR` -> a Tokenizer."""
    if spec == "char":
        return CharTokenizer()
    kind, _, path = spec.partition(":")
    if kind == "sentencepiece" and path:
        return SentencePieceTokenizer(path)
    if kind == "hf" and path:
        return HFTokenizer(path)
    raise ValueError(f"config.data.tokenizer: expected 'char', 'sentencepiece:PATH' or "
                     f"'hf:DIR', found {spec!r}")
