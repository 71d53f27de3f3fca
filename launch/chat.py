"""Interactive multi-turn chat with a LLaDA instruct checkpoint.

    python launch/chat.py --checkpoint=/ckpt/llada-instruct --gen_length=128 --steps=128
    printf 'Hi\\nWhat did I say?\\n' | python launch/chat.py --checkpoint=...
    python launch/chat.py --checkpoint=/ckpt/llada-v --image=photo.jpg     # LLaDA-V

Reads one user message per line from stdin (typed or piped), renders the whole conversation with
the chat template (REFERENCE.md section 1), samples the assistant's answer (up to its first EOS /
EoT) and prints it as `assistant: ...`. Every sampler option is a flag, as in launch/generate.py.

Commands (typed as a whole line):
  /reset   forget the conversation and start a new one (the --system message and the --image
           stay)
  /quit    stop (the end of stdin stops too)

The model sees at most `max_sequence_length - gen_length` prompt tokens. When the conversation
grows past that, its oldest turns (a user message and its answer) are dropped, and a note says so
once; a single message too long even on its own is refused with an `error:` line, and the chat
goes on. Logs are at WARNING level (--verbose shows INFO logs); errors are one `error:` line.

The conversation is turned into a prompt by `Conversation.prompt_ids` and answered by a
`Responder`. With `--image` (a LLaDA-V checkpoint), the image is loaded once and attached to the
conversation's first user message (as `<image>\\n` before the text, unless the text places
`<image>` itself); the prompt then holds the image's placeholder positions and the responder
gives the sampler the image's views, whose tokens are computed once per answer. A LLaDA-V
checkpoint without --image answers from the text alone, with a warning.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import jax
import program
import sampling_flags as sf
from absl import flags

from llada_jax.generation import Generator, answer_ids

_SYSTEM = flags.DEFINE_string("system", None, "optional system message")
_IMAGE = flags.DEFINE_string("image", None, "LLaDA-V checkpoints: an image file the "
                             "conversation is about (attached to the first user message)")

# prompt ids -> answer ids (without EOS / EoT)
Responder = Callable[[list[int]], list[int]]


class Conversation:
    """The messages of one chat and their rendering as prompt ids.

    image (LLaDA-V): a loaded PIL image, and `image_prompt` the generator's renderer of a
    conversation about images (`Generator.image_prompt`); the first user message refers to it.
    """

    def __init__(self, tokenizer, system: str | None = None, image=None,
                 image_prompt: Callable[[list[dict], list[Any]], Any] | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.image, self.image_prompt = image, image_prompt
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def encoded(self):
        """The prompt with the image (`multimodal_data.EncodedConversation`)."""
        return self.image_prompt(self.messages, [self.image])

    def prompt_ids(self) -> list[int]:
        if self.image is not None:
            return self.encoded().ids
        return self.tokenizer.render_chat(self.messages, add_generation_prompt=True)

    def drop_oldest_turn(self) -> bool:
        """Forgets the oldest user message and the answer to it; False when only the newest
        user message is left (nothing can be dropped)."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        first = users[0]
        end = first + 1
        while end < len(self.messages) and self.messages[end]["role"] != "user":
            end += 1   # the assistant's answer (every message up to the next user message)
        del self.messages[first:end]
        return True

    def fit(self, max_prompt_tokens: int) -> tuple[list[int], int]:
        """The prompt ids after dropping the oldest turns until they fit in max_prompt_tokens,
        and how many turns were dropped. ValueError when the newest message alone is too long."""
        dropped = 0
        ids = self.prompt_ids()
        while len(ids) > max_prompt_tokens:
            if not self.drop_oldest_turn():
                raise ValueError(f"the message is too long: its prompt has {len(ids)} tokens "
                                 f"and at most {max_prompt_tokens} fit beside the answer "
                                 f"(max_sequence_length minus --gen_length); shorten it")
            dropped += 1
            ids = self.prompt_ids()
        return ids, dropped


def make_responder(generator: Generator, conversation: Conversation, sampler) -> Responder:
    """The sampler with the flags' settings; one compiled program per prompt-length bucket
    (--prompt_bucket). With a conversation about an image, its views go with the prompt."""
    rng = jax.random.key(sf.seed(generator))
    turns = [0]

    def respond(prompt: list[int]) -> list[int]:
        images = [conversation.encoded()] if conversation.image is not None else None
        out = generator.generate_ids([prompt], sampler, seed=jax.random.fold_in(rng, turns[0]),
                                     images=images, prompt_bucket=sf.PROMPT_BUCKET.value)
        turns[0] += 1
        return answer_ids(out.tokens[0], generator.tokenizer)

    return respond


def load_image(path: str):
    """The --image file as a PIL image; ValueError / FileNotFoundError naming the file."""
    from llada_jax.data import images

    try:
        return images.load_image(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--image: {e}") from None
    except ValueError as e:
        raise ValueError(f"--image: {e}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]} (messages are read from stdin)")
    image = load_image(_IMAGE.value) if _IMAGE.value else None   # before the slow part
    generator = sf.load()
    if image is None:
        sf.warn_without_image(generator, "chat")
    elif not generator.config.vision.enabled:
        raise ValueError(f"--image={_IMAGE.value} needs a LLaDA-V checkpoint (its config has "
                         f"vision.enabled=False)")
    sampler = sf.sampler_config(generator)
    max_prompt_tokens = generator.max_prompt_length(sampler)
    tokenizer = generator.tokenizer
    conversation = Conversation(tokenizer, _SYSTEM.value, image, generator.image_prompt)
    respond = make_responder(generator, conversation, sampler)
    interactive = sys.stdin.isatty()
    if interactive:
        print("(type a message; /reset starts a new conversation, /quit stops)", flush=True)
    said_dropped = False
    stdin = sys.stdin.buffer
    for line_number in itertools.count(1):
        if interactive:
            print("user: ", end="", flush=True)
        line = stdin.readline()
        if not line:
            break
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:   # a stray byte in piped input: skip that message
            print(f"error: stdin line {line_number} is not UTF-8 text ({e.reason} at byte "
                  f"{e.start}); message skipped", flush=True)
            continue
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
            prompt, dropped = conversation.fit(max_prompt_tokens)
            if dropped and not said_dropped:
                print(f"(the conversation outgrew the model's {max_prompt_tokens} prompt tokens: "
                      f"dropping its oldest turns from now on; /reset starts afresh)", flush=True)
                said_dropped = True
            answer = respond(prompt)
        except ValueError as error:   # this message alone is too long: refuse it, go on
            conversation.messages.pop()
            print(f"error: {error}", flush=True)
            continue
        reply = tokenizer.decode(answer)
        conversation.messages.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", flush=True)


if __name__ == "__main__":
    program.run(main)
