"""What a batch costs the serving benchmark's sampler: seconds, FLOPs and FLOP/s against batch size.

    python benchmarks/serve_cost.py                      # batches 1,2,4,8,16, 30 rounds
    python benchmarks/serve_cost.py --batches=1,8 --rounds=50

The model and request of `benchmarks/serve.py` (the default tiny config with init_std 0.3,
prompt 32, gen 32 in one block, 32 steps, greedy), run through the generation API
(`Generator.generate_ids`, the call the serving engine makes, with its block streaming on) at
each batch size. Batch sizes are timed in interleaved rounds, so load on a shared machine falls
on all of them alike; the minimum and the median over rounds are printed. For each size also:
the model's forward pass alone over the canvas (jitted `Transformer.__call__`, same rounds),
the analytic model FLOPs per request (`flops.forward_flops` of the canvas, times the passes),
the achieved FLOP/s, and the cost relative to batch 1.

Closed-loop serving with perfect batching at size B: throughput speed-up = B x cost(1) / cost(B)
and latency = cost(B) / cost(1) times a lone request's. `ceiling` prints, for the measured costs,
the best speed-up whose latency stays within 2x a lone request (the target of issue 17 asks for
>= 3x there). Prints one JSON object.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax import flops as flops_lib
from llada_jax.config import default_config, model_config
from llada_jax.generation import Generator
from llada_jax.model.transformer import Transformer

_BATCHES = flags.DEFINE_list("batches", ["1", "2", "4", "8", "16"], "batch sizes")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "timed calls per batch size (interleaved)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 32, "generated tokens (one block)")
_STEPS = flags.DEFINE_integer("steps", 32, "sampling steps")


def _ignore_block(tag: np.ndarray, block: np.ndarray, block_tokens: np.ndarray) -> None:
    """The streaming hook the engine installs, minus its listeners."""


def main(argv: list[str]) -> None:
    del argv
    config = default_config()
    config.model.init_std = 0.3
    model = model_config(config)
    params = nn.meta.unbox(jax.jit(Transformer(model).init)(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    generator = Generator.from_params(config, params)   # unsharded, as on one CPU device
    sampler = generator.sampler(gen_length=_GEN_LENGTH.value, block_length=_GEN_LENGTH.value,
                                steps=_STEPS.value)
    canvas = _PROMPT_LEN.value + _GEN_LENGTH.value
    forward = jax.jit(lambda p, tokens: generator.model.apply({"params": p}, tokens))
    batches = [int(b) for b in _BATCHES.value]
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(4, model.vocab_size, (b, _PROMPT_LEN.value)).tolist()
               for b in batches}
    canvases = {b: jnp.ones((b, canvas), jnp.int32) for b in batches}

    def run(b: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = generator.generate_ids(prompts[b], sampler, prompt_bucket=_PROMPT_LEN.value,
                                     stream=_ignore_block)
        return time.perf_counter() - start, out.forward_passes

    def run_forward(b: int) -> float:
        start = time.perf_counter()
        forward(params, canvases[b]).block_until_ready()
        return time.perf_counter() - start

    passes = {}
    for b in batches:                       # compile every program first
        passes[b] = run(b)[1]
        run_forward(b)
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    forward_seconds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(_ROUNDS.value):
        for b in batches:
            seconds[b].append(run(b)[0])
            forward_seconds[b].append(run_forward(b))
    flops_per_request = flops_lib.forward_flops(model, 1, canvas) * passes[batches[0]]
    rows = {}
    for b in batches:
        best, forward_best = min(seconds[b]), min(forward_seconds[b])
        rows[b] = {
            "call_min_s": round(best, 4), "call_median_s": round(float(np.median(seconds[b])), 4),
            "forward_passes": passes[b], "step_min_ms": round(1e3 * best / passes[b], 3),
            "forward_min_ms": round(1e3 * forward_best, 3),
            "achieved_gflops_per_s": round(b * flops_per_request / best / 1e9, 2),
            "forward_gflops_per_s": round(
                flops_lib.forward_flops(model, b, canvas) / forward_best / 1e9, 2),
            "cost_over_batch_1": round(best / min(seconds[batches[0]]), 2)}
    within = [b / rows[b]["cost_over_batch_1"] for b in batches
              if rows[b]["cost_over_batch_1"] <= 2.0]
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "canvas": canvas, "steps": _STEPS.value,
        "model_flops_per_request": flops_per_request, "batches": rows,
        "ceiling": {"best_speedup_at_latency_within_2x": round(max(within, default=1.0), 2)}},
        indent=1))


if __name__ == "__main__":
    app.run(main)
