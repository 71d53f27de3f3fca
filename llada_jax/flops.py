"""FLOP counts and accelerator peaks (compute and memory bandwidth), shared by the benchmarks.

Model FLOPs of one forward pass (`forward_flops`; 2 FLOPs per multiply-add):
  * the blocks' matmuls: 2 * W * tokens, W = the weights of q, k, v, attention-out and the three
    SwiGLU projections of every layer (norm scales and the embedding lookup do no matmul); in a
    mixture-of-experts layer the router and the experts a token uses (experts_per_token routed
    plus the shared ones): the active parameters, not every expert;
  * attention: QK^T and AV, each query x key x (n_heads * head_dim) multiply-adds per layer,
    so 4 * n_layers * queries * keys * n_heads * head_dim per sequence (bidirectional: every
    query sees every key, no causal halving);
  * the LM head: 2 * d_model * vocab per position it is applied to (the sampler applies it to
    the current block only).

Model FLOPs of one training step (rematerialisation's recomputation is not counted):
  * matmuls: 6 * N * tokens, N = parameters that enter a matmul (all but the embedding table,
    which is a lookup; the untied LM head, or the tied table as the head, counts; for MoE the
    active parameters, `ModelConfig.num_matmul_params`): 2 FLOPs per multiply-add, forward once
    and backward twice;
  * attention: QK^T and AV are each L * L * (n_heads * head_dim) multiply-adds per layer and
    sequence, so 12 * n_layers * L^2 * n_heads * head_dim forward + backward. Bidirectional:
    the full L x L square, no causal halving.
"""

from __future__ import annotations

from llada_jax.config import ModelConfig

# The peaks of one device, by `device_kind` prefix (the longest prefix wins): (dense bf16
# TFLOP/s, memory bandwidth in GB/s).
PEAKS = {
    "TPU v4": (275.0, 1228.0), "TPU v5 lite": (197.0, 819.0), "TPU v5e": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0), "TPU v5": (459.0, 2765.0), "TPU v6 lite": (918.0, 1640.0),
    "TPU v6e": (918.0, 1640.0), "NVIDIA H200": (989.0, 4800.0), "NVIDIA H100": (989.0, 3350.0),
    "NVIDIA A100": (312.0, 2039.0), "NVIDIA B200": (2250.0, 8000.0),
}


def _peak(column: int, device_kind: str, override: float | None, unit: float) -> float | None:
    """unit x (`override` if given, else `column` of the `PEAKS` entry of the longest prefix of
    `device_kind`); None if unknown."""
    value = override or next((PEAKS[kind][column] for kind in sorted(PEAKS, key=len, reverse=True)
                              if device_kind.startswith(kind)), None)
    return None if value is None else value * unit


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` if given, else `PEAKS`; None if unknown."""
    return _peak(0, device_kind, override_tflops, 1e12)


def peak_bandwidth_per_device(device_kind: str,
                              override_gbps: float | None = None) -> float | None:
    """Peak memory bandwidth in bytes/s: `override_gbps` (GB/s) if given, else `PEAKS`."""
    return _peak(1, device_kind, override_gbps, 1e9)


def _attention_weights(model: ModelConfig) -> int:
    """q, k, v and attention-out weights of one block."""
    return model.d_model * model.head_dim * (2 * model.n_heads + 2 * model.n_kv_heads)


def block_weights(model: ModelConfig) -> int:
    """Matmul weights of one dense transformer block: q, k, v, attention-out and the SwiGLU
    triple."""
    return _attention_weights(model) + 3 * model.d_model * model.mlp_hidden_size


def active_block_weights(model: ModelConfig) -> int:
    """Matmul weights one token goes through in all the blocks together: dense blocks as
    `block_weights`; a mixture-of-experts block counts its router, its `experts_per_token`
    routed experts and its shared experts (the active parameters), not every expert."""
    experts = model.experts_per_token + model.num_shared_experts
    # Attention, the router, and the active experts in place of the dense SwiGLU.
    moe = _attention_weights(model) + model.d_model * (
        model.num_experts + 3 * model.expert_mlp_hidden_size * experts)
    return model.num_dense_layers * block_weights(model) + model.num_moe_layers * moe


def forward_flops(model: ModelConfig, batch: int, queries: int, keys: int | None = None,
                  head_positions: int | None = None) -> float:
    """Model FLOPs of one forward pass of `batch` sequences (see the module docstring).

    queries: positions computed (the canvas, or a cached window); keys: positions they attend
    to (default: queries); head_positions: positions the LM head is applied to (default:
    queries).
    """
    keys = queries if keys is None else keys
    head_positions = queries if head_positions is None else head_positions
    matmuls = 2 * active_block_weights(model) * queries
    attention = 4 * model.n_layers * queries * keys * model.n_heads * model.head_dim
    head = 2 * model.d_model * model.vocab_size * head_positions
    return float(batch * (matmuls + attention + head))


def roofline_seconds(flops: float, bytes_moved: float, peak_flops: float | None,
                     peak_bandwidth: float | None) -> float | None:
    """The compute/bandwidth bound of one step: max(flops / peak FLOP/s, bytes / peak B/s).

    A measured step time t reaches the fraction `roofline_seconds(...) / t` of the bound."""
    if peak_flops is None or peak_bandwidth is None:
        return None
    return max(flops / peak_flops, bytes_moved / peak_bandwidth)


def train_flops_per_step(model: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training step of the language model (see the module docstring)."""
    attention = 12 * model.n_layers * seq_len ** 2 * model.n_heads * model.head_dim * batch_size
    return 6.0 * model.num_matmul_params * batch_size * seq_len + float(attention)
