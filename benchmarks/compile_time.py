"""Compile time of the tiny model's programs under XLA:CPU flag sets, printed as JSON.

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --flags="" --flags="--xla_cpu_use_fusion_emitters=false" \\
        --repeats=3 --optimize=0

Why: most of the test suite's time on the 2-core CPU box is XLA compiling small programs
(tests/test_sampler.py: 63 s with an empty compilation cache, 24 s with a warm one), so the
XLA flags the tests compile with (tests/conftest.py) matter more than anything the programs do.

For each flag set (`--flags`, repeatable; XLA_FLAGS of a fresh process) and each repeat, a
fresh process with the persistent compilation cache off builds configs/sft_tiny.py's model and
times three first calls, each trace + compile + one run: the state initialisation, the jitted
train step (batch 64 x 52) and the scanned sampler (16 prompts of 20 tokens, 8 steps); then a
second train step call (run only). `--optimize=0` compiles as the test suite does
(JAX_DISABLE_MOST_OPTIMIZATIONS=1: LLVM at -O0); `--optimize=1` with XLA's default
optimisation. Prints one JSON object: per flag set, the median seconds of each phase over the
repeats, and `first_calls` (their sum).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("init", "train_step", "sampler", "train_step_run")


def measure() -> dict[str, float]:
    """In this process (flags fixed by the parent): seconds of each phase."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from configs.sft_tiny import get_config
    from llada_jax import parallel
    from llada_jax.diffusion import sampler
    from llada_jax.train import state as state_lib
    from llada_jax.train import step as step_lib
    from llada_jax.train import trainer
    from llada_jax.train.optimizer import make_optimizer

    config = get_config()
    mesh, rules, tokenizer = trainer.prepare(config, jax.devices()[:1])
    model, tx = state_lib.make_model(config), make_optimizer(config.train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    seconds = {}
    start = time.perf_counter()
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    jax.block_until_ready(state)
    seconds["init"] = time.perf_counter() - start
    train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    rows, length = config.train.batch_size, config.train.seq_len
    batch = parallel.global_batch({"tokens": np.full((rows, length), 20, np.int32),
                                   "maskable": np.ones((rows, length), bool),
                                   "fill": np.zeros((rows, length), bool)}, mesh)
    for phase in ("train_step", "train_step_run"):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        seconds[phase] = time.perf_counter() - start
    settings = sampler.SamplerConfig.from_config(config, eot_id=tokenizer.eot_id)
    prompts, prompt_mask = np.full((16, 20), 20, np.int32), np.ones((16, 20), bool)
    start = time.perf_counter()
    jax.block_until_ready(sampler.generate(state.params, model, prompts, prompt_mask, settings,
                                           jax.random.key(0)))
    seconds["sampler"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", action="append", help="XLA_FLAGS of one flag set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimize", type=int, choices=(0, 1), default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure()))
        return
    flag_sets = args.flags or ["", "--xla_cpu_use_fusion_emitters=false"]
    results = {}
    for flags in flag_sets:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   JAX_DISABLE_MOST_OPTIMIZATIONS="0" if args.optimize else "1")
        runs = []
        for _ in range(args.repeats):
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"XLA_FLAGS={flags!r}: the measuring process failed:\n"
                         f"{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        medians = {p: round(statistics.median(r[p] for r in runs), 3) for p in PHASES}
        medians["first_calls"] = round(medians["init"] + medians["train_step"]
                                       + medians["sampler"], 3)
        results[flags or "(none)"] = medians
    print(json.dumps({"optimize": args.optimize, "repeats": args.repeats,
                      "seconds": results}, indent=1))


if __name__ == "__main__":
    main()
