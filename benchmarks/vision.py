"""LLaDA-V benchmark: vision tower + projector throughput, multimodal train step MFU (JSON).

    python benchmarks/vision.py --config=configs/llada_v_tiny.py
    python benchmarks/vision.py --config=configs/llada_v.py:stage2 --views=16 \\
        --config.train.batch_size=8 --config.train.seq_len=8192        # on an accelerator

1. Encoder: `--views` image views (uint8, `vision.image_size` square) through the vision tower
   and the projector (`LLaDAV.encode_images`), jitted; reports views/s (= images/s for square
   images; an AnyRes image is 1 + its tiles views) and the achieved TFLOP/s.
2. Train step: the trainer's jitted step (`train/step.py`, the same one `launch/train.py` runs)
   on batches made by the real data path (`multimodal_data.MultimodalRows`): one
   `--image_width` x `--image_height` noise image per row and filler text up to `train.seq_len`.
   Reports step time, tokens/s, images/s and MFU.

Model FLOPs (forward x 3 for forward + backward, every parameter counted as trained;
rematerialisation's recomputation is not counted):
  * language model: as benchmarks/train_step.py, 6 N tokens + 12 n_layers L^2 n_heads head_dim;
  * vision tower, per view of T = (image_size / patch)^2 tokens and width w, MLP m, patch p:
    2 T (p^2 C w + layers (4 w^2 + 2 w m)) + layers * 4 T^2 w forward (QK^T and AV);
  * projector, per view token: 2 (w d + d^2) forward.
Every row runs `vision.max_views` views through the tower (padding views included: they are
computed), so the vision FLOPs count them all.
MFU = model FLOPs per second / (devices x peak bf16 FLOP/s of a device); null on CPU unless
`--peak_tflops` is given.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llada_v_tiny.py", "config preset")
_VIEWS = flags.DEFINE_integer("views", 64, "views per encoder call")
_STEPS = flags.DEFINE_integer("steps", 5, "timed calls")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed calls first")
_IMAGE_WIDTH = flags.DEFINE_integer("image_width", 0, "train step: image width (0: image_size)")
_IMAGE_HEIGHT = flags.DEFINE_integer("image_height", 0, "train step: image height (0: image_size)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "peak bf16 TFLOP/s of one device")


def vision_flops_per_view(vision) -> float:
    """Forward FLOPs of the tower on one view (see the module docstring)."""
    tokens, width, layers = vision.num_patches, vision.width, vision.num_layers_used
    patch = vision.patch_size ** 2 * vision.num_channels * width
    per_layer = 4 * width ** 2 + 2 * width * vision.mlp_dim
    return 2.0 * tokens * (patch + layers * per_layer) + layers * 4.0 * tokens ** 2 * width


def projector_flops_per_view(vision, d_model: int) -> float:
    return 2.0 * vision.num_patches * (vision.width * d_model + d_model ** 2)


def _timed(fn, args, warmup: int, steps: int):
    import jax

    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    start = time.time()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.time() - start) / steps, out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    import jax
    import numpy as np

    from llada_jax import config as config_lib
    from llada_jax import flops as flops_lib
    from llada_jax import parallel
    from llada_jax.data import multimodal_data as md
    from llada_jax.data.tokenizer import load_tokenizer
    from llada_jax.model.multimodal import LLaDAV
    from llada_jax.train import state as state_lib
    from llada_jax.train import step as step_lib
    from llada_jax.train.optimizer import make_optimizer

    config = _CONFIG.value
    try:
        config_lib.validate(config)
        parallel.validate_mesh(config, jax.device_count())
        if not config.vision.enabled:
            raise ValueError("config.vision.enabled: expected True for the LLaDA-V benchmark")
    except ValueError as e:
        sys.exit(f"error: {e}")
    model_cfg, vision = config_lib.model_config(config), config_lib.vision_config(config)
    train = config.train
    devices = jax.devices()
    peak = flops_lib.peak_flops_per_device(devices[0].device_kind, _PEAK_TFLOPS.value)
    report = {"config": {"vision_width": vision.width, "vision_layers": vision.num_layers_used,
                         "image_size": vision.image_size, "tokens_per_view": vision.num_patches,
                         "vision_params": vision.num_params, "d_model": model_cfg.d_model,
                         "lm_params": model_cfg.num_params, "batch_size": train.batch_size,
                         "seq_len": train.seq_len, "trainable": train.trainable,
                         "dtype": model_cfg.dtype, "vision_dtype": vision.dtype},
              "devices": len(devices), "device_kind": devices[0].device_kind}

    # 1. Encoder throughput.
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.create_train_state(model, tx, mesh, rules, train.seed, shardings)
    views = np.random.default_rng(0).integers(
        0, 256, (_VIEWS.value, vision.image_size, vision.image_size, 3), dtype=np.uint8)
    encode = step_lib.MeshFunction(jax.jit(
        lambda p, v: model.apply({"params": p}, v, method=LLaDAV.encode_images)), mesh, rules)
    batch_views = parallel.global_batch({"v": views}, mesh)["v"]
    seconds, _ = _timed(encode, (state.params, batch_views), _WARMUP.value, _STEPS.value)
    encoder_flops = _VIEWS.value * (vision_flops_per_view(vision)
                                    + projector_flops_per_view(vision, model_cfg.d_model))
    report["encoder"] = {
        "views": _VIEWS.value, "time_s": round(seconds, 5),
        "views_per_s": round(_VIEWS.value / seconds, 2),
        "tflops_per_s": round(encoder_flops / seconds / 1e12, 4),
        "mfu": None if peak is None else round(encoder_flops / seconds / (peak * len(devices)), 4)}

    # 2. The multimodal train step.
    tokenizer = load_tokenizer(config.data.tokenizer)
    processor = md.ImageProcessor.from_config(config)
    size = (_IMAGE_WIDTH.value or vision.image_size, _IMAGE_HEIGHT.value or vision.image_size)
    image = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image_tokens = processor.num_tokens(size)
    overhead = len(md.encode_conversation(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}],
        [image], tokenizer, processor).ids)
    filler = max(train.seq_len - overhead - 8, 1)
    rows = md.MultimodalRows(tokenizer, processor, train.seq_len, config.vision.max_views, "error")
    row = rows({"image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + "x" * (filler // 2)},
        {"from": "gpt", "value": "y" * (filler - filler // 2)}]})
    host = {k: np.stack([v] * (train.batch_size // jax.process_count()))
            for k, v in row.items()}
    batch = parallel.global_batch(host, mesh)
    train_step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    start = time.time()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    report["train_step_first_call_s"] = round(time.time() - start, 2)   # compile + one step
    for _ in range(max(_WARMUP.value - 1, 0)):
        state, metrics = train_step(state, batch)   # the state is donated: thread it through
    jax.block_until_ready(metrics)
    start = time.time()
    for _ in range(_STEPS.value):
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.time() - start) / _STEPS.value
    views_per_row = len(processor(image)[0])
    lm_flops = flops_lib.train_flops_per_step(model_cfg, train.batch_size, train.seq_len)
    vision_flops = 3.0 * train.batch_size * config.vision.max_views * (
        vision_flops_per_view(vision) + projector_flops_per_view(vision, model_cfg.d_model))
    flops = lm_flops + vision_flops
    report["train_step"] = {
        "image_size": list(size), "image_tokens_per_row": image_tokens,
        "views_per_row": views_per_row, "max_views": config.vision.max_views,
        "step_time_s": round(seconds, 5),
        "tokens_per_s": round(train.batch_size * train.seq_len / seconds, 1),
        "images_per_s": round(train.batch_size / seconds, 2),
        "model_flops_per_step": flops, "vision_share_of_flops": round(vision_flops / flops, 4),
        "model_tflops_per_s": round(flops / seconds / 1e12, 4),
        "mfu": None if peak is None else round(flops / seconds / (peak * len(devices)), 4),
        "loss": float(metrics["loss"])}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
