"""Interactive multi-turn chat with a LLaDA instruct checkpoint.

    python launch/chat.py --checkpoint=/ckpt/llada-instruct --gen_length=128 --steps=128
    printf 'Hi\\nWhat did I say?\\n' | python launch/chat.py --checkpoint=...
    python launch/chat.py --checkpoint=/ckpt/llada-v --image=photo.jpg     # LLaDA-V

Reads one user message per line from stdin (typed or piped), renders the whole conversation with
the chat template (REFERENCE.md section 1), samples the assistant's answer (up to its first EOS /
EoT) and prints it as `assistant: ...`. `/reset` starts a new conversation, `/quit` (or the end of
stdin) stops. Every sampler option is a flag, as in launch/generate.py.

The conversation is turned into a prompt by `Conversation.prompt_ids` and answered by a
`Responder`. With `--image` (a LLaDA-V checkpoint), the image is loaded once and attached to the
conversation's first user message (as `<image>\\n` before the text, unless the text places
`<image>` itself); the prompt then holds the image's placeholder positions and the responder
gives the sampler the image's views, whose tokens are computed once per answer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import program
import sampling_flags as sf
from absl import flags

_SYSTEM = flags.DEFINE_string("system", None, "optional system message")
_IMAGE = flags.DEFINE_string("image", None, "LLaDA-V checkpoints: an image file the "
                             "conversation is about (attached to the first user message)")

# prompt ids -> answer ids (without EOS / EoT)
Responder = Callable[[list[int]], list[int]]


class Conversation:
    """The messages of one chat and their rendering as prompt ids.

    image (LLaDA-V): a loaded PIL image and the `multimodal_data.ImageProcessor` of the
    checkpoint's config; the first user message then refers to it.
    """

    def __init__(self, tokenizer, system: str | None = None, image=None, processor=None):
        self.tokenizer = tokenizer
        self.system = system
        self.image, self.processor = image, processor
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def encoded(self):
        """The prompt with the image (`multimodal_data.EncodedConversation`)."""
        from llada_jax.data import multimodal_data as md

        messages = [dict(m) for m in self.messages]
        first_user = next(m for m in messages if m["role"] == "user")
        if md.IMAGE_MARK not in first_user["content"]:
            first_user["content"] = md.IMAGE_MARK + "\n" + first_user["content"]
        return md.encode_conversation(messages, [self.image], self.tokenizer, self.processor,
                                      add_generation_prompt=True)

    def prompt_ids(self) -> list[int]:
        if self.image is not None:
            return self.encoded().ids
        return self.tokenizer.render_chat(self.messages, add_generation_prompt=True)


def make_responder(config, model, params, tokenizer, mesh,
                   conversation: Conversation | None = None) -> Responder:
    """The sampler with the flags' settings; one compiled program per prompt-length bucket
    (--prompt_bucket). With a conversation about an image, its views go with the prompt."""
    sampler = sf.sampler_config(config, tokenizer)
    rng = jax.random.key(sf.seed(config))
    turns = [0]

    def respond(prompt: list[int]) -> list[int]:
        images = None
        if conversation is not None and conversation.image is not None:
            images = [conversation.encoded()]
        generated, _ = sf.run(config, model, params, mesh, [prompt], sampler, tokenizer.pad_id,
                              jax.random.fold_in(rng, turns[0]), images=images)
        turns[0] += 1
        return sf.answer_ids(generated[0], tokenizer)

    return respond


def load_image(path: str):
    """The --image file as a PIL image; exits with one line naming the file if it is bad."""
    from llada_jax.data import images

    try:
        return images.load_image(path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --image: {e}")


def image_processor(config, path: str):
    """How the checkpoint turns images into views; exits if it has no vision tower."""
    from llada_jax.data import multimodal_data

    if not config.vision.enabled:
        sys.exit(f"error: --image={path} needs a LLaDA-V checkpoint (its config has "
                 f"vision.enabled=False)")
    return multimodal_data.ImageProcessor.from_config(config)


def main(argv: list[str]) -> None:
    del argv
    image = load_image(_IMAGE.value) if _IMAGE.value else None   # before the slow part
    config, model, params, tokenizer, mesh = sf.load()
    processor = image_processor(config, _IMAGE.value) if _IMAGE.value else None
    conversation = Conversation(tokenizer, _SYSTEM.value, image, processor)
    respond = make_responder(config, model, params, tokenizer, mesh, conversation)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("user: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            conversation.reset()
            print("(new conversation)", flush=True)
            continue
        if not text.strip():
            continue
        conversation.messages.append({"role": "user", "content": text})
        try:
            answer = respond(conversation.prompt_ids())
        except ValueError as error:  # e.g. the conversation outgrew the model's length
            conversation.messages.pop()
            print(f"error: {error}", flush=True)
            continue
        reply = tokenizer.decode(answer)
        conversation.messages.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", flush=True)


if __name__ == "__main__":
    program.run(main)
