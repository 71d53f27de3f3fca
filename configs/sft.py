"""LLaDA-8B supervised fine-tuning (the Instruct recipe) on conversations in `messages` JSONL.

    python launch/train.py --config=configs/sft.py:/data/LLaDA-8B-Base \\
        --workdir=gs://BUCKET/llada_8b_sft \\
        --config.train.init_from=gs://BUCKET/llada_8b/checkpoints \\
        --config.data.source='files:/data/sft/*.jsonl'

The argument is the directory of the released Hugging Face tokenizer (as for
`configs/llada_8b.py`, whose architecture, mesh and precision this preset reuses). Each JSONL line
is `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`. Rows are
`seq_len` tokens: the prompt (never masked), the answer with its <|eot_id|>, then EOS padding
marked as `fill`. As in the official recipe the EOS padding is trained on and counts in the
answer length only up to the longest conversation of the (micro-)batch: the train step ignores
fill beyond that row (REFERENCE.md section 2). Multi-turn conversations train one sampled
assistant turn each (`data.sft_multiturn='sample_turn'`, the reference). Local files are checked
line by line before training: a bad line stops the run with its `path:line` and the problem
(`--config.data.bad_records=skip` drops it and logs how many were skipped).

Optimisation as reported for LLaDA-8B-Instruct: AdamW, weight decay 0.1, global batch 256,
learning rate warmed up linearly to 2.5e-5 over 50 steps, constant, then decayed linearly to
2.5e-6 over the last 10% of steps; 3 epochs of 4.5M conversations is about 52,700 steps at
batch 256 (set `train.steps` for your data).
"""

import importlib.util
import os


def _base_config(arg: str | None):
    # The 8B preset is loaded from its file beside this one (configs/ is not a package).
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada_8b.py")
    spec = importlib.util.spec_from_file_location("llada_8b_preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    c = _base_config(arg)
    c.train.objective = "sft"
    c.train.seq_len = 4096
    c.train.batch_size = 256
    c.train.steps = 52_700
    c.train.learning_rate = 2.5e-5
    c.train.schedule = "wsd"
    c.train.warmup_steps = 50
    c.train.decay_fraction = 0.1
    c.train.min_lr_ratio = 0.1          # 2.5e-6 / 2.5e-5
    c.train.weight_decay = 0.1
    c.train.random_length_prob = 0.0    # pre-training only
    c.train.checkpoint_every = 1000
    c.data.source = "files:/data/sft/*.jsonl"
    c.data.sft_multiturn = "sample_turn"
    c.data.bad_records = "error"
    c.data.num_workers = 4
    return c
