"""The trainer's input: one dispatch point from `config.data` to a checkpointable batch iterator.

`make_train_iterator(config, tokenizer, mesh)` returns a grain `DatasetIterator` of host-local
batches (dicts of numpy arrays, this process's `batch_size / process_count` rows) whose
`get_state()` / `set_state()` resume on exactly the next batch:

  * `data.source = 'synthetic'` (the built-in corpus, `llada_jax.data.synthetic`) is built here:
        documents (host slice, seeded shuffle, repeated forever with a new order per epoch)
        -> [BOS if data.add_bos] + tokens + EOS
        -> concatenated and cut into windows of `train.seq_len` (grain ConcatThenSplit)
        -> batches of `tokens` int32 [rows, seq_len].
    Concatenation rather than per-document EOS padding: it is how LLaDA pre-trains (documents
    separated by EOS, attending across it), and no compute goes to padding. Only
    `data.packing = 'concat'` is offered for this corpus. With `data.num_workers > 0` grain's
    worker processes each build their share of the batches, so the batch order depends on
    the number of workers: resume with the same setting.
  * every other source (files, tfds, synthetic_chat, mixtures; SFT conversations) goes through
    `llada_jax.data.pipeline`, the project's data pipeline;
  * with `vision.enabled` (LLaDA-V), image-text conversations go through
    `llada_jax.data.multimodal_data` (`shapes`, LLaVA `files:GLOB`).

`make_eval_iterator` gives the evaluation batches (`data.eval_source`): the same first batches
at every evaluation.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from llada_jax import parallel
from llada_jax.data.synthetic import SyntheticTextSource
from llada_jax.data.tokenizer import Tokenizer

SYNTHETIC = "synthetic"


class _EncodeDocument:
    """{"text": str} -> {"tokens": int32 [n]} = [BOS] + encode(text) + [EOS]."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool) -> None:
        self.tokenizer, self.add_bos = tokenizer, add_bos

    def __call__(self, document: dict[str, str]) -> dict[str, np.ndarray]:
        ids = [*self.tokenizer.encode(document["text"]), self.tokenizer.eos_id]
        if self.add_bos:
            ids = [self.tokenizer.bos_id, *ids]
        return {"tokens": np.asarray(ids, np.int32)}


def _is_full_window(window: dict[str, np.ndarray]) -> bool:
    return int(window["tokens_segment_ids"][-1]) != 0


def _window_to_batch_row(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # ConcatThenSplit also emits per-document positions and segment ids; in concat mode
    # documents attend to each other, so only the tokens are kept.
    return {"tokens": window["tokens"]}


def _synthetic_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str,
                       rows: int, shuffle: bool, repeat: bool) -> grain.IterDataset:
    data, train = config.data, config.train
    if data.packing != "concat":
        raise ValueError(f"config.data.packing: expected 'concat' with "
                         f"data.source='{SYNTHETIC}' (the built-in corpus is concatenated), "
                         f"found {data.packing!r}")
    documents = grain.MapDataset.source(
        SyntheticTextSource(data.synthetic_size, seed=train.seed, split=split))
    # Each host reads its own slice of the documents.
    documents = documents[jax.process_index()::jax.process_count()]
    if shuffle:
        documents = documents.shuffle(seed=train.seed)
    if repeat:
        documents = documents.repeat(None)
    documents = documents.map(_EncodeDocument(tokenizer, data.add_bos))
    stream = documents.to_iter_dataset(grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size))
    windows = grain.experimental.ConcatThenSplitIterDataset(
        stream, length_struct={"tokens": train.seq_len})
    # Only full windows (the last one of a finite stream may be short).
    windows = windows.filter(_is_full_window)
    batches = windows.map(_window_to_batch_row).batch(rows, drop_remainder=True)
    if data.num_workers > 0:
        # grain's worker processes read absl flags; a library caller may not have parsed any.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
    return batches


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                        mesh: Mesh | None = None) -> grain.DatasetIterator:
    """This host's training batches, forever, as a checkpointable grain iterator.

    `mesh` is accepted so that callers need not know which sources care about the device
    layout; batches are host-local and become global arrays in `parallel.global_batch`.
    """
    del mesh
    rows = parallel.per_host_batch_size(config.train.batch_size)
    if config.vision.enabled:
        from llada_jax.data import multimodal_data

        dataset = multimodal_data.build_dataset(config, tokenizer)
    elif config.data.source == SYNTHETIC:
        dataset = _synthetic_dataset(config, tokenizer, "train", rows,
                                     shuffle=config.data.shuffle, repeat=True)
    else:
        from llada_jax.data import pipeline

        dataset = pipeline.build_dataset(config, tokenizer)
    return iter(dataset)


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                       mesh: Mesh | None = None) -> grain.DatasetIterator:
    """Evaluation batches of `data.eval_source` in a fixed order (a fresh iterator each call)."""
    del mesh
    source = config.data.eval_source
    if not source:
        raise ValueError("config.data.eval_source: expected a source spec (e.g. 'synthetic' or "
                         "'synthetic_chat@test') when train.eval_every > 0, found ''")
    rows = parallel.per_host_batch_size(config.train.batch_size)
    if config.vision.enabled:
        from llada_jax.data import multimodal_data

        dataset = multimodal_data.build_eval_dataset(config, tokenizer)
    elif source == SYNTHETIC:
        dataset = _synthetic_dataset(config, tokenizer, "eval", rows, shuffle=False, repeat=True)
    else:
        from llada_jax.data import pipeline

        dataset = pipeline.build_eval_dataset(config, tokenizer)
    return iter(dataset)
