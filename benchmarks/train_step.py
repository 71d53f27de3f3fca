"""Train-step benchmark: step time, tokens/s, MFU and per-device memory, printed as JSON.

    python benchmarks/train_step.py --config=configs/tiny.py
    python benchmarks/train_step.py --config=configs/llada_1b.py            # one accelerator
    python benchmarks/train_step.py --config=configs/llada_8b.py --abstract \\
        --config.train.batch_size=8 [--n_layers=4]
    python benchmarks/train_step.py --config=configs/moe_tiny.py            # tiny MoE on CPU
    python benchmarks/train_step.py --config=configs/llada2_mini.py --abstract \\
        --config.mesh.fsdp=2 --config.mesh.expert=4 --config.train.batch_size=8

Measured mode builds the sharded state on the real devices, runs `--warmup` steps, then times
`--steps` steps (on device, synchronised at the end). `--abstract` allocates nothing: it
AOT-compiles the step (`jax.jit(...).lower(ShapeDtypeStructs with shardings).compile()`) for a
mesh of `--devices` fake CPU devices and reports XLA's memory analysis per device, which is how
the 8B configuration is sized on a laptop.

Model FLOPs per step are `llada_jax.flops.train_flops_per_step` (6 N tokens plus the full
bidirectional attention; no causal halving, remat not counted); for mixture-of-experts models
N is the active parameters (router, experts_per_token routed and the shared experts).
MFU = model FLOPs per second / (devices * peak bf16 FLOP/s of one device), with the peak from
`--peak_tflops` or `llada_jax.flops.PEAKS` (null on CPU).

`cost_per_device` is XLA's own count for the compiled program of one device
(`compiled.cost_analysis()`: FLOPs and bytes accessed). XLA counts a loop body once, so the
scanned layers appear as ONE layer: the ratio is taken against the model FLOPs of a one-layer
model of the same shapes, and only when the layer scan is the only loop (see `_cost`).
Rematerialisation shows up as a ratio above 1 (full remat: up to 4/3), wasted work as more.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from llada_jax import flops as flops_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config preset")
_ABSTRACT = flags.DEFINE_bool("abstract", False, "AOT-compile on fake CPU devices; no allocation")
_DEVICES = flags.DEFINE_integer("devices", 8, "--abstract: number of fake CPU devices")
_N_LAYERS = flags.DEFINE_integer("n_layers", None, "override model.n_layers (faster compiles)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps first")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "peak bf16 TFLOP/s of one device")

def _memory(compiled) -> dict[str, int] | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    memory = {name: int(getattr(analysis, name, 0)) for name in fields}
    # Donated state aliases inputs to outputs: live bytes = arguments + outputs - aliased + temp.
    memory["peak_estimate_bytes"] = (memory["argument_size_in_bytes"]
                                     + memory["output_size_in_bytes"]
                                     - memory["alias_size_in_bytes"]
                                     + memory["temp_size_in_bytes"])
    memory["peak_estimate_gib"] = round(memory["peak_estimate_bytes"] / 2 ** 30, 3)
    return memory


def _cost(compiled, model_config, train, devices: int) -> dict[str, Any]:
    """XLA's own count of the compiled step's FLOPs and bytes, next to the model's FLOPs.

    XLA's cost analysis counts the body of a loop ONCE, whatever its trip count, and the step
    has loops: the scan over layers, and (when used) the scan over micro-batches, over loss
    chunks and over attention query blocks. When the layer scan is the only loop (no gradient
    accumulation, `train.loss_chunk_size` 0 or >= seq_len, seq_len <= the attention query
    block), the compiled count is compared with the model FLOPs of a ONE-layer model of the
    same shapes, which is what it covers; otherwise the ratio is null and says why.
    """
    import dataclasses

    from llada_jax.model.attention import QUERY_BLOCK

    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {"compiled_flops": None, "compiled_bytes_accessed": None}
    flops = float(analysis.get("flops", 0.0))
    bytes_accessed = float(analysis.get("bytes accessed", 0.0))
    report: dict[str, Any] = {
        "compiled_flops": flops, "compiled_bytes_accessed": bytes_accessed,
        "compiled_flops_per_byte": round(flops / bytes_accessed, 3) if bytes_accessed else None,
    }
    other_loops = []
    if model_config.is_moe and model_config.first_k_dense:
        other_loops.append("a second layer scan (first_k_dense)")
    if train.grad_accum_steps > 1:
        other_loops.append("grad_accum_steps > 1")
    if 0 < train.loss_chunk_size < train.seq_len:
        other_loops.append("loss_chunk_size < seq_len")
    if train.seq_len > QUERY_BLOCK and train.seq_len % QUERY_BLOCK == 0:
        other_loops.append(f"seq_len > attention QUERY_BLOCK={QUERY_BLOCK}")
    if other_loops:
        report["compiled_to_model_flops_one_layer"] = None
        report["why_no_ratio"] = "loops besides the layer scan: " + ", ".join(other_loops)
    else:
        one_layer = dataclasses.replace(model_config, n_layers=1)
        analytic = flops_lib.train_flops_per_step(one_layer, train.batch_size,
                                                  train.seq_len) / devices
        report["model_flops_one_layer_per_device"] = analytic
        # Above 1: rematerialisation (full remat recomputes the forward: up to 4/3) or waste.
        report["compiled_to_model_flops_one_layer"] = round(flops / analytic, 4)
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if _ABSTRACT.value:
        # Must happen before jax is imported: the fake devices are made at backend start.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_DEVICES.value}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llada_jax import config as config_lib
    from llada_jax import parallel
    from llada_jax.train import state as state_lib
    from llada_jax.train import step as step_lib
    from llada_jax.train.optimizer import make_optimizer

    config = _CONFIG.value
    if _N_LAYERS.value:
        config.model.n_layers = _N_LAYERS.value
    try:
        config_lib.validate(config)
        parallel.validate_mesh(config, jax.device_count())
    except ValueError as e:
        sys.exit(f"error: {e}")
    model_config = config_lib.model_config(config)
    train = config.train
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    batch_sharding = parallel.batch_sharding(mesh, 2)
    devices = jax.devices()
    flops = flops_lib.train_flops_per_step(model_config, train.batch_size, train.seq_len)
    report = {
        "config": {"n_layers": model_config.n_layers, "d_model": model_config.d_model,
                   "params": model_config.num_params,
                   "active_matmul_params": model_config.num_matmul_params,
                   "experts": model_config.num_experts, "dtype": model_config.dtype,
                   "param_dtype": model_config.param_dtype, "remat": model_config.remat_policy,
                   "batch_size": train.batch_size, "seq_len": train.seq_len,
                   "grad_accum_steps": train.grad_accum_steps},
        "mesh": dict(mesh.shape), "devices": len(devices), "device_kind": devices[0].device_kind,
        "model_flops_per_step": flops,
    }

    abstract_state = state_lib.abstract_train_state(model, tx, shardings)
    abstract_batch = {"tokens": jax.ShapeDtypeStruct((train.batch_size, train.seq_len),
                                                     jnp.int32, sharding=batch_sharding)}
    start = time.time()
    compiled = train_step.lower(abstract_state, abstract_batch).compile()
    report["compile_s"] = round(time.time() - start, 2)
    report["memory_per_device"] = _memory(compiled)
    # Per device: the compiled program is one device's share of the SPMD step.
    report["cost_per_device"] = _cost(compiled, model_config, train, len(devices))
    if _ABSTRACT.value:
        report["mode"] = "abstract"
        print(json.dumps(report, indent=2))
        return

    report["mode"] = "measured"
    state = state_lib.create_train_state(model, tx, mesh, rules, train.seed, shardings)
    rng = np.random.default_rng(0)
    host_tokens = rng.integers(4, model_config.vocab_size, (train.batch_size, train.seq_len))
    batch = parallel.global_batch({"tokens": host_tokens.astype(np.int32)}, mesh)
    # The AOT-compiled executable runs the step directly (no second compilation).
    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.time()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_time = (time.time() - start) / _STEPS.value
    peak = flops_lib.peak_flops_per_device(devices[0].device_kind, _PEAK_TFLOPS.value)
    report.update({
        "step_time_s": round(step_time, 5),
        "tokens_per_s": round(train.batch_size * train.seq_len / step_time, 1),
        "model_tflops_per_s": round(flops / step_time / 1e12, 4),
        "mfu": None if peak is None else round(flops / step_time / (peak * len(devices)), 4),
        "loss": float(metrics["loss"]),
    })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
