"""The grain input pipeline: records -> token rows -> host-local batches, checkpointable.

    records (sources.record_dataset: pre-scan of local files -> shuffle -> repeat -> mix ->
             this host's every n-th record)
      -> pre-training: tokenize each document (+ EOS), then
           concat: concatenate documents and cut fixed windows of seq_len (LLaDA pre-training;
                   documents attend across the EOS separators; a final partial window is dropped)
           pack:   pack whole documents into rows (first-fit), with `segment_ids` 1, 2, ... per
                   document and 0 on padding; a document longer than seq_len is cut into
                   seq_len pieces first, so no token is lost
      -> SFT / masked_response: one chat row per conversation (`llada_jax.data.chat`): `tokens`,
         `maskable` and `fill` (`data.packing` is for pre-training only)
      -> batch of config.train.batch_size / process_count rows (this host's share)
      -> optional worker processes (config.data.num_workers, grain `mp_prefetch`)

Batches are dicts of host-local numpy arrays following the project's batch convention:
`tokens` int32 [B, L]; `segment_ids` int32 [B, L] (pack); `maskable` bool [B, L] (SFT: answer +
EOS padding; pack: every non-padding token); `fill` bool [B, L] (conversations: the EOS padding
that exists only because a row was padded to `seq_len`, a suffix of the row; the train step
trims each micro-batch to its longest row, as the official recipe pads only that far).
Positions are not emitted: RoPE depends only on position differences, so a packed document
gives the same logits wherever it sits in its row.

`iter(dataset)` is a grain `DatasetIterator`: `get_state()` (a small dict) and `set_state(state)`
resume on exactly the next batch, given the same config and process layout. (In concat mode
grain 0.2.18 keeps tuples in that dict, which a JSON round trip turns into lists;
`llada_jax.train.checkpoint` turns them back.)

Bad records. Local files (`files:`) are pre-scanned when the dataset is built, before any
batch: every line is decoded (UTF-8), parsed (a JSON object for `.jsonl`/`.json`) and checked
for the field the objective needs (`data.messages_field` with valid roles and contents, or a
non-empty `data.text_field`). The scan costs one JSON parse per record, about as long as
building the line index that opening the files takes anyway (52.7 MB of chat JSONL, 60k records:
index 17.9 s, scan 14.6 s on a 2-core box shared by 18 busy processes; an idle core is several
times faster). In exchange a bad line is reported before the first compile, as one line, instead
of inside grain's threads or worker processes after the first batches. Files larger in total than
`PRESCAN_MAX_BYTES` (1 GiB) are not pre-scanned (a log line says so); their records are
checked as they are read, with the same messages. What only tokenization can tell (a
conversation too long for `train.seq_len`) is always found as the record is read.

* `config.data.bad_records = 'error'` raises `BadRecordError` naming the record (`path:line:
  problem`; for the pre-scan, the first bad line of the files), also from grain's worker
  processes.
* `'skip'`: the pre-scan drops bad lines from the index and logs ONE warning with their count by
  kind and the first few `path:line`s; records found bad later are logged one by one (the first
  `LOGGED_SKIPS`, then at every power of two) with the running count. `skipped_records()` (per
  process: with worker processes every worker counts its own skips) and `skipped_summary()`
  give the totals.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from llada_jax.config import BAD_RECORDS, PACKINGS
from llada_jax.data import chat, sources
from llada_jax.data.tokenizer import Tokenizer

# Local files up to this total size are pre-scanned for bad records before training.
PRESCAN_MAX_BYTES = 1 << 30
# Records skipped at read time: each of the first LOGGED_SKIPS is logged, then powers of two.
LOGGED_SKIPS = 20
# Pre-scan warning: how many bad lines it names.
NAMED_BAD_LINES = 3

_SKIPPED: collections.Counter = collections.Counter()
# Pre-scan results by (files, sizes, mtimes, check): the eval set is rebuilt at every evaluation
# and must not be re-scanned (nor its skips re-counted) each time.
_SCANNED: dict[tuple, tuple[list[int], list[chat.BadRecordError]]] = {}


def skipped_records() -> dict[str, int]:
    """Bad records skipped in this process so far, by reason."""
    return dict(_SKIPPED)


def reset_skipped_records() -> None:
    _SKIPPED.clear()


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def skipped_summary() -> str:
    """One line with the number of bad records skipped in this process, by kind ('' if none)."""
    total = sum(_SKIPPED.values())
    if not total:
        return ""
    return (f"{total} bad record(s) skipped (config.data.bad_records='skip'): "
            f"{_counts_text(_SKIPPED)}")


def handle_bad_record(error: chat.BadRecordError, policy: str) -> None:
    """Raises `error` (policy 'error') or logs it and counts it by kind (policy 'skip')."""
    if policy == "error":
        raise error
    _SKIPPED[error.kind] += 1
    total = sum(_SKIPPED.values())
    if total <= LOGGED_SKIPS or total & (total - 1) == 0:  # the first ones, then powers of two
        logging.warning("skipping bad record %d (config.data.bad_records='skip'; so far in "
                        "process %d: %s): %s", total, os.getpid(), _counts_text(_SKIPPED), error)


def check_conversation(record: dict[str, Any], messages_field: str) -> None:
    """Raises BadRecordError unless the record holds a valid conversation."""
    chat.parse_messages(record, messages_field)


def check_document(record: dict[str, Any], text_field: str) -> str:
    """The record's text; BadRecordError if unreadable, missing, not a string or empty."""
    origin = str(record.get(sources.ORIGIN, ""))
    if sources.ERROR in record:
        raise chat.BadRecordError(origin, str(record[sources.ERROR]), "unreadable")
    text = record.get(text_field)
    if not isinstance(text, str):
        raise chat.BadRecordError(origin, f"expected a string in field {text_field!r} "
                                  f"(config.data.text_field), found "
                                  f"{type(text).__name__ if text is not None else 'no such field'}")
    if not text.strip():
        raise chat.BadRecordError(origin, "empty document", "empty")
    return text


def prescan(spec: sources.SourceSpec, source: Any, check: Callable[[dict[str, Any]], Any],
            policy: str, max_bytes: int | None = None) -> Any:
    """Checks every record of a local-files source before training (see the module docstring).

    Returns the source (policy 'error': unchanged, or raises the first bad record's
    BadRecordError), or a copy without its bad lines (policy 'skip'). Other sources, and files
    larger in total than `max_bytes`, are returned unchecked.
    """
    if not isinstance(source, sources.FileLinesSource):
        return source
    max_bytes = PRESCAN_MAX_BYTES if max_bytes is None else max_bytes
    if source.total_bytes > max_bytes:
        logging.info("data: files:%s holds %.1f GB, more than the pre-scan limit of %.1f GB; "
                     "its records are checked as they are read", spec.argument,
                     source.total_bytes / 1e9, max_bytes / 1e9)
        return source
    stats = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in source.paths)
    key = (tuple(source.paths), stats, repr(check), policy)
    if key in _SCANNED:
        bad_indices, errors = _SCANNED[key]
        if errors and policy == "error":
            raise errors[0]
        return source.without(bad_indices) if errors else source
    bad_indices, errors = [], []
    for index, record in source.iter_records():
        try:
            check(record)
        except chat.BadRecordError as error:
            if policy == "error":
                _SCANNED[key] = ([index], [error])
                raise
            bad_indices.append(index)
            errors.append(error)
    _SCANNED[key] = (bad_indices, errors)
    if not errors:
        return source
    counts = collections.Counter(error.kind for error in errors)
    _SKIPPED.update(counts)
    named = "; ".join(str(error) for error in errors[:NAMED_BAD_LINES])
    more = f"; and {len(errors) - NAMED_BAD_LINES} more" if len(errors) > NAMED_BAD_LINES else ""
    logging.warning("data: skipping %d bad record(s) of %d in files:%s "
                    "(config.data.bad_records='skip'; %s): %s%s", len(errors), len(source),
                    spec.argument, _counts_text(counts), named, more)
    if len(errors) == len(source):
        raise ValueError(f"config.data.source: every one of the {len(source)} records of "
                         f"files:{spec.argument} is bad; first: {errors[0]}")
    return source.without(bad_indices)


class DocumentTokens:
    """record -> {"tokens": int32 [n]} = [BOS] + encode(text) + [EOS], or None when skipped."""

    def __init__(self, tokenizer: Tokenizer, text_field: str, add_bos: bool,
                 bad_records: str) -> None:
        self.tokenizer, self.text_field = tokenizer, text_field
        self.add_bos, self.bad_records = add_bos, bad_records

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
        try:
            text = check_document(record, self.text_field)
        except chat.BadRecordError as error:
            handle_bad_record(error, self.bad_records)
            return None
        ids = self.tokenizer.encode(text)
        prefix = [self.tokenizer.bos_id] if self.add_bos else []
        return {"tokens": np.array([*prefix, *ids, self.tokenizer.eos_id], np.int32)}


class ChatRows:
    """(record, rng) -> one chat row {"tokens", "maskable", "fill"}, or None when skipped.

    `fill_maskable`: whether the EOS padding is trained on (objective 'sft') or never labelled
    ('masked_response').
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, multiturn: str, messages_field: str,
                 bad_records: str, fill_maskable: bool = True) -> None:
        self.tokenizer, self.seq_len, self.multiturn = tokenizer, seq_len, multiturn
        self.messages_field, self.bad_records = messages_field, bad_records
        self.fill_maskable = fill_maskable

    def __call__(self, record: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            messages = chat.parse_messages(record, self.messages_field)
            return chat.build_sft_example(messages, self.tokenizer, self.seq_len,
                                          self.multiturn, rng,
                                          origin=str(record.get(sources.ORIGIN, "")),
                                          fill_maskable=self.fill_maskable)
        except chat.BadRecordError as error:
            handle_bad_record(error, self.bad_records)
            return None


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


def to_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Copies a batch out of grain's shared memory, so it outlives the worker's buffer."""
    return {k: np.array(v) for k, v in batch.items()}


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a library caller may not have parsed any."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batch_and_prefetch(rows: grain.IterDataset, data: ml_collections.ConfigDict,
                       host_batch_size: int) -> grain.IterDataset:
    """Batches rows for this host and, with `data.num_workers`, prefetches in worker processes."""
    dataset = rows.batch(host_batch_size, drop_remainder=True)
    if data.num_workers > 0:
        ensure_absl_flags_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
        dataset = dataset.map(to_numpy)
    return dataset


def build_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  process_index: int | None = None, process_count: int | None = None,
                  source: str | None = None, shuffle: bool | None = None,
                  num_epochs: int | None = None, batch_size: int | None = None,
                  seed: int | None = None) -> grain.IterDataset:
    """This host's batches as a grain IterDataset (iterate it; its iterator is checkpointable).

    Defaults come from the config: `data.source`, `data.shuffle`, `data.num_epochs` (0: forever),
    `train.batch_size` (global; this host gets batch_size / process_count rows), `train.seed`.
    `process_index` / `process_count` default to `jax.process_index()` / `jax.process_count()`.
    """
    data, train = config.data, config.train
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    spec = data.source if source is None else source
    shuffle = data.shuffle if shuffle is None else shuffle
    num_epochs = data.num_epochs if num_epochs is None else num_epochs
    batch_size = train.batch_size if batch_size is None else batch_size
    seed = train.seed if seed is None else seed
    seq_len = train.seq_len
    if batch_size % process_count:
        raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the number "
                         f"of processes ({process_count})")
    if data.bad_records not in BAD_RECORDS:
        raise ValueError(f"config.data.bad_records: expected one of {BAD_RECORDS}, "
                         f"found {data.bad_records!r}")
    if spec.startswith("synthetic") and not spec.startswith("synthetic_chat"):
        raise ValueError(f"config.data.source={spec!r} is the built-in pre-training corpus, "
                         f"served by llada_jax.train.input, not by the file/tfds pipeline")

    conversations = train.objective in ("sft", "masked_response")
    if conversations:
        check = functools.partial(check_conversation, messages_field=data.messages_field)
    else:
        check = functools.partial(check_document, text_field=data.text_field)
    records = sources.record_dataset(
        sources.parse_source_spec(spec), tfds_data_dir=data.tfds_data_dir,
        synthetic_size=data.synthetic_size, process_index=process_index,
        process_count=process_count, shuffle=shuffle, seed=seed, num_epochs=num_epochs or None,
        screen=functools.partial(prescan, check=check, policy=data.bad_records))
    read_options = grain.ReadOptions(num_threads=data.read_threads,
                                     prefetch_buffer_size=data.prefetch_buffer_size)

    if conversations:
        rows = records.random_map(
            ChatRows(tokenizer, seq_len, data.sft_multiturn, data.messages_field,
                     data.bad_records, fill_maskable=train.objective == "sft"), seed=seed)
        dataset = rows.to_iter_dataset(read_options)
    else:
        documents = records.map(DocumentTokens(tokenizer, data.text_field, data.add_bos,
                                               data.bad_records)).to_iter_dataset(read_options)
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
            raise ValueError(f"config.data.packing: expected one of {PACKINGS}, "
                             f"found {data.packing!r}")

    return batch_and_prefetch(dataset, data, batch_size // process_count)


def build_eval_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """Batches of `config.data.eval_source`, unshuffled and repeated: a fresh iterator always
    starts with the same batches, and any number of them is available."""
    if not config.data.eval_source:
        raise ValueError("config.data.eval_source is empty; set it to a source spec such as "
                         "'synthetic_chat@test' or 'files:/data/eval/*.jsonl'")
    return build_dataset(config, tokenizer, process_index=process_index,
                         process_count=process_count, source=config.data.eval_source,
                         shuffle=False, num_epochs=0)
