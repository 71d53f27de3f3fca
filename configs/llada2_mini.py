"""LLaDA2.0-mini (16B, 1.4B active) as a mixture-of-experts LLaDA mask predictor.

    python launch/train.py --config=configs/llada2_mini.py:/data/tok --workdir=/tmp/llada2

Architecture as released: 20 layers, d_model 2048, 16 query / 4 KV heads of 128, QK-norm,
partial rotary (first 64 of 128 dims, rotate-half) theta 600000, RMSNorm eps 1e-6; layer 0 dense
(SwiGLU 5120), layers 1-19 MoE: 256 SwiGLU experts of 512, 8 per token, plus 1 shared expert;
sigmoid router in float32 with an expert bias used only for the choice, group-limited (8 groups,
the best 4 by the sum of their top-2 biased scores), weights = unbiased scores renormalised x
2.5; vocabulary 157184, untied, mask 156895, EOS/pad 156892. Parameters: 16,255,643,392 total
(the 19 x 256 expert biases included), 1,111,060,224 active in matmuls per token (1,432,973,056
with the embedding table). LLaDA2's block-diffusion attention and sampler are not modelled: the
tower runs with full bidirectional attention and the LLaDA objective. Balancing is LLaDA2's
auxiliary-loss-free expert-bias update (rate 1e-3) plus a small load-balancing loss.
max_sequence_length 8192 and BOS (= EOS) are not among the published facts we match.
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config

LLADA2_MINI = ModelConfig(
    vocab_size=157184, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4, head_dim=128,
    mlp_hidden_size=5120, rope_theta=600000.0, rms_norm_eps=1e-6, max_sequence_length=8192,
    mask_token_id=156895, eos_token_id=156892, bos_token_id=156892, pad_token_id=156892,
    dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_backend="xla",
    num_experts=256, experts_per_token=8, expert_mlp_hidden_size=512, num_shared_experts=1,
    first_k_dense=1, router="sigmoid_grouped", router_groups=8, router_top_groups=4,
    routed_scaling=2.5, normalize_top_k=True, qk_norm=True, rotary_dim=64)


def get_config(arg: str | None = None):
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(LLADA2_MINI))
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8
    c.mesh.tensor = 1
    c.train.seq_len = 4096
    c.train.batch_size = 1024
    c.train.loss_chunk_size = 512
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 2000
    c.train.moe_aux_loss_weight = 0.001
    c.train.moe_z_loss_weight = 0.0
    c.train.moe_bias_update_rate = 1e-3
    c.data.tokenizer = "hf:" + (arg or "LLaDA2.0-mini")
    c.sampler.gen_length = 128
    c.sampler.block_length = 32
    c.sampler.steps = 128
    return c
