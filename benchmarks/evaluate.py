"""Evaluation throughput: requests/s of the llada_jax lm-eval model, batched vs one at a time.

    python benchmarks/evaluate.py [--questions=64] [--mc_num=8] [--gen_requests=32]

A tiny random-weight model (the default config: d_model 64, 2 layers, char tokenizer) scores a
4-way multiple-choice set (loglikelihood requests, Monte Carlo `--mc_num`) and a generation set
(generate_until, gen_length 16, block 8, 16 steps), first through `LladaJaxLM` with its batching
(requests sorted and bucketed, `--pairs_per_call` / `--gen_batch_size` rows per program), then
one request per program call, the way the official evaluation loops over requests. Each timing
runs after a warm-up pass over the same requests, so compilation is excluded. Prints one JSON
line per task. Weights do not matter for throughput; only shapes do.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from lm_eval.api.instance import Instance

from llada_jax.config import default_config
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.evaluation.cache import RequestCache
from llada_jax.evaluation.lm import LladaJaxLM
from llada_jax.train import state as state_lib

_QUESTIONS = flags.DEFINE_integer("questions", 64, "multiple-choice questions (4 options each)")
_MC_NUM = flags.DEFINE_integer("mc_num", 8, "Monte Carlo samples per option")
_MC_BATCH = flags.DEFINE_integer("mc_batch_size", 8, "Monte Carlo batch")
_GEN_REQUESTS = flags.DEFINE_integer("gen_requests", 32, "generation requests")
_PAIRS = flags.DEFINE_integer("pairs_per_call", 16, "likelihood pairs per program call")
_GEN_BATCH = flags.DEFINE_integer("gen_batch_size", 16, "generation rows per program call")


def requests(rng: np.random.Generator) -> tuple[list[Instance], list[Instance]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    mc, gen = [], []
    for q in range(_QUESTIONS.value):
        context = "question: " + "".join(rng.choice(list(letters), int(rng.integers(10, 40))))
        for option in range(4):
            answer = " " + "".join(rng.choice(list(letters), int(rng.integers(2, 12))))
            mc.append(Instance("loglikelihood", {}, (context, answer), 4 * q + option))
    for g in range(_GEN_REQUESTS.value):
        context = "say: " + "".join(rng.choice(list(letters), int(rng.integers(10, 40))))
        gen.append(Instance("generate_until", {}, (context, {"until": ["\n"],
                                                              "max_gen_toks": 16}), g))
    return mc, gen


def timed(lm: LladaJaxLM, method: str, reqs: list[Instance]) -> float:
    getattr(lm, method)(reqs)          # warm-up: compiles every bucket
    lm.request_cache = RequestCache(None)   # forget the warm-up's results: compute them again
    lm.model_calls = 0
    start = time.perf_counter()
    getattr(lm, method)(reqs)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    config = default_config()
    config.data.tokenizer = "char"
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 16, 8, 16
    model = state_lib.make_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    mc, gen = requests(np.random.default_rng(0))
    common = {"params": params, "config": config, "tokenizer": CharTokenizer(),
              "mc_num": _MC_NUM.value, "mc_batch_size": _MC_BATCH.value, "progress": False}
    batched = LladaJaxLM(pairs_per_call=_PAIRS.value, gen_batch_size=_GEN_BATCH.value, **common)
    single = LladaJaxLM(pairs_per_call=1, gen_batch_size=1, **common)
    for task, method, reqs in (("multiple_choice", "loglikelihood", mc),
                               ("generation", "generate_until", gen)):
        fast = timed(batched, method, reqs)
        fast_calls = batched.model_calls
        slow = timed(single, method, reqs)
        print(json.dumps({
            "task": task, "requests": len(reqs), "mc_num": _MC_NUM.value,
            "batched_requests_per_s": round(len(reqs) / fast, 2),
            "batched_program_calls": fast_calls,
            "one_at_a_time_requests_per_s": round(len(reqs) / slow, 2),
            "speedup": round(slow / fast, 2), "backend": jax.default_backend(),
            "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
    app.run(main)
