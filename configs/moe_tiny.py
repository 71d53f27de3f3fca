"""Tiny mixture-of-experts LLaDA on the built-in synthetic corpus (CPU, about a minute).

    python launch/train.py --config=configs/moe_tiny.py --workdir=/tmp/moe_tiny
    python launch/train.py --config=configs/moe_tiny.py:llada2 --workdir=/tmp/moe_tiny2

The default tiny model (d_model 64, 2 layers, 4 heads, char vocabulary 128) with every FFN a
mixture of 8 SwiGLU experts of 64, 2 per token: the same active FFN parameters per token as the
dense tiny model's SwiGLU of 128 (2 x 3 x 64 x 64 = 3 x 64 x 128), softmax router and QK-norm
(LLaDA-MoE style), load-balancing loss 0.01 and z-loss 0.001. `:llada2` is the LLaDA2-style
variant: layer 0 dense, sigmoid router over 4 groups of 2 (best 2 groups), 1 shared expert of 64
(so 1 routed per token keeps the active size), weights renormalised x 2.5, partial rotary (8 of
16 dims), expert-bias update 1e-3. `:quick` / `:llada2,quick` run 60 steps for smoke tests.
"""

from llada_jax.config import default_config


def get_config(arg: str | None = None):
    options = set(filter(None, (arg or "").split(",")))
    unknown = options - {"llada2", "quick"}
    if unknown:
        raise ValueError(f"configs/moe_tiny.py: expected options among 'llada2', 'quick', "
                         f"found {sorted(unknown)}")
    c = default_config()
    c.model.update(num_experts=8, experts_per_token=2, expert_mlp_hidden_size=64,
                   router="softmax", qk_norm=True)
    c.train.moe_aux_loss_weight = 0.01
    c.train.moe_z_loss_weight = 0.001
    c.train.moe_bias_update_rate = 0.0
    if "llada2" in options:
        c.model.update(experts_per_token=1, num_shared_experts=1, first_k_dense=1,
                       router="sigmoid_grouped", router_groups=4, router_top_groups=2,
                       routed_scaling=2.5, normalize_top_k=True, rotary_dim=8)
        c.train.moe_bias_update_rate = 1e-3
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.seq_len = 64
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 30
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.train.eval_every = 0
    c.data.source = "synthetic"
    c.data.tokenizer = "char"
    if "quick" in options:
        c.train.steps = 60
        c.train.warmup_steps = 10
        c.train.log_every = 10
        c.train.checkpoint_every = 60
    return c
