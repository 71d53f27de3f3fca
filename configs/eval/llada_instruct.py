"""Official evaluation settings of LLaDA-8B-Instruct, one preset per task, with the published score.

    python launch/evaluate.py --checkpoint=/ckpt/llada-8b-instruct \
        --preset=configs/eval/llada_instruct.py:gsm8k_block8

Source: `EVAL.md` of github.com/ML-GSAI/LLaDA (gen_length, block_length, logits_eos_inf,
confidence_eos_eot_inf per task; scores of the internal toolkit, and of OpenCompass in
`published_opencompass`). Steps equal the generation length (one token per step: the paper's
"pure diffusion" setting). Every task is generated in the chat format, greedy, low-confidence
remasking. The official Instruct numbers come from OpenCompass prompts, not lm-eval's: expect a
gap of the prompt's making on top of any real difference (see docs/evaluation.md).
"""

import ml_collections

# task: (lm-eval task, gen_length, block_length, logits_eos_inf, confidence_eos_eot_inf,
#        internal toolkit score, OpenCompass score)
TASKS = {
    "mmlu": ("mmlu_generative", 3, 3, False, False, 65.5, 65.4),
    "mmlu_pro": ("mmlu_pro", 256, 256, False, False, 37.0, 36.6),
    "hellaswag": ("hellaswag_gen", 3, 3, False, False, 74.6, 75.3),
    "arc_challenge": ("arc_challenge_chat", 512, 512, False, False, 88.5, 89.2),
    "gsm8k": ("gsm8k", 512, 512, False, True, 69.4, 68.8),
    "gsm8k_block8": ("gsm8k", 256, 8, False, False, 78.6, 78.9),
    "math": ("minerva_math", 512, 512, False, True, 31.9, 29.6),
    "math_block64": ("minerva_math", 512, 64, False, False, 42.2, 42.7),
    "gpqa": ("gpqa_main_generative_n_shot", 64, 64, False, True, 33.3, 32.3),
    "humaneval": ("humaneval_instruct", 512, 512, True, False, 49.4, 47.0),
    "mbpp": ("mbpp_instruct", 256, 256, False, True, 41.0, 39.6),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in TASKS:
        raise ValueError(f"configs/eval/llada_instruct.py: expected a task among "
                         f"{sorted(TASKS)}, found {arg!r}")
    task, gen, block, eos_inf, conf_inf, published, opencompass = TASKS[arg]
    return ml_collections.ConfigDict({
        "model": "LLaDA-8B-Instruct", "tasks": task, "num_fewshot": None,
        "model_args": {"gen_length": gen, "block_length": block, "steps": gen,
                       "temperature": 0.0, "remasking": "low_confidence",
                       "logits_eos_inf": eos_inf, "confidence_eos_eot_inf": conf_inf},
        "chat": True, "published": published, "published_opencompass": opencompass,
        "harness": "OpenCompass (official); lm-eval here"})
