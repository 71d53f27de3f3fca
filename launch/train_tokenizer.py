"""Trains a SentencePiece tokenizer on local files, with LLaDA's special tokens reserved.

    python launch/train_tokenizer.py --source='files:/data/text/*.jsonl' \\
        --output=/data/tokenizer/llada_sp.model --vocab_size=32000

`--source` takes the spec syntax of `config.data.source` (files:GLOB, tfds:NAME@SPLIT, mix:...).
Text comes from `--text_field` of each record; conversations (`messages` records) contribute the
content of every message. The special tokens (`<|pad|>`, `<|startoftext|>`, `<|endoftext|>`,
`<|mdm_mask|>`, the chat header markers, `<|eot_id|>`, `<image>`) get ids 1..8. Use the model with
`--config.data.tokenizer=sentencepiece:/data/tokenizer/llada_sp.model`.
"""

from __future__ import annotations

import itertools
import json

import program
from absl import flags

from llada_jax.data import sources
from llada_jax.data.tokenizer import SentencePieceTokenizer

_SOURCE = flags.DEFINE_string("source", None, "records to train on (a data.source spec)",
                              required=True)
_OUTPUT = flags.DEFINE_string("output", None, "path of the .model file to write", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "pieces, including the 265 reserved")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "record field holding the text")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 1_000_000,
                                      "documents read from the source (0: all of them)")
_CHARACTER_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995,
                                         "fraction of characters covered by pieces (the rest "
                                         "falls back to bytes)")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "prepared tfds datasets")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 4, "trainer threads")


def record_texts(record: dict, text_field: str) -> list[str]:
    """The texts of one record: its text field, or the contents of its messages."""
    text = record.get(text_field)
    if isinstance(text, str):
        return [text]
    messages = record.get("messages")
    if isinstance(messages, list):
        return [m["content"] for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return []


def main(argv: list[str]) -> None:
    del argv
    components = sources.parse_source_spec(_SOURCE.value)
    records = sources.record_dataset(components, tfds_data_dir=_TFDS_DATA_DIR.value,
                                     shuffle=True, seed=0, num_epochs=1)
    limit = _MAX_DOCUMENTS.value or len(records)
    texts = (t for record in itertools.islice(iter(records), limit)
             if sources.ERROR not in record
             for t in record_texts(record, _TEXT_FIELD.value) if t.strip())
    tokenizer = SentencePieceTokenizer.train(
        texts, _OUTPUT.value, vocab_size=_VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
        character_coverage=_CHARACTER_COVERAGE.value, num_threads=_NUM_THREADS.value)
    print(json.dumps({"model": _OUTPUT.value, "vocab_size": tokenizer.vocab_size,
                      "special_ids": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
                                      "mask": tokenizer.mask_id, "eot": tokenizer.eot_id,
                                      "image": tokenizer.image_id}}))


if __name__ == "__main__":
    program.run(main)
