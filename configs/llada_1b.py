"""A ~1.1B-parameter LLaDA for one-accelerator benchmarks (one GPU or TPU chip).

    python benchmarks/train_step.py --config=configs/llada_1b.py

Same family as LLaDA-8B (LLaDA tokenizer ids and vocabulary, head_dim 128, RoPE theta 500000)
at d_model 2048, 12 layers, 16 heads, SwiGLU 5632: 1,134,610,432 parameters, 518M of them in the
embedding and the LM head. bf16 compute, float32 master weights, sequences of 2048. The
argument is the Hugging Face tokenizer directory (for training; benchmarks need none).

Memory (benchmarks/memory.py, XLA's compiled analysis): full rematerialisation and the LM head +
cross-entropy in chunks of 256 positions (`train.loss_chunk_size`) keep batch 8 x 2048 with
AdamW in float32 under 26 GiB on one device. On an accelerator with more memory (H200: 141 GB)
`--config.model.remat_policy=save_dots_no_batch` recomputes less (see benchmarks/RESULTS.md).
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(
        vocab_size=126464, d_model=2048, n_layers=12, n_heads=16, n_kv_heads=16, head_dim=128,
        mlp_hidden_size=5632, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=2048,
        mask_token_id=126336, eos_token_id=126081, bos_token_id=126080, pad_token_id=126081,
        dtype="bfloat16", param_dtype="float32", remat_policy="full",
        attention_backend="xla")))
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.seq_len = 2048
    c.train.batch_size = 8
    c.train.loss_chunk_size = 256      # the [B, L, 126464] logits never exist at once
    c.train.steps = 10_000
    c.train.learning_rate = 4e-4
    c.train.warmup_steps = 500
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.data.tokenizer = "hf:" + (arg or "LLaDA-8B-Base")
    return c
