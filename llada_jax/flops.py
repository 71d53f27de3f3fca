"""FLOP counts and accelerator peaks for MFU, shared by the benchmarks.

Model FLOPs of one training step (rematerialisation's recomputation is not counted):
  * matmuls: 6 * N * tokens, N = parameters that enter a matmul (all but the embedding table,
    which is a lookup; the untied LM head counts): 2 FLOPs per multiply-add, forward once and
    backward twice;
  * attention: QK^T and AV are each L * L * (n_heads * head_dim) multiply-adds per layer and
    sequence, so 12 * n_layers * L^2 * n_heads * head_dim forward + backward. Bidirectional:
    the full L x L square, no causal halving.
"""

from __future__ import annotations

from llada_jax.config import ModelConfig

# Dense bf16 peak TFLOP/s of one device, by `device_kind` prefix (the longest prefix wins).
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H200": 989.0, "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0,
}


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` if given, else the table; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAK_TFLOPS[prefix] * 1e12
    return None


def train_flops_per_step(model: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training step of the language model (see the module docstring)."""
    matmul_params = model.num_params - model.vocab_size * model.d_model
    attention = 12 * model.n_layers * seq_len ** 2 * model.n_heads * model.head_dim * batch_size
    return 6.0 * matmul_params * batch_size * seq_len + float(attention)
