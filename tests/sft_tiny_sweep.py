"""Measures configs/sft_tiny.py (or a variant of it) over seeds and XLA CPU instruction sets.

    python tests/sft_tiny_sweep.py --seeds=0,1,2 --isas=default,AVX,SSE4_2 \\
        [--set=train.batch_size=32 --set=train.steps=2000 ...]

For each (seed, ISA) it trains the recipe in a fresh process whose XLA_FLAGS cap the CPU
instruction set (`--xla_cpu_max_isa`; XLA's float results, hence the whole training trajectory,
differ by instruction set, which is what made the recipe machine dependent), then samples the
answers to 200 held-out questions as tests/test_chat_sft.py does and prints one line
`seed ISA accuracy seconds` (exact-answer accuracy). Not a test: a measurement tool for the
recipe (issue 12).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(seed: int, settings: list[str], count: int) -> float:
    """In this process (XLA_FLAGS already fixed): train, then held-out exact-answer accuracy."""
    sys.path.insert(0, REPO)
    from configs.sft_tiny import get_config
    from llada_jax.train.trainer import train
    from tests.test_chat_sft import _held_out_accuracy

    config = get_config()
    config.train.seed = seed
    config.train.eval_every = 0
    config.train.checkpoint_every = 0
    for setting in settings:
        field, value = setting.split("=", 1)
        section, name = field.split(".")
        config[section][name] = ast.literal_eval(value)
    with tempfile.TemporaryDirectory() as workdir:
        result = train(config, workdir)
    from llada_jax.train import state as state_lib

    model = state_lib.make_model(config)
    return _held_out_accuracy(result.state.params, model, config, count=count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--isas", default="default,AVX,SSE4_2")
    parser.add_argument("--set", action="append", default=[], help="section.field=value")
    parser.add_argument("--count", type=int, default=200, help="held-out questions")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.set, args.count)))
        return
    for isa in args.isas.split(","):
        for seed in map(int, args.seeds.split(",")):
            flags = "--xla_force_host_platform_device_count=1"
            if isa != "default":
                flags += f" --xla_cpu_max_isa={isa}"
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
            start = time.time()
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--worker={seed}",
                 f"--count={args.count}", *(f"--set={s}" for s in args.set)],
                capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{seed} {isa} FAILED {done.stderr[-2000:]}", flush=True)
                continue
            accuracy = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{seed} {isa} {accuracy:.3f} {time.time() - start:.0f}s "
                  f"{' '.join(args.set)}", flush=True)


if __name__ == "__main__":
    main()
