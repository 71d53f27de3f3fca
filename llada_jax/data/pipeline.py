"""The one input pipeline: records -> rows -> host-local batches, checkpointable.

`build_dataset(config, tokenizer, split)` serves pre-training, SFT and LLaDA-V alike:

    records (sources.record_dataset of `data.source`, or `data.eval_source` for split 'eval':
             pre-scan of local files -> shuffle -> repeat -> mix -> this host's share)
      -> pre-training: tokenize each document ([BOS if data.add_bos] + text + EOS), then
           concat: concatenate documents and cut fixed windows of seq_len (LLaDA pre-training;
                   documents attend across the EOS separators; a final partial window is dropped)
           pack:   pack whole documents into rows (first-fit), with `segment_ids` 1, 2, ... per
                   document and 0 on padding; a document longer than seq_len is cut into
                   seq_len pieces first, so no token is lost
      -> SFT / masked_response: one chat row per conversation (`chat.build_sft_example`):
         `tokens`, `maskable` and `fill` (`data.packing` is for pre-training only)
      -> LLaDA-V (`vision.enabled`): one row per image-text record
         (`multimodal_data.MultimodalRows`): `tokens`, `maskable`, `fill`, maybe `segment_ids`,
         and `schema.IMAGE_FIELDS`
      -> batch of config.train.batch_size / process_count rows (this host's share)
      -> optional worker processes (config.data.num_workers, grain `mp_prefetch`)

Batches follow `llada_jax.data.schema`. `fill` marks the EOS padding that exists only because a
row was padded to `seq_len` (a suffix; the train step trims each micro-batch to its longest row,
as the official recipe pads only that far). Positions are not emitted: RoPE depends only on
position differences, so a packed document gives the same logits wherever it sits in its row.
With `data.num_workers > 0` grain's worker processes each build their share of the batches, so
the batch order depends on the number of workers: resume with the same setting.

`iter(dataset)` is a grain `DatasetIterator`: `get_state()` (a small dict) and `set_state(state)`
resume on exactly the next batch, given the same config and process layout. (In concat mode
grain 0.2.18 keeps tuples in that dict, which a JSON round trip turns into lists;
`llada_jax.train.checkpoint` turns them back.) Bad records: `llada_jax.data.bad_records`.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections
import numpy as np

from llada_jax.config import BAD_RECORDS, CONVERSATION_OBJECTIVES, PACKINGS, fail
from llada_jax.data import chat, sources
from llada_jax.data.bad_records import RowBuilder, check_document, prescan
from llada_jax.data.multimodal_data import ImageProcessor, MultimodalRows
from llada_jax.data.schema import ORIGIN
from llada_jax.data.tokenizer import Tokenizer

SPLITS = ("train", "eval")


def _document_tokens(record: dict[str, Any], tokenizer: Tokenizer, text_field: str,
                     add_bos: bool) -> dict[str, np.ndarray]:
    """record -> {"tokens": int32 [n]} = [BOS] + encode(text) + [EOS]."""
    ids = tokenizer.encode(check_document(record, text_field))
    prefix = [tokenizer.bos_id] if add_bos else []
    return {"tokens": np.array([*prefix, *ids, tokenizer.eos_id], np.int32)}


def _chat_row(record: dict[str, Any], rng: np.random.Generator, tokenizer: Tokenizer,
              seq_len: int, multiturn: str, messages_field: str,
              fill_maskable: bool) -> dict[str, np.ndarray]:
    """(record, rng) -> one chat row {"tokens", "maskable", "fill"}. `fill_maskable`: whether
    the EOS padding is trained on (objective 'sft') or never labelled ('masked_response')."""
    return chat.build_sft_example(chat.parse_messages(record, messages_field), tokenizer,
                                  seq_len, multiturn, rng, origin=str(record.get(ORIGIN, "")),
                                  fill_maskable=fill_maskable)


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """A document longer than `seq_len` -> consecutive pieces of at most `seq_len` tokens."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def flat_map(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens = document["tokens"]
        return [{"tokens": tokens[i:i + self.seq_len]}
                for i in range(0, len(tokens), self.seq_len)]


def _full_window(window: dict[str, np.ndarray]) -> bool:
    # ConcatThenSplit pads the last window of a finite stream with segment id 0.
    return bool(np.all(window["tokens_segment_ids"] > 0))


def _window_tokens(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": window["tokens"].astype(np.int32)}


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["tokens_segment_ids"].astype(np.int32)
    return {"tokens": row["tokens"].astype(np.int32), "segment_ids": segment_ids,
            "maskable": segment_ids > 0}


def build_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                  split: str = "train", *, process_index: int | None = None,
                  process_count: int | None = None,
                  batch_size: int | None = None) -> grain.IterDataset:
    """This host's batches of `split` as a grain IterDataset (its iterator is checkpointable).

    Split 'train': `data.source`, shuffled by `data.shuffle`, `data.num_epochs` epochs (0:
    forever). Split 'eval': `data.eval_source`, unshuffled and repeated, so a fresh iterator
    always starts with the same batches and any number of them is available. Keywords override
    the config: `batch_size` (global, default `train.batch_size`; this host gets
    batch_size / process_count rows), `process_index` / `process_count` (default
    `jax.process_index()` / `jax.process_count()`). `config` is one that passed
    `config.validate` and `data.validation.check` (as launch/train.py and the trainer check it):
    sizes such as `data.synthetic_size` are not checked again here.
    """
    data, train = config.data, config.train
    if split not in SPLITS:
        raise ValueError(f"build_dataset: split must be one of {SPLITS}, found {split!r}")
    training = split == "train"
    field = "data.source" if training else "data.eval_source"
    source = data.source if training else data.eval_source
    if not source:
        fail(field, "a source spec (e.g. 'synthetic', 'synthetic_chat@test' or 'shapes@test') "
             "for evaluation batches", source)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    shuffle = data.shuffle if training else False
    batch_size = train.batch_size if batch_size is None else batch_size
    seed, seq_len = train.seed, train.seq_len
    if batch_size % process_count:
        raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the number "
                         f"of processes ({process_count})")
    if data.bad_records not in BAD_RECORDS:
        fail("data.bad_records", f"one of {BAD_RECORDS}", data.bad_records)

    vision = config.vision.enabled
    components = ([sources.parse_image_source_spec(source, field)] if vision
                  else sources.parse_source_spec(source, field))
    conversations = train.objective in CONVERSATION_OBJECTIVES
    screen = None
    if not vision:
        check = (functools.partial(chat.parse_messages, messages_field=data.messages_field)
                 if conversations else
                 functools.partial(check_document, text_field=data.text_field))
        screen = functools.partial(prescan, check=check, policy=data.bad_records)
    records = sources.record_dataset(
        components, sources.SourceOptions.from_config(config), process_index=process_index,
        process_count=process_count, shuffle=shuffle, seed=seed, screen=screen,
        num_epochs=(data.num_epochs if training else 0) or None, default_split=split)
    read_options = grain.ReadOptions(num_threads=data.read_threads,
                                     prefetch_buffer_size=data.prefetch_buffer_size)

    if vision:
        dataset = records.map(MultimodalRows(
            tokenizer, ImageProcessor.from_config(config), seq_len, config.vision.max_views,
            data.bad_records)).to_iter_dataset(read_options)
    elif conversations:
        dataset = records.random_map(RowBuilder(functools.partial(
            _chat_row, tokenizer=tokenizer, seq_len=seq_len, multiturn=data.sft_multiturn,
            messages_field=data.messages_field, fill_maskable=train.objective == "sft"),
            data.bad_records), seed=seed).to_iter_dataset(read_options)
    else:
        if components[0].kind == "synthetic" and data.packing != "concat":
            fail("data.packing", f"'concat' with {field}={source!r} (the built-in corpus is "
                 "concatenated)", data.packing)
        documents = records.map(RowBuilder(functools.partial(
            _document_tokens, tokenizer=tokenizer, text_field=data.text_field,
            add_bos=data.add_bos), data.bad_records)).to_iter_dataset(read_options)
        if data.packing == "concat":
            windows = grain.experimental.ConcatThenSplitIterDataset(
                documents, length_struct={"tokens": seq_len})
            dataset = windows.filter(_full_window).map(_window_tokens)
        elif data.packing == "pack":
            pieces = grain.experimental.FlatMapIterDataset(documents, SplitLongDocuments(seq_len))
            packed = grain.experimental.FirstFitPackIterDataset(
                pieces, length_struct={"tokens": seq_len}, num_packing_bins=data.pack_bins,
                seed=seed, shuffle_bins=shuffle, padding_struct={"tokens": tokenizer.pad_id})
            dataset = packed.map(_packed_row)
        else:
            fail("data.packing", f"one of {PACKINGS}", data.packing)

    dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
    if data.num_workers > 0:
        from absl import flags  # grain's workers read absl flags; a library may parse none

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
        # Copies of the batches: grain's shared memory is reused once the worker's buffer moves on.
        dataset = dataset.map(lambda batch: {k: np.array(v) for k, v in batch.items()})
    return dataset
