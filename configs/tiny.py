"""Tiny preset: the default CPU-sized model on the built-in synthetic corpus.

    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny

takes about two and a half minutes on two idle CPU cores, of which start-up and compilation are
the first ~30 s (measured: 13 s to the first log line, 29 s to step 50, then ~0.12 s a step;
on a machine shared with other jobs it takes longer). The log, every 50 steps, shows the
masked-token loss falling from about 3.3 at step 50 (the very first step is about ln 128 ~ 4.9)
to about 1.4 at step 1000, and the accuracy rising from about 0.18 to about 0.5; the evaluation
at step 1000 is about the same (loss ~1.4, accuracy ~0.5). No downloads.
`get_config("quick")` shortens the run to 100 steps for smoke tests.
"""

from llada_jax.config import default_config


def get_config(arg: str | None = None):
    c = default_config()  # model: d_model 64, 2 layers, 4 heads, char vocabulary (128)
    c.train.steps = 1000
    c.train.batch_size = 32
    c.train.seq_len = 64
    c.train.learning_rate = 3e-3
    c.train.schedule = "wsd"
    c.train.warmup_steps = 50
    c.train.decay_fraction = 0.2
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 250
    c.train.eval_batches = 4
    c.data.source = "synthetic"
    c.data.eval_source = "synthetic"
    c.data.tokenizer = "char"
    if arg == "quick":
        c.train.steps = 100
        c.train.warmup_steps = 10
        c.train.log_every = 10
        c.train.checkpoint_every = 50
        c.train.eval_every = 50
    elif arg:
        raise ValueError(f"configs/tiny.py: expected no argument or 'quick', found {arg!r}")
    return c
