"""Tiny LLaDA-V preset: a tiny SigLIP tower + projector + the default tiny LLaDA on coloured shapes.

    python launch/train.py --config=configs/llada_v_tiny.py --workdir=/tmp/llada_v_tiny
    python launch/chat.py --checkpoint=/tmp/llada_v_tiny --image=shape.png

Images are 32 x 32 pictures of one coloured shape (`llada_jax.data.synthetic_images`) with a
question about its colour (4 colours) or its shape (3 shapes); the answer can only be read from
the image. One square view per image (no AnyRes tiling): 32 px in 8 px patches gives 16 tokens
plus the newline. The whole model trains (stage-2 style, everything at one learning rate) with
the masked-response loss on the built-in character tokenizer, in LLaDA-V's `llava_llada` chat
format (BOS, a system turn, the conversation; the system message is empty here, see below); no
downloads.
`get_config("quick")` is a short run for smoke tests; `get_config("stage1")` is LLaDA-V's stage 1
in small: the projector alone on captions ("red circle") in the `llada_plain` format
(`<image>` + caption + `\n`, 16 image tokens merged flat, no newline), objective `sft`.
"""

from llada_jax.config import default_config
from llada_jax.data.llava_format import LLADA_PLAIN, LLAVA_LLADA


def get_config(arg: str | None = None):
    c = default_config()  # model: d_model 64, 2 layers, 4 heads, char vocabulary (128)
    c.vision.enabled = True
    c.vision.image_size = 32
    c.vision.patch_size = 8
    c.vision.width = 64
    c.vision.n_layers = 3            # LLaDA-V's layout in small: the last block is dropped
    c.vision.feature_layer = -2
    c.vision.n_heads = 4
    c.vision.mlp_dim = 128
    c.vision.image_aspect_ratio = "square"
    c.vision.max_views = 1

    c.train.objective = "masked_response"
    c.train.steps = 500
    c.train.batch_size = 32
    c.train.seq_len = 72             # the longest conversation is 67 tokens (17 of them image)
    c.train.learning_rate = 3e-3
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.train.eval_every = 0
    c.data.source = "shapes"
    c.data.eval_source = "shapes@test"
    c.data.tokenizer = "char"
    c.data.synthetic_size = 20000
    c.data.conversation_format = LLAVA_LLADA
    # Deliberately not LLAVA_SYSTEM_MESSAGE (186 characters, which would be 186 tokens of the
    # character tokenizer and quadruple the rows): the system turn is there, empty.
    c.data.system_message = ""
    # Deliberately trained on the EOS padding (as LLaDA's SFT is), unlike the released stage 2:
    # LLaDA-V starts from LLaDA-8B-Instruct, which has already learned to end its answers, while
    # this tiny model starts from scratch. Without it, every training row ends at its answer's
    # <|eot_id|> but sampling continues into masked positions, and the model never learns what
    # follows an answer (held-out accuracy falls to about 0.4).
    c.data.label_eos_padding = True
    # Answers are at most 8 characters ("triangle") + <|eot_id|>: 3 semi-autoregressive blocks
    # of 4, one token per step. As LLaDA-V samples: EOS, BOS and the header tokens are never
    # generated, and a row is done at its <|eot_id|>.
    c.sampler.gen_length = 12
    c.sampler.block_length = 4
    c.sampler.steps = 12
    c.sampler.banned_ids = [2, 1, 4, 5]   # CharTokenizer: EOS, BOS, start/end header
    c.sampler.stop_at_eot = True
    c.sampler.early_exit = True
    if arg == "quick":
        c.train.steps = 20
        c.train.warmup_steps = 5
        c.train.log_every = 10
        c.train.checkpoint_every = 20
    elif arg == "stage1":
        c.data.conversation_format = LLADA_PLAIN
        c.train.objective = "sft"    # the released stage-1 loss (configs/llada_v.py)
        c.train.trainable = "projector"
    elif arg:
        raise ValueError(f"configs/llada_v_tiny.py: expected no argument, 'quick' or 'stage1', "
                         f"found {arg!r}")
    return c
