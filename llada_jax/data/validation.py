"""Checks of the config fields the data layer reads, before anything is built.

`check(config)` = `check_vision_data(config)` + `check_data(config)`. Spec syntax only: files are
opened when the pipeline is built. Every error is one `ValueError` line naming the field, the
expected and the found value (`config.data.source: expected ..., found ...`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llada_jax import config as config_lib
from llada_jax.config import BAD_RECORDS, CONVERSATION_OBJECTIVES, PACKINGS, SFT_MULTITURN
from llada_jax.data import sources
from llada_jax.data.llava_format import ConversationTemplate


def _fail(field: str, expected: str, found: Any) -> None:
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


def check(config: ml_collections.ConfigDict) -> None:
    """Checks the `data` section and the data side of `vision`; raises ValueError."""
    check_vision_data(config)
    check_data(config)


def check_vision_data(config: ml_collections.ConfigDict) -> None:
    """With `vision.enabled`: image processing fields, the objective, the conversation format."""
    v, t = config.vision, config.train
    if not v.enabled:
        return
    config_lib.anyres_max_tiles(v.image_aspect_ratio)
    if not isinstance(v.max_grid, int) or v.max_grid <= 0:
        _fail("vision.max_grid", "a positive integer", v.max_grid)
    if not isinstance(v.max_views, int) or v.max_views <= 0:
        _fail("vision.max_views", "a positive integer (pixel views per example)", v.max_views)
    if t.objective not in CONVERSATION_OBJECTIVES:
        _fail("train.objective", f"one of {CONVERSATION_OBJECTIVES} with vision.enabled=True "
              "(LLaDA-V trains the masked-response loss: responses are noised, images and "
              "prompts never)", t.objective)
    if not isinstance(config.data.image_folder, str):
        _fail("data.image_folder", "a directory or ''", config.data.image_folder)
    ConversationTemplate.from_config(config)  # format, system message, EOS-padding labels


def check_data(config: ml_collections.ConfigDict) -> None:
    """Checks the `data` section: choices, sizes and the source specs' syntax."""
    d = config.data
    if d.packing not in PACKINGS:
        _fail("data.packing", f"one of {PACKINGS}", d.packing)
    if d.sft_multiturn not in SFT_MULTITURN:
        _fail("data.sft_multiturn", f"one of {SFT_MULTITURN}", d.sft_multiturn)
    if d.bad_records not in BAD_RECORDS:
        _fail("data.bad_records", f"one of {BAD_RECORDS}", d.bad_records)
    for name in ("num_workers", "num_epochs"):
        if not isinstance(d[name], int) or d[name] < 0:
            _fail(f"data.{name}", "an integer >= 0", d[name])
    for name in ("pack_bins", "read_threads", "prefetch_buffer_size", "worker_buffer_size",
                 "synthetic_size"):
        if not isinstance(d[name], int) or d[name] <= 0:
            _fail(f"data.{name}", "a positive integer", d[name])
    parse = (sources.parse_image_source_spec if config.vision.enabled
             else sources.parse_source_spec)
    for name in ("source", "eval_source"):
        if name == "source" or d[name]:
            parse(d[name], field=f"data.{name}")
    if config.vision.enabled:
        return
    for name in ("source", "eval_source"):
        images = {s.kind for s in sources.parse_source_spec(d[name] or "synthetic")}
        if images & set(sources.IMAGE_KINDS):
            _fail(f"data.{name}", "a text source with vision.enabled=False (image-text records "
                  "need the LLaDA-V model)", d[name])
    kinds = {spec.kind for spec in sources.parse_source_spec(d.source)}
    if config.train.objective in CONVERSATION_OBJECTIVES and "synthetic" in kinds:
        _fail("data.source", f"a source of conversations for train.objective="
              f"'{config.train.objective}' (e.g. "
              "'synthetic_chat' or 'files:/data/sft/*.jsonl')", d.source)
