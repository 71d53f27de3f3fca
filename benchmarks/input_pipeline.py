"""Input-pipeline benchmark: tokens/s this host's pipeline delivers, printed as JSON.

    python benchmarks/input_pipeline.py --config=configs/sft_tiny.py
    python benchmarks/input_pipeline.py --config=configs/tiny.py \\
        --config.data.source='files:/data/text/*.jsonl' --config.data.packing=pack \\
        --config.data.num_workers=4 --batches=200
    python benchmarks/input_pipeline.py --config=configs/sft_tiny.py --train_step

Builds this host's batches exactly as training does (`llada_jax.data.pipeline.build_dataset`:
source, tokenizer, concat/pack or SFT rows, batching, worker processes), skips `--warmup`
batches (worker start-up, first file reads), then times `--batches` batches. tokens/s counts
every position of a batch (rows x seq_len), as the train step consumes them. With
`--train_step` it also times the jitted train step of the config's model on this host's devices
and reports how many times faster the pipeline is than the step (below 1: the input is the
bottleneck; add `--config.data.num_workers`).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sft_tiny.py", "config preset")
_BATCHES = flags.DEFINE_integer("batches", 100, "timed batches")
_WARMUP = flags.DEFINE_integer("warmup", 5, "untimed batches first")
_TRAIN_STEP = flags.DEFINE_bool("train_step", False, "also time the train step on these batches")
_STEPS = flags.DEFINE_integer("steps", 10, "--train_step: timed steps (after 2 untimed)")


def time_pipeline(iterator, warmup: int, batches: int) -> tuple[float, list]:
    """Seconds for `batches` batches after `warmup` untimed ones, and the last few batches."""
    for _ in range(warmup):
        next(iterator)
    kept = []
    start = time.perf_counter()
    for i in range(batches):
        batch = next(iterator)
        if i >= batches - 4:
            kept.append(batch)
    return time.perf_counter() - start, kept


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    import jax

    from llada_jax import config as config_lib
    from llada_jax import parallel
    from llada_jax.data import pipeline
    from llada_jax.data import validation as data_validation
    from llada_jax.data.tokenizer import load_tokenizer

    config = _CONFIG.value
    try:
        config_lib.validate(config)
        data_validation.check(config)  # sizes and source specs, before any source is built
        parallel.validate_mesh(config, jax.device_count())
    except ValueError as e:
        sys.exit(f"error: {e}")
    tokenizer = load_tokenizer(config.data.tokenizer)
    rows = config.train.batch_size // jax.process_count()
    seq_len = config.train.seq_len
    iterator = iter(pipeline.build_dataset(config, tokenizer))
    seconds, last_batches = time_pipeline(iterator, _WARMUP.value, _BATCHES.value)
    pipeline_tokens_per_s = _BATCHES.value * rows * seq_len / seconds
    first = last_batches[-1]
    report = {
        "source": config.data.source, "objective": config.train.objective,
        "packing": config.data.packing, "tokenizer": config.data.tokenizer,
        "num_workers": config.data.num_workers, "process_index": jax.process_index(),
        "process_count": jax.process_count(), "rows_per_host": rows, "seq_len": seq_len,
        "fields": sorted(first), "batches_timed": _BATCHES.value,
        "batches_per_s": round(_BATCHES.value / seconds, 2),
        "tokens_per_s_per_host": round(pipeline_tokens_per_s, 1),
    }
    if "maskable" in first:
        report["maskable_fraction"] = round(float(first["maskable"].mean()), 4)
    if "segment_ids" in first:
        report["padding_fraction"] = round(float((first["segment_ids"] == 0).mean()), 4)

    if _TRAIN_STEP.value:
        from llada_jax.train import state as state_lib
        from llada_jax.train import step as step_lib
        from llada_jax.train.optimizer import make_optimizer

        mesh = parallel.make_mesh(config)
        rules = parallel.logical_rules(config)
        model = state_lib.make_model(config)
        tx = make_optimizer(config.train)
        shardings = state_lib.state_shardings(model, tx, mesh, rules)
        train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
        state = state_lib.create_train_state(model, tx, mesh, rules, config.train.seed, shardings)
        batches = [parallel.global_batch(b, mesh) for b in last_batches]
        for i in range(2):
            state, metrics = train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for i in range(_STEPS.value):
            state, metrics = train_step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        step_seconds = (time.perf_counter() - start) / _STEPS.value
        step_tokens_per_s = config.train.batch_size * seq_len / step_seconds / jax.process_count()
        report.update({
            "train_step_s": round(step_seconds, 5),
            "train_step_tokens_per_s_per_host": round(step_tokens_per_s, 1),
            "pipeline_over_step": round(pipeline_tokens_per_s / step_tokens_per_s, 2),
        })
    print(json.dumps(report, indent=2))
    if hasattr(iterator, "close"):
        iterator.close()


if __name__ == "__main__":
    app.run(main)
