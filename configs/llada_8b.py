"""LLaDA-8B (REFERENCE.md section 1) pre-training on a TPU pod slice.

    python launch/tpu_pod.py --tpu=NAME --zone=ZONE --config=configs/llada_8b.py:/data/llada \
        --workdir=gs://BUCKET/llada_8b -- --config.data.source=tfds:NAME

The argument is the directory of the released Hugging Face tokenizer (`tokenizer.json`), default
`LLaDA-8B-Base`. Architecture exactly as released: d_model 4096, 32 layers, 32 / 32 heads of
128, SwiGLU 12288, vocabulary 126464, RoPE theta 500000, RMSNorm eps 1e-5, mask 126336,
EOS/pad 126081, BOS 126080; 8,015,581,184 parameters. bf16 compute with float32 master weights,
full rematerialisation, fully sharded (FSDP) over every device, the LM head and cross-entropy in
chunks of 512 positions (`train.loss_chunk_size`: the [B, L, 126464] logits never exist;
the LM head and embedding gradients stay sharded): 19.8 GiB per device at batch 8 x 4096 on 8
devices (benchmarks/RESULTS.md).
Optimisation follows the paper: AdamW (0.9, 0.95, weight decay 0.1), clip 1.0,
warmup-stable-decay with peak 4e-4, 2000 warmup steps, linear decay to 1e-5 over the last 0.3T
of 2.3T tokens (1280 x 4096 tokens per step).
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(
        vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        mlp_hidden_size=12288, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096,
        mask_token_id=126336, eos_token_id=126081, bos_token_id=126080, pad_token_id=126081,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_backend="xla")))
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.seq_len = 4096
    c.train.batch_size = 1280
    c.train.loss_chunk_size = 512
    c.train.steps = 440_000            # 2.3T tokens / (1280 * 4096)
    c.train.learning_rate = 4e-4
    c.train.schedule = "wsd"
    c.train.warmup_steps = 2000
    c.train.decay_fraction = 0.13      # the last 0.3T of 2.3T tokens
    c.train.min_lr_ratio = 0.025       # 1e-5 / 4e-4
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.eval_every = 0
    c.data.tokenizer = "hf:" + (arg or "LLaDA-8B-Base")
    # The reference sampler defaults (REFERENCE.md section 3) and the released <|eot_id|>.
    c.sampler.gen_length = 128
    c.sampler.block_length = 32
    c.sampler.steps = 128
    c.sampler.eot_token_id = 126348
    return c
