"""Official evaluation settings of LLaDA-8B-Base, one preset per task, with the published score.

    python launch/evaluate.py --checkpoint=/ckpt/llada-8b-base \
        --preset=configs/eval/llada_base.py:arc_challenge

Source: the official `eval_llada_lm_eval.sh` (lm-eval task names, few-shot counts, cfg, mc_num,
batch) and `EVAL.md` (scores, lm-eval column) of github.com/ML-GSAI/LLaDA. Likelihood tasks:
`published` is the score with the preset's cfg; `published_no_cfg` the paper's Table 1 (cfg 0).
Generation tasks run gen_length = steps = block_length = 1024 (the paper's setting; 512 and 256
score within about a point, see EVAL.md). `batch_size` is the official Monte Carlo batch.
"""

import ml_collections

# task: (lm-eval task, few-shot, cfg, mc_num, mc batch, published with cfg, published cfg 0)
LIKELIHOOD = {
    "arc_challenge": ("arc_challenge", 0, 0.5, 128, 8, 47.9, 45.9),
    "hellaswag": ("hellaswag", 0, 0.5, 128, 8, 72.5, 70.5),
    "truthfulqa_mc2": ("truthfulqa_mc2", 0, 2.0, 128, 8, 46.4, 46.1),
    "winogrande": ("winogrande", 5, 0.0, 128, 8, 74.8, 74.8),
    "piqa": ("piqa", 0, 0.5, 128, 8, 74.4, 73.6),
    "gpqa": ("gpqa_main_n_shot", 5, 0.5, 128, 8, 26.1, 25.2),
    "mmlu": ("mmlu", 5, 0.0, 1, 1, 65.9, 65.9),
    "cmmlu": ("cmmlu", 5, 0.0, 1, 1, 69.9, 69.9),
    "ceval": ("ceval-valid", 5, 0.0, 1, 1, 70.5, 70.5),
}

# task: (lm-eval task, published at gen_length = steps = block_length = 1024)
GENERATION = {
    "bbh": ("bbh", 49.7),
    "gsm8k": ("gsm8k", 70.3),
    "math": ("minerva_math", 31.4),
    "humaneval": ("humaneval", 35.4),
    "mbpp": ("mbpp", 40.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg in LIKELIHOOD:
        task, shots, cfg, mc_num, batch, published, published_no_cfg = LIKELIHOOD[arg]
        model_args = {"mc_num": mc_num, "mc_batch_size": batch, "cfg": cfg}
    elif arg in GENERATION:
        task, published = GENERATION[arg]
        shots, published_no_cfg = None, published
        model_args = {"gen_length": 1024, "steps": 1024, "block_length": 1024,
                      "temperature": 0.0, "remasking": "low_confidence"}
    else:
        raise ValueError(f"configs/eval/llada_base.py: expected a task among "
                         f"{sorted(LIKELIHOOD) + sorted(GENERATION)}, found {arg!r}")
    return ml_collections.ConfigDict({
        "model": "LLaDA-8B-Base", "tasks": task, "num_fewshot": shots,
        "model_args": model_args, "chat": False, "published": published,
        "published_no_cfg": published_no_cfg, "harness": "lm-eval"})
