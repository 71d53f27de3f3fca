"""Generates text from a checkpoint with the LLaDA reverse process.

    python launch/generate.py --checkpoint=/ckpt/llada --prompt='Hello' --prompt='2+2=' \\
        --gen_length=128 --block_length=32 --steps=128 --chat
    python launch/generate.py --checkpoint=/ckpt/llada --prompts_file=prompts.txt \\
        --cache=dual --threshold=0.9 --early_exit

Prompts come from --prompt (repeatable) and/or --prompts_file (one prompt per line; a line may
be a JSON string to carry newlines). --chat wraps each prompt as one user turn of the chat format.
Every sampler option is a flag (default: the checkpoint config's `sampler` section). Prints each
completion (up to its first EOS / EoT), then one JSON line of statistics: tokens/s, forward passes
and tokens per pass (per sequence). The first batch includes compilation; --warmup runs it once
untimed.
"""

from __future__ import annotations

import json
import os

import jax
import program
import sampling_flags as sf
from absl import flags

_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "file with one prompt per line")
_CHAT = flags.DEFINE_bool("chat", False, "apply the chat template (one user turn per prompt)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "prompts per sampler call")
_WARMUP = flags.DEFINE_bool("warmup", False, "run the first batch once untimed (compilation)")
_OUTPUT = flags.DEFINE_string("output", None, "also write JSON lines {prompt, completion, ids}")


def read_prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        if not os.path.isfile(_PROMPTS_FILE.value):
            raise FileNotFoundError(f"--prompts_file not found: {_PROMPTS_FILE.value}")
        with open(_PROMPTS_FILE.value) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.startswith('"'):
                    line = json.loads(line)
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: pass --prompt (repeatable) or --prompts_file")
    return prompts


def main(argv: list[str]) -> None:
    del argv
    prompts = read_prompts()
    config, model, params, tokenizer, mesh = sf.load()
    sampler = sf.sampler_config(config, tokenizer)

    def encode(text: str) -> list[int]:
        if _CHAT.value:
            return tokenizer.render_chat([{"role": "user", "content": text}])
        return [tokenizer.bos_id, *tokenizer.encode(text)]

    ids = [encode(p) for p in prompts]
    rng = jax.random.key(sf.seed(config))
    size = max(1, _BATCH_SIZE.value)
    if _WARMUP.value:
        sf.run(config, model, params, mesh, ids[:size], sampler, tokenizer.pad_id, rng)
    totals = {"seconds": 0.0, "forward_passes": 0, "generated_tokens": 0}
    calls = 0
    records = []
    for call, start in enumerate(range(0, len(ids), size)):
        generated, stats = sf.run(config, model, params, mesh, ids[start:start + size], sampler,
                                  tokenizer.pad_id, jax.random.fold_in(rng, call))
        calls += 1
        for key in totals:
            totals[key] += stats[key]
        for i, row in enumerate(generated):
            answer = sf.answer_ids(row, tokenizer)
            text = tokenizer.decode(answer)
            prompt = prompts[start + i]
            print(f"=== prompt {start + i}: {prompt}\n{text}\n", flush=True)
            records.append({"prompt": prompt, "completion": text,
                            "ids": [int(t) for t in row]})
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
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)


if __name__ == "__main__":
    program.run(main)
