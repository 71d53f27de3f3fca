"""Generates text from a checkpoint with the LLaDA reverse process.

    python launch/generate.py --checkpoint=/ckpt/llada --prompt='Hello' --prompt='2+2=' \\
        --gen_length=128 --block_length=32 --steps=128 --chat
    python launch/generate.py --checkpoint=/ckpt/llada --prompts_file=prompts.txt \\
        --cache=dual --threshold=0.9 --early_exit

Prompts come from --prompt (repeatable) and/or --prompts_file (one UTF-8 prompt per line; a line
starting with `"` is a JSON string, to carry newlines). --chat wraps each prompt as one user turn
of the chat format. Errors in the prompts name the flag or `file:line`; the --output file is
opened before the checkpoint is loaded, so an unwritable path fails at once, and it receives each
batch's records as soon as they are sampled. Logs are at WARNING level (--verbose shows INFO logs).
Every sampler option is a flag (default: the checkpoint config's `sampler` section). Prints each
completion (up to its first EOS / EoT), then one JSON line of statistics: tokens/s, forward passes
and tokens per pass (per sequence). The first batch includes compilation; --warmup runs it once
untimed.
"""

from __future__ import annotations

import json
import os
from typing import TextIO

import jax
import program
import sampling_flags as sf
from absl import flags

_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "file with one prompt per line")
_CHAT = flags.DEFINE_bool("chat", False, "apply the chat template (one user turn per prompt)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "prompts per sampler call", lower_bound=1)
_WARMUP = flags.DEFINE_bool("warmup", False, "run the first batch once untimed (compilation)")
_OUTPUT = flags.DEFINE_string("output", None, "also write JSON lines {prompt, completion, ids}")


def read_prompts() -> tuple[list[str], list[str]]:
    """(prompts, where each came from: `--prompt #i` or `file:line`)."""
    prompts = list(_PROMPT.value)
    sources = [f"--prompt #{i + 1}" for i in range(len(prompts))]
    path = _PROMPTS_FILE.value
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--prompts_file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"--prompts_file={path} is not a file")
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") \
                        from None
                if not line.strip():
                    continue
                if line.startswith('"'):
                    try:
                        line = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: a line starting with '\"' must be one JSON "
                                         f"string ({e.msg}, column {e.colno})") from None
                    if not isinstance(line, str):
                        raise ValueError(f"{where}: expected one JSON string, found "
                                         f"{type(line).__name__}")
                prompts.append(line)
                sources.append(where)
        if len(prompts) == len(_PROMPT.value):
            raise ValueError(f"--prompts_file={path} holds no prompt (only empty lines)")
    if not prompts:
        raise ValueError("no prompts: pass --prompt (repeatable) or --prompts_file")
    return prompts, sources


def open_output() -> TextIO | None:
    """The --output file, opened (created or emptied) before any work, or None."""
    if not _OUTPUT.value:
        return None
    if os.path.isdir(_OUTPUT.value):
        raise ValueError(f"--output={_OUTPUT.value} is a directory; expected a file path")
    if _PROMPTS_FILE.value and os.path.exists(_OUTPUT.value) and \
            os.path.samefile(_OUTPUT.value, _PROMPTS_FILE.value):
        raise ValueError(f"--output={_OUTPUT.value} is the --prompts_file: writing would "
                         f"destroy the prompts; choose another path")
    return open(_OUTPUT.value, "w", encoding="utf-8")   # OSError: one line naming the path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]} (prompts are given with --prompt)")
    prompts, sources = read_prompts()
    output = open_output()   # before the slow part: a bad path fails now
    generator = sf.load()
    sampler = sf.sampler_config(generator)
    sf.warn_without_image(generator, "generate")
    ids = [generator.encode_prompt(p, chat=_CHAT.value) for p in prompts]
    for prompt_ids, where in zip(ids, sources, strict=True):
        generator.check_prompt_length(sampler, len(prompt_ids), where,
                                      gen_length_name="--gen_length")
    rng = jax.random.key(sf.seed(generator))
    size, bucket = _BATCH_SIZE.value, sf.PROMPT_BUCKET.value
    if _WARMUP.value:
        generator.generate_ids(ids[:size], sampler, seed=rng, prompt_bucket=bucket)
    totals = {"seconds": 0.0, "forward_passes": 0, "generated_tokens": 0}
    calls = 0
    for call, start in enumerate(range(0, len(ids), size)):
        out = generator.generate_ids(ids[start:start + size], sampler,
                                     seed=jax.random.fold_in(rng, call), prompt_bucket=bucket)
        calls += 1
        totals["seconds"] += out.seconds
        totals["forward_passes"] += out.forward_passes
        totals["generated_tokens"] += int(out.tokens.size)
        for i, row in enumerate(out.tokens):
            text = generator.decode_answer(row)
            prompt = prompts[start + i]
            print(f"=== prompt {start + i}: {prompt}\n{text}\n", flush=True)
            if output is not None:
                output.write(json.dumps({"prompt": prompt, "completion": text,
                                         "ids": [int(t) for t in row]}) + "\n")
        if output is not None:
            output.flush()   # what is sampled is kept even if a later batch fails
    if output is not None:
        output.close()
    summary = {
        "prompts": len(prompts),
        "generated_tokens": totals["generated_tokens"],
        "seconds": round(totals["seconds"], 4),
        "tokens_per_second": round(totals["generated_tokens"] / max(totals["seconds"], 1e-9), 2),
        "forward_passes": totals["forward_passes"],
        # Per sequence: what each row gains from one pass (gen_length per pass is the ideal).
        "tokens_per_forward_pass": round(
            sampler.gen_length * calls / max(totals["forward_passes"], 1), 3),
        "includes_compilation": not _WARMUP.value,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    program.run(main)
