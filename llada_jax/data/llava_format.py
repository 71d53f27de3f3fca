"""LLaDA-V's conversation formats and system message: the constants and the template choice.

Kept apart from the pipeline (grain, PIL) so that presets in `configs/` can name them cheaply.
What the formats produce is described in `llada_jax/data/chat.py`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from llada_jax.config import fail

# LLaDA-V's conversation formats (its `--version`): chat for stage 2, captions for stage 1.
LLAVA_LLADA = "llava_llada"
LLADA_PLAIN = "llada_plain"
CONVERSATION_FORMATS = (LLAVA_LLADA, LLADA_PLAIN)
# The system turn every `llava_llada` conversation starts with, in training and at inference
# (`conv_llava_llada.system` and the default of `preprocess_llada`, character for character).
LLAVA_SYSTEM_MESSAGE = ("You are a helpful language and vision assistant. You are able to "
                        "understand the visual content that the user provides, and assist the "
                        "user with a variety of tasks using natural language.")
# `conv_llada_plain.sep`: what ends a stage-1 caption.
PLAIN_SEPARATOR = "\n"


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation becomes a row: the format, the default system message, and whether the
    row's EOS padding is trained on.

    Built from `config.data.conversation_format` (default 'llava_llada'),
    `config.data.system_message` (default `LLAVA_SYSTEM_MESSAGE`) and
    `config.data.label_eos_padding` (default None: as the released recipe does for the format,
    i.e. stage 2 never, stage 1 up to the longest row; True is a deliberate deviation for models
    that must still learn to stop, see configs/llada_v_tiny.py); a config without these fields
    gets the defaults.
    """

    format: str = LLAVA_LLADA
    system_message: str = LLAVA_SYSTEM_MESSAGE
    label_eos_padding: bool | None = None

    def __post_init__(self) -> None:
        if self.format not in CONVERSATION_FORMATS:
            fail("data.conversation_format", f"one of {CONVERSATION_FORMATS}", self.format)
        if not isinstance(self.system_message, str):
            fail("data.system_message", "a string", self.system_message)
        if self.label_eos_padding not in (None, True, False):
            fail("data.label_eos_padding", "None (the released recipe), True or False",
                 self.label_eos_padding)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ConversationTemplate:
        return cls(config.data.get("conversation_format", LLAVA_LLADA),
                   config.data.get("system_message", LLAVA_SYSTEM_MESSAGE),
                   config.data.get("label_eos_padding", None))

    @property
    def fill_is_labelled(self) -> bool:
        """Whether the EOS padding of a row is trained on (and attended to): by default only in
        stage 1, whose released collator pads the labels with EOS (see multimodal_data.py)."""
        return (self.format == LLADA_PLAIN if self.label_eos_padding is None
                else self.label_eos_padding)


DEFAULT_TEMPLATE = ConversationTemplate()
