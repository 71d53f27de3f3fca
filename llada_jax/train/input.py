"""The trainer's input: `config.data` -> a checkpointable iterator of this host's batches.

Both functions are thin calls of `llada_jax.data.pipeline.build_dataset` (pre-training, SFT and
LLaDA-V alike); the iterator's `get_state()` / `set_state()` resume on exactly the next batch.
`mesh` is accepted so that callers need not know which sources care about the device layout;
batches are host-local and become global arrays in `parallel.global_batch`.
"""

from __future__ import annotations

import grain
import ml_collections
from jax.sharding import Mesh

from llada_jax.data import pipeline
from llada_jax.data.tokenizer import Tokenizer


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                        mesh: Mesh | None = None) -> grain.DatasetIterator:
    """This host's training batches of `data.source` as a checkpointable grain iterator."""
    del mesh
    return iter(pipeline.build_dataset(config, tokenizer, "train"))


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                       mesh: Mesh | None = None) -> grain.DatasetIterator:
    """Evaluation batches of `data.eval_source` in a fixed order (a fresh iterator each call)."""
    del mesh
    return iter(pipeline.build_dataset(config, tokenizer, "eval"))
