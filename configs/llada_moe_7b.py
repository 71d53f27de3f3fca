"""LLaDA-MoE-7B-A1B: the mixture-of-experts LLaDA (64 experts, 8 per token) on a pod slice.

    python launch/tpu_pod.py --tpu=NAME --zone=ZONE --config=configs/llada_moe_7b.py:/data/tok \
        --workdir=gs://BUCKET/llada_moe -- --config.data.source=tfds:NAME

The argument is the directory of the released Hugging Face tokenizer (default `LLaDA-MoE-7B-A1B-
Base`). Architecture as released: 16 layers, d_model 2048, 16 heads of 128 (no GQA), QK-norm
(RMSNorm over head_dim before RoPE), rotate-half RoPE theta 50000 (after the 8k context
extension), every layer MoE: 64 SwiGLU experts of 1024, 8 per token, softmax router in float32
without renormalising the top-8 weights, no shared experts; untied embeddings, vocabulary
157184, mask 156895, EOS/pad 156892. Parameters (ModelConfig.num_params): 7,356,880,896 total,
1,397,823,488 active in matmuls per token (1,719,736,320 with the embedding table).
Training: load-balancing loss 0.01 and router z-loss (weight 0.001 here: the released recipe's
z-loss weight is not published). BOS is not published in the facts we match: bos_token_id is
set to the EOS id and only matters with data.add_bos.
Experts are sharded over mesh.expert (8), the rest fully sharded over fsdp.
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config

LLADA_MOE_7B = ModelConfig(
    vocab_size=157184, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, head_dim=128,
    mlp_hidden_size=1024,  # unused: no dense layers (first_k_dense 0)
    rope_theta=50000.0, rms_norm_eps=1e-6, max_sequence_length=8192,
    mask_token_id=156895, eos_token_id=156892, bos_token_id=156892, pad_token_id=156892,
    dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_backend="xla",
    num_experts=64, experts_per_token=8, expert_mlp_hidden_size=1024, router="softmax",
    normalize_top_k=False, qk_norm=True)


def get_config(arg: str | None = None):
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(LLADA_MOE_7B))
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8
    c.mesh.tensor = 1
    c.train.seq_len = 4096
    c.train.batch_size = 1024
    c.train.loss_chunk_size = 512
    c.train.learning_rate = 4e-4
    c.train.warmup_steps = 2000
    c.train.moe_aux_loss_weight = 0.01
    c.train.moe_z_loss_weight = 0.001
    c.train.moe_bias_update_rate = 0.0
    c.data.tokenizer = "hf:" + (arg or "LLaDA-MoE-7B-A1B-Base")
    c.sampler.gen_length = 128
    c.sampler.block_length = 32
    c.sampler.steps = 128
    return c
