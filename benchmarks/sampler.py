"""Sampler throughput: tokens/s, seconds per forward pass, MFU, and the speed-up of fast modes;
with --analyze, the compiled program's FLOPs, bytes and buffers against the analytic forward.

    python benchmarks/sampler.py --config=tiny --batch=4 --prompt_len=32 --gen_length=64 \\
        --steps=64 --block_length=16
    python benchmarks/sampler.py --config=llada_8b --batch=1 --prompt_len=128 --gen_length=256 \\
        --steps=256 --block_length=32 --modes=vanilla,prefix,dual,dual+threshold
    python benchmarks/sampler.py --config=llada_8b --analyze --batch=1 --prompt_len=256 \\
        --gen_length=256 --steps=256 --block_length=32 --modes=vanilla

--analyze allocates nothing: abstract parameters (`jax.eval_shape`) and an ahead-of-time
`lower().compile()` for the default backend (the CPU here). Per mode it prints the compiled
program's `cost_analysis()` (FLOPs, bytes accessed) per sampler step next to the analytic forward
FLOPs of the positions a step must process (`flops.forward_flops`: the canvas through every
layer, the LM head on the current block only) and their ratio, the compiled memory analysis,
and every buffer shape in the optimised HLO that has the vocabulary as its last axis (there must
be none over the canvas, [B, L, V] or [L, V]; [B, block, V] is expected; on the CPU backend bf16
matmuls run in float32, so a float32 copy of the bf16 LM head weight [d_model, V] appears too).
XLA's cost analysis counts a loop body once: the sampler's step loop is one step, but the scanned
layers inside it count as ONE layer, so the per-step figure is the program's count plus
(n_layers - 1) x the compiled cost of one block (`Block` compiled alone at the same shapes). Only
vanilla has one pass per step; with a cache the count mixes the refresh and window branches.

Random weights (nothing is downloaded): the numbers measure the program, not the model. Every mode
is one compiled sampler; it is run once to compile, then timed over --repeats runs. Prints one JSON
object: per mode the forward passes, tokens per pass (per sequence), tokens/s (all rows), seconds
per pass, the achieved model FLOP/s and MFU against the compute bound (2 x params FLOPs per
computed position: the canvas length per full pass, the window length per cached pass; attention's
quadratic term is left out), and the speed-up in tokens/s over `vanilla`.

Modes: `vanilla`, or `+`-joined options among `prefix`, `dual` (KV caches), `threshold`,
`factor` (parallel decoding, values from --threshold / --factor) and `early_exit`.
With random weights at the default scale the predictions are nearly uniform, so parallel decoding
commits about one token per pass; --init_std=0.5 makes them peaky enough to show its effect.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax import flops as flops_lib
from llada_jax.config import ModelConfig, default_config, model_config
from llada_jax.diffusion.sampler import SamplerConfig, generate
from llada_jax.model.transformer import Transformer

_CONFIG = flags.DEFINE_enum("config", "tiny", ["tiny", "llada_8b"], "model size")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "compute and parameter dtype (default: float32 tiny, bfloat16 8B)")
_BATCH = flags.DEFINE_integer("batch", 1, "prompts per call")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 64, "generated tokens")
_STEPS = flags.DEFINE_integer("steps", 64, "sampling steps (fixed schedule)")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "block length")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance scale")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "temperature")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "confidence threshold of `threshold` modes")
_FACTOR = flags.DEFINE_float("factor", 1.0, "factor of `factor` modes")
_MODES = flags.DEFINE_list("modes", ["vanilla", "prefix", "dual", "threshold", "dual+threshold"],
                           "modes to compare (see the module docstring)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per mode")
_INIT_STD = flags.DEFINE_float("init_std", None, "std of the random weights (larger: peakier "
                               "predictions, so threshold decoding commits more per pass)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "peak dense TFLOP/s of one device "
                                  "(default: looked up from the device kind; none on CPU)")
_PEAK_GBPS = flags.DEFINE_float("peak_gbps", None, "peak memory bandwidth (GB/s) of one device "
                                "(default: looked up from the device kind; none on CPU)")
_ANALYZE = flags.DEFINE_bool("analyze", False, "compile ahead of time with abstract parameters "
                             "and report FLOPs, bytes and buffers instead of timing")


def model_settings() -> ModelConfig:
    if _CONFIG.value == "tiny":
        config = model_config(default_config())
        dtype = _DTYPE.value or "float32"
    else:
        config = ModelConfig()       # the LLaDA-8B architecture (REFERENCE.md section 1)
        dtype = _DTYPE.value or "bfloat16"
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    if _INIT_STD.value is not None:
        config = dataclasses.replace(config, init_std=_INIT_STD.value)
    return config


def sampler_settings(mode: str, config: ModelConfig) -> SamplerConfig:
    parts = set(mode.split("+"))
    unknown = parts - {"vanilla", "prefix", "dual", "threshold", "factor", "early_exit"}
    if unknown:
        raise ValueError(f"--modes: unknown option(s) {sorted(unknown)} in {mode!r}")
    return SamplerConfig(
        gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value, steps=_STEPS.value,
        temperature=_TEMPERATURE.value, cfg_scale=_CFG_SCALE.value,
        cache="dual" if "dual" in parts else "prefix" if "prefix" in parts else "none",
        threshold=_THRESHOLD.value if "threshold" in parts else 0.0,
        factor=_FACTOR.value if "factor" in parts else 0.0,
        early_exit="early_exit" in parts, mask_id=config.mask_token_id,
        eos_id=config.eos_token_id, eot_id=-1)



def weight_bytes(config: ModelConfig) -> int:
    """Bytes of the weights one forward pass reads: every matmul weight once (blocks and LM
    head; the embedding is a gather of a few rows)."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    return itemsize * (config.n_layers * flops_lib.block_weights(config)
                       + config.d_model * config.vocab_size)


def compiled_block_cost(config: ModelConfig, rows: int, length: int) -> dict:
    """cost_analysis() of one transformer block at [rows, length, d] (abstract, compiled)."""
    from llada_jax.model.attention import MaskInfo
    from llada_jax.model.transformer import Block

    block = Block(config)
    h = jax.ShapeDtypeStruct((rows, length, config.d_model), jnp.dtype(config.dtype))
    positions = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
    params = jax.eval_shape(lambda: nn.meta.unbox(block.init(
        jax.random.key(0), jnp.zeros(h.shape, h.dtype), jnp.zeros(positions.shape, jnp.int32),
        MaskInfo(jnp.ones(mask.shape, bool)), None, None, False)["params"]))

    def apply(p, h, positions, mask):
        return block.apply({"params": p}, h, positions, MaskInfo(mask), None, None, False)[0]

    return jax.jit(apply).lower(params, h, positions, mask).compile().cost_analysis()


def analyze(config: ModelConfig) -> dict:
    """AOT compile of each mode at abstract shapes; FLOPs / bytes / buffers (module docstring)."""
    import re

    from llada_jax.diffusion.sampler import _generate_jit, build_canvas

    model = Transformer(config)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    batch, prompt_len = _BATCH.value, _PROMPT_LEN.value
    length = prompt_len + _GEN_LENGTH.value
    canvas = jax.eval_shape(lambda: build_canvas(
        jnp.zeros((batch, prompt_len), jnp.int32), jnp.ones((batch, prompt_len), bool),
        _GEN_LENGTH.value, config.mask_token_id))
    vocab = config.vocab_size
    results = {}
    for mode in _MODES.value:
        sampler = sampler_settings(mode, config)
        rows = batch * (2 if sampler.cfg_scale > 0 else 1)
        start = time.perf_counter()
        compiled = _generate_jit.lower(params, *canvas, jax.random.key(1), model=model,
                                       config=sampler, gen_start=prompt_len).compile()
        compile_seconds = time.perf_counter() - start
        program = compiled.cost_analysis()
        block = compiled_block_cost(config, rows, length)
        step_flops = program["flops"] + (config.n_layers - 1) * block["flops"]
        step_bytes = (program["bytes accessed"]
                      + (config.n_layers - 1) * block["bytes accessed"])
        analytic = flops_lib.forward_flops(config, rows, length,
                                           head_positions=sampler.block_length)
        memory = compiled.memory_analysis()
        # Every array shape in the optimised program whose last axis is the vocabulary.
        vocab_shapes = sorted(set(re.findall(rf"\b(\w+)\[([\d,]*,{vocab})\]", compiled.as_text())))
        # Logits-like arrays over at least a canvas' worth of positions ([B, L, V], or [L, V]
        # once XLA folds a batch of 1); the LM head weight [d_model, V] is not one.
        canvas_vocab = [f"{t}[{s}]" for t, s in vocab_shapes
                        if math.prod(map(int, s.split(",")[:-1])) >= length
                        and s.split(",")[:-1] != [str(config.d_model)]]
        results[mode] = {
            "compile_seconds": round(compile_seconds, 1),
            "compiled_flops_per_step": step_flops,
            "analytic_forward_flops_per_step": analytic,
            "compiled_over_analytic": round(step_flops / analytic, 4),
            "analytic_with_head_on_whole_canvas": flops_lib.forward_flops(config, rows, length),
            "compiled_bytes_accessed_per_step": step_bytes,
            "weight_bytes_per_pass": weight_bytes(config),
            "compiled_one_block_flops": block["flops"],
            "program_flops_as_counted": program["flops"],
            "temp_bytes": memory.temp_size_in_bytes,
            "argument_bytes": memory.argument_size_in_bytes,
            "vocab_shapes": [f"{t}[{s}]" for t, s in vocab_shapes],
            "canvas_by_vocab_buffers": canvas_vocab,
        }
    return {"config": _CONFIG.value, "params": config.num_params, "dtype": config.dtype,
            "backend": jax.default_backend(), "batch": batch, "prompt_len": prompt_len,
            "gen_length": _GEN_LENGTH.value, "block_length": _BLOCK_LENGTH.value,
            "cfg_scale": _CFG_SCALE.value, "modes": results}


def main(argv: list[str]) -> None:
    del argv
    config = model_settings()
    if _ANALYZE.value:
        print(json.dumps(analyze(config), indent=2))
        return
    model = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(
        model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(0))
    rng = np.random.default_rng(0)
    low = max(config.mask_token_id, config.eos_token_id) + 1
    prompt = rng.integers(low, config.vocab_size, size=(_BATCH.value, _PROMPT_LEN.value))
    prompt = jnp.asarray(prompt, jnp.int32)
    mask = jnp.ones(prompt.shape, bool)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, _PEAK_TFLOPS.value)
    bandwidth = flops_lib.peak_bandwidth_per_device(jax.devices()[0].device_kind,
                                                    _PEAK_GBPS.value)
    rows = _BATCH.value * (2 if _CFG_SCALE.value > 0 else 1)
    results = {}
    for mode in _MODES.value:
        sampler = sampler_settings(mode, config)
        start = time.perf_counter()
        out = generate(params, model, prompt, mask, sampler, jax.random.key(1), return_stats=True)
        jax.block_until_ready(out)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for repeat in range(_REPEATS.value):
            out = generate(params, model, prompt, mask, sampler, jax.random.key(2 + repeat),
                           return_stats=True)
            jax.block_until_ready(out)
        seconds = (time.perf_counter() - start) / _REPEATS.value
        passes = int(out.num_forward_passes)
        tokens = _BATCH.value * sampler.gen_length
        flops = 2.0 * config.num_params * rows * int(out.computed_positions)
        # The bound of the run: per pass the larger of its FLOPs at peak compute and its weight
        # bytes at peak bandwidth (the forward FLOPs with the LM head on the block only).
        length = _PROMPT_LEN.value + sampler.gen_length
        step_flops = flops_lib.forward_flops(config, rows, length,
                                             head_positions=sampler.block_length)
        bound = flops_lib.roofline_seconds(step_flops, weight_bytes(config), peak, bandwidth)
        results[mode] = {
            "forward_passes": passes,
            "tokens_per_pass": round(sampler.gen_length / max(passes, 1), 3),   # per sequence
            "tokens_per_second": round(tokens / seconds, 2),
            "seconds": round(seconds, 4),
            "seconds_per_pass": round(seconds / max(passes, 1), 6),
            "model_tflops_per_second": round(flops / seconds / 1e12, 4),
            "mfu": None if peak is None else round(flops / seconds / peak, 4),
            # Exact for vanilla (every pass a full pass); cached passes do less than this.
            "fraction_of_bound": (None if bound is None or sampler.cache != "none"
                                  else round(bound * passes / seconds, 4)),
            "first_call_seconds": round(compile_seconds, 2),
        }
    if "vanilla" in results:
        for result in results.values():
            result["speedup_vs_vanilla"] = round(
                result["tokens_per_second"] / results["vanilla"]["tokens_per_second"], 3)
    print(json.dumps({
        "config": _CONFIG.value, "params": config.num_params, "dtype": config.dtype,
        "device": jax.devices()[0].device_kind, "devices": 1, "batch": _BATCH.value,
        "prompt_len": _PROMPT_LEN.value, "gen_length": _GEN_LENGTH.value,
        "steps": _STEPS.value, "block_length": _BLOCK_LENGTH.value,
        "cfg_scale": _CFG_SCALE.value, "peak_flops_per_device": peak,
        "peak_bandwidth_per_device": bandwidth, "modes": results,
    }, indent=2))


if __name__ == "__main__":
    app.run(main)
