"""Tiny MoE vs the dense tiny model at equal active parameters: training loss side by side.

    JAX_PLATFORMS=cpu python benchmarks/moe_vs_dense.py [--steps=300] [--seed=0]

Trains `configs/moe_tiny.py` (8 experts of 64, 2 per token) and the same config with the dense
SwiGLU of 128 (the same active FFN parameters per token) on the built-in corpus with the same
seed, data and schedule, and prints one JSON object: the mean diffusion loss (`lm_loss` for the
MoE, which excludes the router losses) over the first and last 10% of the logged steps of each,
and the MoE's expert load max/mean at the end. A measurement for issue 16, not a test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = flags.DEFINE_integer("steps", 300, "training steps of each run")
SEED = flags.DEFINE_integer("seed", 0, "training seed of both runs")


def _run(config, name: str) -> dict:
    from llada_jax.train import trainer

    with tempfile.TemporaryDirectory() as workdir:
        history = trainer.train(config, workdir).history
    key = "lm_loss" if "lm_loss" in history[-1] else "loss"
    losses = [h[key] for h in history if key in h]
    tenth = max(1, len(losses) // 10)
    out = {"run": name, "logged_steps": len(losses),
           "loss_first_10pct": sum(losses[:tenth]) / tenth,
           "loss_last_10pct": sum(losses[-tenth:]) / tenth}
    if "moe_load_max_over_mean" in history[-1]:
        out["load_max_over_mean_last"] = history[-1]["moe_load_max_over_mean"]
    return out


def main(argv: list[str]) -> None:
    del argv
    from configs.moe_tiny import get_config

    moe = get_config()
    moe.train.steps, moe.train.seed, moe.train.log_every = STEPS.value, SEED.value, 1
    moe.train.checkpoint_every, moe.mesh.fsdp = 0, 1
    dense = get_config()
    dense.train.steps, dense.train.seed, dense.train.log_every = STEPS.value, SEED.value, 1
    dense.train.checkpoint_every, dense.mesh.fsdp = 0, 1
    dense.model.update(num_experts=0, experts_per_token=0, expert_mlp_hidden_size=0,
                       qk_norm=True)   # mlp_hidden_size 128: the MoE's active FFN size
    results = [_run(dense, "dense (SwiGLU 128, QK-norm)"), _run(moe, "moe (8 x 64, top-2)")]
    print(json.dumps({"steps": STEPS.value, "seed": SEED.value, "runs": results}, indent=1))


if __name__ == "__main__":
    app.run(main)
