"""Interactive multi-turn chat with a LLaDA instruct checkpoint.

    python launch/chat.py --checkpoint=/ckpt/llada-instruct --gen_length=128 --steps=128
    printf 'Hi\\nWhat did I say?\\n' | python launch/chat.py --checkpoint=...

Reads one user message per line from stdin (typed or piped), renders the whole conversation with
the chat template (REFERENCE.md section 1), samples the assistant's answer (up to its first EOS /
EoT) and prints it as `assistant: ...`. `/reset` starts a new conversation, `/quit` (or the end of
stdin) stops. Every sampler option is a flag, as in launch/generate.py.

The conversation is turned into a prompt by `Conversation.prompt_ids` and answered by a
`Responder`; an image-aware responder (LLaDA-V, `--image`) plugs in at `make_responder` without
touching the loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import sampling_flags as sf
from absl import app, flags

_SYSTEM = flags.DEFINE_string("system", None, "optional system message")

# prompt ids -> answer ids (without EOS / EoT)
Responder = Callable[[list[int]], list[int]]


class Conversation:
    """The messages of one chat and their rendering as prompt ids."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        return self.tokenizer.render_chat(self.messages, add_generation_prompt=True)


def make_responder(config, model, params, tokenizer, mesh) -> Responder:
    """Text-only responder: the sampler with the flags' settings; one compiled program per
    prompt-length bucket (--prompt_bucket)."""
    sampler = sf.sampler_config(config, tokenizer)
    rng = jax.random.key(sf.seed(config))
    turns = [0]

    def respond(prompt: list[int]) -> list[int]:
        generated, _ = sf.run(config, model, params, mesh, [prompt], sampler, tokenizer.pad_id,
                              jax.random.fold_in(rng, turns[0]))
        turns[0] += 1
        return sf.answer_ids(generated[0], tokenizer)

    return respond


def main(argv: list[str]) -> None:
    del argv
    config, model, params, tokenizer, mesh = sf.load()
    respond = make_responder(config, model, params, tokenizer, mesh)
    conversation = Conversation(tokenizer, _SYSTEM.value)
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
    app.run(main)
