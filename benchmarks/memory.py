"""Per-device memory of the train step of the big presets, from XLA's compiled memory analysis.

    python benchmarks/memory.py                                   # the default table (slow: 8B)
    python benchmarks/memory.py --cases=llada_1b:1:8,llada_8b:8:1:full:512

Nothing is allocated: each case AOT-compiles the sharded, state-donating train step
(`jax.jit(...).lower(ShapeDtypeStructs with shardings).compile()`) for a mesh over the first N
of 64 fake CPU devices (`--xla_force_host_platform_device_count=64`, set before jax starts) and
reads `compiled.memory_analysis()`. One JSON object per case is printed as soon as it is
measured (one line each), then a summary list.

A case is `preset:devices:rows[:remat[:chunk[:batch]]]`:
  * preset: `llada_1b`, `llada_8b`, or `llada_v` (stage 2, the LLaDA-8B tower with the SigLIP
    tower and AnyRes views of `configs/llada_v.py`);
  * devices: mesh size (the preset's mesh: fsdp over every device);
  * rows: rows per device in one micro-batch. The global batch is the preset's documented
    `train.batch_size` when it is a multiple of devices * rows, else devices * rows; the rest
    is gradient accumulation (`train.grad_accum_steps`), whose float32 gradient accumulator is
    part of the figure;
  * remat: the language model's `model.remat_policy` (default: the preset's);
  * chunk: `train.loss_chunk_size` (default: the preset's);
  * batch: the global batch (default: as above), e.g. 8 for "8B, batch 8 x 4096 on 8 devices".
Conversation presets (llada_v) get a `fill` and `maskable` field too, so the compiled step is
the one that trains on them.

Per-device peak = arguments + outputs - aliased (donated state) + temporaries, in GiB.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_CASES = flags.DEFINE_list(
    "cases",
    ["llada_1b:1:8", "llada_1b:1:8:save_dots_no_batch:0", "llada_1b:1:8:full",
     "llada_1b:1:2", "llada_1b:8:1", "llada_1b:64:1",
     "llada_8b:8:1", "llada_8b:8:1:full:0", "llada_8b:8:2", "llada_8b:64:1", "llada_8b:64:4",
     "llada_8b:1:1",
     "llada_v:8:1", "llada_v:64:1", "llada_v:64:2", "llada_v:1:1"],
    "cases preset:devices:rows[:remat[:chunk[:batch]]] (see the module docstring)")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", 64, "number of fake CPU devices")

PRESETS = {"llada_1b": ("configs/llada_1b.py", None), "llada_8b": ("configs/llada_8b.py", None),
           "llada_v": ("configs/llada_v.py", "stage2")}


def _load_preset(name: str):
    import importlib.util
    if name not in PRESETS:
        raise ValueError(f"--cases: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    path, arg = PRESETS[name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"preset_{name}", os.path.join(root, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if not 3 <= len(parts) <= 6:
        raise ValueError(f"--cases: {text!r} is not preset:devices:rows[:remat[:chunk[:batch]]]")
    case = {"preset": parts[0], "devices": int(parts[1]), "rows": int(parts[2])}
    if len(parts) > 3 and parts[3]:
        case["remat"] = parts[3]
    if len(parts) > 4 and parts[4]:
        case["chunk"] = int(parts[4])
    if len(parts) > 5:
        case["batch"] = int(parts[5])
    return case


def measure(case: dict) -> dict:
    """Compiles the train step of one case on abstract inputs and returns its memory figures."""
    import jax
    import jax.numpy as jnp

    from llada_jax import config as config_lib
    from llada_jax import parallel
    from llada_jax.train import state as state_lib
    from llada_jax.train import step as step_lib
    from llada_jax.train.optimizer import make_optimizer

    config = _load_preset(case["preset"])
    devices, rows = case["devices"], case["rows"]
    if "remat" in case:
        config.model.remat_policy = case["remat"]
    if "chunk" in case:
        config.train.loss_chunk_size = case["chunk"]
    train = config.train
    per_micro = devices * rows
    if "batch" in case:
        train.batch_size = case["batch"]
    if train.batch_size % per_micro:
        train.batch_size = per_micro
    train.grad_accum_steps = train.batch_size // per_micro
    config_lib.validate(config)
    parallel.validate_mesh(config, devices)
    mesh = parallel.make_mesh(config, jax.devices()[:devices])
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    abstract_state = state_lib.abstract_train_state(model, tx, shardings)

    def field(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=parallel.batch_sharding(mesh, len(shape)))

    batch_rows, length = train.batch_size, train.seq_len
    batch = {"tokens": field((batch_rows, length), jnp.int32)}
    if train.objective != "pretrain":
        batch["maskable"] = field((batch_rows, length), jnp.bool_)
        batch["fill"] = field((batch_rows, length), jnp.bool_)
    if config.vision.enabled:
        size = config.vision.image_size
        batch.update({
            "pixel_values": field((batch_rows, config.vision.max_views, size, size, 3),
                                  jnp.uint8),
            "image_source_index": field((batch_rows, length, 4), jnp.int32),
            "image_source_weight": field((batch_rows, length, 4), jnp.float32),
            "image_is_newline": field((batch_rows, length), jnp.bool_)})
    start = time.time()
    compiled = step.lower(abstract_state, batch).compile()
    analysis = compiled.memory_analysis()
    gib = 2 ** 30
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return {
        "preset": case["preset"], "devices": devices, "mesh": dict(mesh.shape),
        "global_batch": train.batch_size, "seq_len": length,
        "rows_per_device_per_micro_batch": rows, "grad_accum_steps": train.grad_accum_steps,
        "remat": config.model.remat_policy, "loss_chunk_size": train.loss_chunk_size,
        "argument_gib": round(analysis.argument_size_in_bytes / gib, 3),
        "temp_gib": round(analysis.temp_size_in_bytes / gib, 3),
        "peak_per_device_gib": round(peak / gib, 3),
        "fits_95_gib": peak <= 95 * gib, "fits_16_gib": peak <= 16 * gib,
        "compile_s": round(time.time() - start, 1),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        cases = [parse_case(text) for text in _CASES.value]
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Must happen before jax is imported: the fake devices are made when the backend starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_FAKE_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    results = []
    for case in cases:
        if case["devices"] > _FAKE_DEVICES.value:
            sys.exit(f"error: --cases: {case['devices']} devices > --fake_devices="
                     f"{_FAKE_DEVICES.value}")
        try:
            result = measure(case)
        except ValueError as e:
            result = {**case, "error": str(e).splitlines()[0]}
        print(json.dumps(result), flush=True)
        results.append(result)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
