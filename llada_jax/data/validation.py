"""Checks of the config fields the data layer reads, before anything is built.

`check(config)`: with `vision.enabled`, the image processing fields, the objective and the
conversation format; then the `data` section's choices, sizes and source specs. Spec syntax
only: files are opened when the pipeline is built. Every error is one `ValueError` line naming
the field, the expected and the found value (`config.data.source: expected ..., found ...`).
"""

from __future__ import annotations

import ml_collections

from llada_jax import config as config_lib
from llada_jax.config import BAD_RECORDS, CONVERSATION_OBJECTIVES, PACKINGS, SFT_MULTITURN, fail
from llada_jax.data import sources
from llada_jax.data.llava_format import ConversationTemplate


def check(config: ml_collections.ConfigDict) -> None:
    """Checks the `data` section and the data side of `vision`; raises ValueError."""
    v, t = config.vision, config.train
    if v.enabled:
        config_lib.anyres_max_tiles(v.image_aspect_ratio)
        config_lib.check_fields("config.vision.{}", v, (
            ("max_grid", config_lib.POSITIVE_INT),
            ("max_views", (config_lib.POSITIVE_INT[0],
                           "a positive integer (pixel views per example)")),
        ))
        if t.objective not in CONVERSATION_OBJECTIVES:
            fail("train.objective", f"one of {CONVERSATION_OBJECTIVES} with vision.enabled=True "
                 "(LLaDA-V trains the masked-response loss: responses are noised, images and "
                 "prompts never)", t.objective)
        if not isinstance(config.data.image_folder, str):
            fail("data.image_folder", "a directory or ''", config.data.image_folder)
        ConversationTemplate.from_config(config)  # format, system message, EOS-padding labels
    d = config.data
    config_lib.check_fields("config.data.{}", d, (
        ("packing", config_lib.one_of(PACKINGS)),
        ("sft_multiturn", config_lib.one_of(SFT_MULTITURN)),
        ("bad_records", config_lib.one_of(BAD_RECORDS)),
        ("num_workers num_epochs", config_lib.INT_AT_LEAST_0),
        ("pack_bins read_threads prefetch_buffer_size worker_buffer_size synthetic_size",
         config_lib.POSITIVE_INT),
    ))
    parse = sources.parse_image_source_spec if v.enabled else sources.parse_source_spec
    components = {name: parse(d[name], field=f"data.{name}") for name in ("source", "eval_source")
                  if name == "source" or d[name]}
    if v.enabled:
        return
    kinds = {name: {spec.kind for spec in specs} for name, specs in components.items()}
    for name, source_kinds in kinds.items():
        if source_kinds & set(sources.IMAGE_KINDS):
            fail(f"data.{name}", "a text source with vision.enabled=False (image-text records "
                 "need the LLaDA-V model)", d[name])
    if t.objective in CONVERSATION_OBJECTIVES and "synthetic" in kinds["source"]:
        fail("data.source", f"a source of conversations for train.objective='{t.objective}' "
             "(e.g. 'synthetic_chat' or 'files:/data/sft/*.jsonl')", d.source)
