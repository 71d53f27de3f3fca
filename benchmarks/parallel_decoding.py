"""Parallel decoding on a model the project trained itself: accuracy, passes, tokens per pass.

    python benchmarks/parallel_decoding.py --workdir=/tmp/llada_sft      # trains it if missing
    python benchmarks/parallel_decoding.py --workdir=/tmp/llada_sft --thresholds=0.9,0.7 --factor=1

The model is `configs/sft_tiny.py` trained on the built-in chat set (train split); it is then
asked `--questions` held-out questions (test split) with every decoding mode, and the JSON reports
for each mode the exact-answer accuracy, the forward passes per batch, the committed tokens per
forward pass and the wall time. Vanilla decoding commits one token per pass (steps =
gen_length); threshold/factor decoding should commit several per pass at unchanged accuracy
(REFERENCE.md section 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from llada_jax.data import synthetic_chat
from llada_jax.data.tokenizer import load_tokenizer
from llada_jax.diffusion import sampler
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import state as state_lib

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/llada_sft_tiny", "trainer workdir of sft_tiny")
_QUESTIONS = flags.DEFINE_integer("questions", 200, "held-out questions")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9", "0.7", "0.5"],
                                "confidence thresholds of the 'threshold' modes")
_FACTOR = flags.DEFINE_float("factor", 1.0, "f of the factor-based mode")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_trained(workdir: str) -> None:
    """Trains configs/sft_tiny.py into `workdir` unless it already holds a checkpoint."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                    "--config=configs/sft_tiny.py", f"--workdir={workdir}"],
                   cwd=REPO, check=True)


def main(argv: list[str]) -> None:
    del argv
    ensure_trained(_WORKDIR.value)
    config, params = checkpoint_lib.load_params(_WORKDIR.value)
    model = state_lib.make_model(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    items = [synthetic_chat.question_answer("test", i) for i in range(_QUESTIONS.value)]
    prompts = [tokenizer.render_chat([{"role": "user", "content": q}]) for q, _ in items]
    prompt_tokens, prompt_mask = sampler.pad_prompts(prompts, tokenizer.pad_id)
    gen = int(config.sampler.gen_length)
    modes = {"vanilla": {"steps": gen, "block_length": gen}}
    for threshold in map(float, _THRESHOLDS.value):
        modes[f"threshold_{threshold}"] = {"steps": gen, "block_length": gen,
                                           "threshold": threshold}
        modes[f"dual_cache+threshold_{threshold}"] = {
            "steps": gen, "block_length": gen // 2, "cache": "dual", "threshold": threshold}
    modes[f"factor_{_FACTOR.value}"] = {"steps": gen, "block_length": gen, "factor": _FACTOR.value}
    results = {}
    for name, overrides in modes.items():
        settings = sampler.SamplerConfig.from_config(config, eot_id=tokenizer.eot_id,
                                                     vocab_limit=tokenizer.vocab_size, **overrides)
        run = lambda s=settings: sampler.generate(params, model, prompt_tokens, prompt_mask, s,
                                                  jax.random.key(0), return_stats=True)
        jax.block_until_ready(run())  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        seconds = time.perf_counter() - start
        generated = np.asarray(out.tokens)[:, prompt_tokens.shape[1]:].tolist()
        correct = 0
        for (_, answer), ids in zip(items, generated, strict=True):
            end = ids.index(tokenizer.eot_id) if tokenizer.eot_id in ids else len(ids)
            correct += tokenizer.decode(ids[:end]) == answer
        passes = int(out.num_forward_passes)
        # A row is done at the pass that commits its last token; the batch runs until its slowest
        # row is done, so per-row figures show what each sequence needed.
        row_passes = np.asarray(out.commit_pass).max(axis=1) + 1
        results[name] = {"accuracy": correct / len(items), "forward_passes": passes,
                         "tokens_per_pass": gen / passes,
                         "mean_row_passes": float(row_passes.mean()),
                         "mean_row_tokens_per_pass": float((gen / row_passes).mean()),
                         "seconds": round(seconds, 4)}
    print(json.dumps({"workdir": _WORKDIR.value, "questions": len(items), "gen_length": gen,
                      "device": jax.devices()[0].device_kind, "modes": results}, indent=2))


if __name__ == "__main__":
    app.run(main)
