"""iLLaDA-8B: a dense LLaDA with grouped-query attention and tied input/output embeddings.

    python launch/train.py --config=configs/illada_8b.py:/data/tok --workdir=/tmp/illada

Architecture as released: 32 layers, d_model 4096, 32 query / 8 KV heads of 128, SwiGLU 14336,
vocabulary 155136, tied embeddings (logits = h @ wte^T, no LM-head parameter), max length 8192,
mask id 5; the LLaDA (OLMo) checkpoint layout without `ff_out` head. Parameters: 7,615,025,152.
RoPE theta (500000, as LLaDA-8B), RMSNorm eps (1e-5) and the EOS/BOS/pad ids are not among the
published facts we match: set them from the checkpoint's config.json when converting.
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config

ILLADA_8B = ModelConfig(
    vocab_size=155136, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
    mlp_hidden_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=8192,
    mask_token_id=5, eos_token_id=2, bos_token_id=1, pad_token_id=2,
    dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_backend="xla",
    tie_embeddings=True)


def get_config(arg: str | None = None):
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ILLADA_8B))
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.seq_len = 4096
    c.train.batch_size = 1024
    c.train.loss_chunk_size = 512
    c.train.learning_rate = 4e-4
    c.train.warmup_steps = 2000
    c.data.tokenizer = "hf:" + (arg or "iLLaDA-8B")
    c.sampler.gen_length = 128
    c.sampler.block_length = 32
    c.sampler.steps = 128
    return c
