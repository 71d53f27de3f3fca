"""Left-padded LLaDA-V prompts with the image fields of their sampling canvas (test helper).

Moved out of `llada_jax/data/multimodal_data.py`: the library's prompt batches are
`llada_jax.generation`'s; tests and tests/sampler_record.py build LLaDA-V sampler inputs with
this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llada_jax.data import multimodal_data


def prompt_batch(conversations: Sequence[multimodal_data.EncodedConversation], gen_length: int, pad_id: int,
                 mask_id: int, max_views: int, image_size: int, tokens_per_view: int,
                 width: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompts (from `encode_conversation(..., add_generation_prompt=True)`) and the
    image fields of their sampling canvas [B, width + gen_length].

    Returns `tokens` int32 [B, width] and `mask` bool [B, width] (what `sampler.pad_prompts`
    gives), plus `schema.IMAGE_FIELDS` laid out over the canvas (prompt then gen_length
    generated positions, which hold no image).
    """
    longest = max(len(c.ids) for c in conversations)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest prompt ({longest} tokens)")
    batch = len(conversations)
    tokens = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), bool)
    for b, c in enumerate(conversations):
        tokens[b, width - len(c.ids):] = c.ids
        mask[b, width - len(c.ids):] = True
    canvas = np.concatenate([tokens, np.full((batch, gen_length), mask_id, np.int32)], axis=1)
    fields = multimodal_data.image_inputs(canvas, conversations, max_views, image_size, tokens_per_view)
    return {"tokens": tokens, "mask": mask, **fields}
