"""Before/after REGRESSION RECORD for the restructure of data/, config, interop and generation.

    python tests/restructure_record.py --write   # store today's values in
                                                 # tests/data/restructure_record.json
    python tests/restructure_record.py           # recompute and print them as JSON (stdout)

It records, from the code as it was before the restructure, values that a pure restructure must
leave BIT-IDENTICAL on the same machine:
  * `pretrain`: the loss of each of the first 6 updates of a tiny pre-training run (synthetic
    corpus, fixed seed);
  * `sft`: the same for a tiny SFT run on the synthetic chat set;
  * `llada_v`: the same for a tiny LLaDA-V run (shapes, masked-response loss);
  * `export_*`: CRC32, dtype and shape of every tensor of a float32 Hugging Face export of the
    pre-training and LLaDA-V runs' params, and `reexport_*` of the export of those params after
    importing the export again (the import -> export round trip; equal to `export_*`).
Sampler outputs are recorded separately by tests/sampler_record.py.

Only stable entry points are used: `llada_jax.train.trainer.train(config, workdir)` and its
`history`, the presets `configs/tiny.py` / `configs/llada_v_tiny.py` (every field that a later
recipe change could touch is set here), and `launch/convert.py` run as a program. Each value is
computed in a fresh process with fixed XLA flags (2 CPU devices) so that it does not depend on
the caller's environment; float results still depend on the CPU's instruction set, so a record
is only comparable on the machine type it was written on (the 2-core AVX2 CPU box).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(REPO, "tests", "data", "restructure_record.json")
# Fixed for every process that computes a recorded value: XLA's CPU results depend on them
# (JAX_DISABLE_MOST_OPTIMIZATIONS: the record was written with XLA's default optimisation; the
# test session turns it off elsewhere, tests/conftest.py).
ENV_FIXED = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
             "PYTHONPATH": REPO, "PYTHONHASHSEED": "0", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
STEPS = 6


def fixed_env() -> dict[str, str]:
    return dict(os.environ, **ENV_FIXED)


def load_preset(name: str, arg: str | None = None):
    """`configs/NAME.py`'s get_config(arg), loaded by path as launch/train.py does."""
    path = os.path.join(REPO, "configs", name + ".py")
    spec = importlib.util.spec_from_file_location("preset_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def short_run(config, steps: int = STEPS):
    """Shared training settings of every recorded run: `steps` updates, a loss on each, one
    checkpoint at the end, no evaluation."""
    config.train.steps = steps
    config.train.seed = 0
    config.train.warmup_steps = 2
    config.train.learning_rate = 3e-3
    config.train.schedule = "cosine"
    config.train.log_every = 1
    config.train.checkpoint_every = steps
    config.train.eval_every = 0
    config.train.grad_accum_steps = 1
    return config


def pretrain_config():
    c = short_run(load_preset("tiny"))
    c.train.batch_size = 8
    c.train.seq_len = 32
    return c


def sft_config():
    c = short_run(load_preset("tiny"))
    c.model.init_std = 0.1
    c.train.objective = "sft"
    c.train.batch_size = 8
    c.train.seq_len = 52            # the longest synthetic conversation
    c.data.source = "synthetic_chat"
    c.data.eval_source = ""
    c.data.sft_multiturn = "sample_turn"
    return c


def llada_v_config():
    c = short_run(load_preset("llada_v_tiny"))
    c.train.batch_size = 4
    c.data.eval_source = ""
    return c


CONFIGS = {"pretrain": pretrain_config, "sft": sft_config, "llada_v": llada_v_config}


def train_losses(kind: str, workdir: str) -> list[float]:
    """Runs in the current process (started with ENV_FIXED): the recorded run's losses."""
    from llada_jax.train.trainer import train

    result = train(CONFIGS[kind](), workdir)
    losses = [record["loss"] for record in sorted(result.history, key=lambda r: r["step"])]
    assert len(losses) == STEPS, (kind, len(losses))
    return losses


def tensor_crcs(directory: str) -> dict[str, list]:
    """{name: [crc32 of the raw bytes, dtype, shape]} of every tensor of an HF export."""
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        for name, array in load_file(path).items():
            out[name] = [zlib.crc32(array.tobytes()), str(array.dtype), list(array.shape)]
    assert out, f"no safetensors tensors in {directory}"
    return dict(sorted(out.items()))


def conversion_jobs(workdir: str, preset: str, scratch: str) -> list:
    """launch/convert.py runs (run_programs jobs) for the float32 export of `workdir`, its
    import, and the export of the import (the import -> export round trip)."""
    first, imported, second = (os.path.join(scratch, n) for n in ("hf", "imported", "hf2"))
    return [("convert.py", ["--mode=export", f"--checkpoint={workdir}", f"--out={first}",
                            "--dtype=float32"], ""),
            ("convert.py", ["--mode=import", f"--hf_dir={first}", f"--out={imported}",
                            f"--config={os.path.join(REPO, 'configs', preset + '.py')}"], ""),
            ("convert.py", ["--mode=export", f"--checkpoint={imported}", f"--out={second}",
                            "--dtype=float32"], "")]


# The runs whose params are exported and imported again, with the preset of their import.
EXPORTED = {"pretrain": "tiny", "llada_v": "llada_v_tiny"}


def train_all(scratch: str) -> dict[str, list[float]]:
    """Runs in the current process (started with ENV_FIXED): every recorded run, one after
    another, each in `scratch/KIND/run`; their losses."""
    return {kind: train_losses(kind, os.path.join(scratch, kind, "run")) for kind in CONFIGS}


def compute_all() -> dict:
    """Every recorded value: the training runs in one fresh process with ENV_FIXED (one JAX
    start instead of one per run; a run's values do not depend on what ran before it in the
    process), then the conversions as launch/convert.py runs in forked children of one process
    with ENV_FIXED (tests/test_program_runner.py `run_programs`), one JAX import for all."""
    sys.path.insert(0, REPO)
    from tests.test_program_runner import run_programs

    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--train_into={scratch}"],
                              capture_output=True, text=True, env=fixed_env(), timeout=1800,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the recorded training runs failed:\n{done.stderr[-3000:]}")
        values = json.loads(done.stdout.strip().splitlines()[-1])
        jobs = [job for kind, preset in EXPORTED.items()
                for job in conversion_jobs(os.path.join(scratch, kind, "run"), preset,
                                           os.path.join(scratch, kind))]
        results = run_programs(jobs, os.path.join(scratch, "conversions"), timeout=1200,
                               env=ENV_FIXED)
        failures = [f"launch/convert.py {' '.join(args)} failed:\n{result.stderr[-3000:]}"
                    for (_, args, _), result in zip(jobs, results, strict=True)
                    if result.returncode != 0]
        if failures:
            raise RuntimeError("\n".join(failures))
        for kind in EXPORTED:
            values[f"export_{kind}"] = tensor_crcs(os.path.join(scratch, kind, "hf"))
            values[f"reexport_{kind}"] = tensor_crcs(os.path.join(scratch, kind, "hf2"))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the values in " + RECORD)
    parser.add_argument("--train_into", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_into:  # the worker: the training runs, in the fixed environment
        differing = [k for k, v in ENV_FIXED.items() if os.environ.get(k) != v]
        if differing:
            parser.error(f"--train_into runs only in the fixed environment "
                         f"({', '.join(differing)} differ); run without it")
        sys.path.insert(0, REPO)
        print(json.dumps(train_all(args.train_into)))
        return
    values = compute_all()
    if args.write:
        os.makedirs(os.path.dirname(RECORD), exist_ok=True)
        with open(RECORD, "w") as f:
            json.dump(values, f, indent=1)
            f.write("\n")
        print(f"wrote {RECORD}")
    else:
        print(json.dumps(values))


if __name__ == "__main__":
    main()
