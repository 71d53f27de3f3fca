"""Host memory and time of Hugging Face checkpoint import/export, printed as JSON.

    python benchmarks/convert.py [--d_model=768 --n_layers=8 --vocab_size=32000 ...]

Builds a random checkpoint in the released LLaDA layout (bf16 safetensors shards + index +
config.json, about 100M parameters by default) in a temporary directory, then, in a fresh child
process each, imports it (as float32 params, so the model in memory is twice the file) and exports
it back (bf16). Each child resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) right
before the conversion and reads ``VmHWM`` after it, so the peak covers the conversion alone.

On CPU the "devices" live in host memory, so an import necessarily ends holding one copy of the
model; the streaming design is meant to add only about one stacked parameter on top of that.
`peak_over_model` is the peak RSS increase divided by the imported model's bytes: ~1 is ideal,
2 would mean two full copies.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_STAGE = flags.DEFINE_enum("stage", "all", ["all", "import", "export"], "internal: child stage")
_DIR = flags.DEFINE_string("dir", None, "internal: checkpoint directory of a child stage")
_D_MODEL = flags.DEFINE_integer("d_model", 768, "hidden size")
_N_LAYERS = flags.DEFINE_integer("n_layers", 8, "layers")
_N_HEADS = flags.DEFINE_integer("n_heads", 12, "attention heads (and kv heads)")
_MLP = flags.DEFINE_integer("mlp_hidden_size", 2048, "SwiGLU hidden size")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "vocabulary (embedding rows)")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 64, "shard size of the built checkpoint, MB")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current RSS


def build_checkpoint(directory: str) -> dict:
    """Writes random bf16 weights in the released layout, one shard in memory at a time."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    d, layers, heads, mlp, vocab = (_D_MODEL.value, _N_LAYERS.value, _N_HEADS.value, _MLP.value,
                                    _VOCAB.value)
    shapes = {"model.transformer.wte.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.transformer.blocks.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
                       p + "q_proj.weight": (d, d), p + "k_proj.weight": (d, d),
                       p + "v_proj.weight": (d, d), p + "attn_out.weight": (d, d),
                       p + "ff_proj.weight": (mlp, d), p + "up_proj.weight": (mlp, d),
                       p + "ff_out.weight": (d, mlp)})
    shapes.update({"model.transformer.ln_f.weight": (d,),
                   "model.transformer.ff_out.weight": (vocab, d)})
    rng = np.random.default_rng(0)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        if groups[-1] and size + 2 * math.prod(shape) > _SHARD_MB.value * 2 ** 20:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += 2 * math.prod(shape)
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: (0.02 * rng.standard_normal(shapes[k], np.float32)).astype(
            ml_dtypes.bfloat16) for k in keys}, os.path.join(directory, name),
            metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(2 * math.prod(s) for s in shapes.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"d_model": d, "n_heads": heads, "n_kv_heads": heads, "n_layers": layers,
              "mlp_hidden_size": mlp, "vocab_size": vocab, "embedding_size": vocab,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 4096,
              "mask_token_id": vocab - 3, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
              "pad_token_id": vocab - 1, "block_type": "llama", "layer_norm_type": "rms",
              "activation_type": "silu", "weight_tying": False, "include_bias": False}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]) *
                  (layers if ".blocks." in kv[0] else 1))
    return {"num_params": sum(math.prod(s) for s in shapes.values()), "file_bytes": total,
            "num_tensors": len(shapes), "num_shards": len(groups),
            "largest_param": largest[0].replace(".0.", ".{i}.")}


def child_import(directory: str) -> dict:
    import jax

    from llada_jax.interop import hf, mapping

    jax.devices()   # backend up before the measurement
    mapping.abstract_params(hf.inspect_hf_checkpoint(directory).config)   # tracing is not I/O
    before = _rss_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    config, params = hf.import_hf(directory, param_dtype="float32")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak, after = _rss_bytes("VmHWM"), _rss_bytes("VmRSS")
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    stacked = max(x.nbytes for x in jax.tree.leaves(params))
    return {"seconds": round(seconds, 2), "model_bytes": model_bytes,
            "largest_param_bytes": stacked, "peak_rss_delta_bytes": peak - before,
            "retained_rss_delta_bytes": after - before,
            "peak_over_model": round((peak - before) / model_bytes, 3),
            "ideal_peak_over_model": round((model_bytes + stacked) / model_bytes, 3),
            "param_dtype": config.param_dtype}


def child_export(directory: str) -> dict:
    import jax

    from llada_jax.interop import hf

    config, params = hf.import_hf(directory, param_dtype="float32")
    jax.block_until_ready(params)
    out = os.path.join(os.path.dirname(directory), "exported")
    before = _rss_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    summary = hf.export_hf(params, config, out, naming="llada", dtype="bfloat16",
                           max_shard_bytes=_SHARD_MB.value * 2 ** 20)
    seconds = time.perf_counter() - start
    peak = _rss_bytes("VmHWM")
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"seconds": round(seconds, 2), "written_bytes": summary.num_bytes,
            "num_shards": summary.num_shards, "peak_rss_delta_bytes": peak - before,
            "peak_over_model": round((peak - before) / model_bytes, 3)}


def run_child(stage: str, directory: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), f"--stage={stage}", f"--dir={directory}",
            f"--shard_mb={_SHARD_MB.value}"]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    result = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{stage} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    if _STAGE.value == "import":
        print(json.dumps(child_import(_DIR.value)))
        return
    if _STAGE.value == "export":
        print(json.dumps(child_export(_DIR.value)))
        return
    with tempfile.TemporaryDirectory(prefix="llada_convert_bench_") as tmp:
        directory = os.path.join(tmp, "hf")
        os.makedirs(directory)
        checkpoint = build_checkpoint(directory)
        report = {"checkpoint": checkpoint, "import": run_child("import", directory),
                  "export": run_child("export", directory)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
