"""LLaDA-V (REFERENCE.md section 5): SigLIP2 so400m/14 + mlp2x_gelu projector + LLaDA-8B.

    python launch/train.py --config=configs/llada_v.py:stage1 --workdir=gs://BUCKET/llada_v_s1 \\
        --config.data.source=files:/data/llava_pretrain/blip_laion_cc_sbu_558k.json \\
        --config.data.image_folder=/data/llava_pretrain/images \\
        --config.data.tokenizer=hf:/ckpt/LLaDA-8B-Instruct \\
        --config.train.init_from=/ckpt/llada_v_init              # tower + LM (+ any projector)
    python launch/train.py --config=configs/llada_v.py:stage2 --workdir=gs://BUCKET/llada_v_s2 \\
        --config.data.source=files:/data/llava_si/*.json --config.train.init_from=gs://BUCKET/llada_v_s1

Architecture: the vision tower of `google/siglip2-so400m-patch14-384` (width 1152, 27 blocks of
which LLaDA-V drops the last, 16 heads, MLP 4304, 729 tokens per 384 px view), the projector
Linear(1152 -> 4096), GELU, Linear(4096 -> 4096) with the learned `image_newline`, and the
LLaDA-8B language tower (REFERENCE.md section 1) at 8192 tokens. Images are AnyRes
(`anyres_max_4`): the base 384 px view, then tiles of a grid up to 6 x 6, unpadded and
downsampled to about 4 tiles' worth of tokens. `vision.max_views = 37` (1 + 6 * 6) is the static
number of views per example, so no image is ever refused; lower it (with
`data.bad_records=skip`) to spend less compute on padding views.

Stages (selected by the argument), as LLaDA-V's `llada_v_pretrain.sh` / `llada_v_finetune.sh`:
  * `stage1`: projector only (everything else frozen, bit-identical) on caption data, lr 1e-3,
    in the `llada_plain` format (`<image>` + caption + `\n`, no chat template, the instruction
    dropped), one square 729-token view per image merged flat (no newline token, no AnyRes).
    Objective `sft`: it is the released stage-1 loss exactly (per row sum CE/p over the noised
    tokens divided by the row's labelled tokens, mean over rows; the EOS padding up to the
    longest row of a batch is labelled, because the stage-1 collator pads labels with EOS).
  * `stage2` (default): everything, language model and projector at 1e-5, vision tower 2e-6,
    cosine schedule with 3% warmup, on instruction data in the `llava_llada` chat format (BOS,
    the LLaVA system turn, then the conversation; `llada_jax/data/multimodal_data.py`), AnyRes
    for single images and one padded square view per image of multi-image records. Objective
    `masked_response`: answers (whole assistant turns) and the structural tokens are noised,
    padding is never labelled, the loss divides by the labelled tokens.
bf16 compute, float32 master weights, full rematerialisation, FSDP over every device.
`train.init_from` takes a params checkpoint holding all three parts: make one from a LLaDA-V
Hugging Face checkpoint with `llada_jax.interop.llada_v.import_llada_v` (+ `save_params`).
"""

import dataclasses

import ml_collections

from llada_jax.config import ModelConfig, default_config
from llada_jax.data.llava_format import LLADA_PLAIN, LLAVA_LLADA, LLAVA_SYSTEM_MESSAGE


def get_config(arg: str | None = None):
    stage = arg or "stage2"
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"configs/llada_v.py: expected 'stage1' or 'stage2', found {arg!r}")
    c = default_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(
        vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        mlp_hidden_size=12288, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=8192,
        mask_token_id=126336, eos_token_id=126081, bos_token_id=126080, pad_token_id=126081,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_backend="xla")))
    c.vision.enabled = True       # the so400m/14 defaults of llada_jax/config.py
    c.vision.dtype = "bfloat16"
    c.vision.param_dtype = "float32"
    c.vision.remat_policy = "full"
    c.vision.image_aspect_ratio = "anyres_max_4"
    c.vision.max_grid = 6
    c.vision.max_views = 37
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.train.objective = "masked_response"   # stage 1 below: "sft"
    c.train.loss_chunk_size = 512           # 40.4 -> 35.6 GiB per device on 8 devices
    c.train.seq_len = 8192
    c.train.schedule = "cosine"
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.0    # LLaVA-style multimodal training uses none
    c.train.grad_clip = 1.0
    c.train.log_every = 10
    c.train.eval_every = 0
    c.data.tokenizer = "hf:LLaDA-8B-Instruct"
    c.data.source = "files:llava_data/*.json"
    c.data.image_folder = ""
    c.data.conversation_format = LLAVA_LLADA
    c.data.system_message = LLAVA_SYSTEM_MESSAGE
    c.data.label_eos_padding = False   # stage 2: rows end at their last token (one per device)
    c.data.num_workers = 8        # image decoding and resizing are CPU-heavy
    # LLaDA-V sampling (REFERENCE.md section 5): EOS, BOS and the header tokens are never
    # generated at masked positions, and a row is done at its <|eot_id|> (early exit).
    c.sampler.gen_length = 128
    c.sampler.block_length = 32
    c.sampler.steps = 128
    c.sampler.banned_ids = [126081, 126080, 126346, 126347]
    c.sampler.stop_at_eot = True
    c.sampler.early_exit = True
    c.sampler.eot_token_id = 126348
    if stage == "stage1":
        c.data.conversation_format = LLADA_PLAIN
        c.data.label_eos_padding = True   # the stage-1 collator pads labels with EOS
        c.vision.image_aspect_ratio = "square"   # one 384 px view (resized), 729 tokens, flat
        c.vision.max_views = 1
        c.train.objective = "sft"
        c.train.trainable = "projector"
        c.train.learning_rate = 1e-3
        c.train.batch_size = 256
        c.train.steps = 2180                  # one epoch of 558K captions at 256 per step
        c.train.warmup_steps = 65             # 3%
        c.train.checkpoint_every = 500
    else:
        c.train.trainable = "all"
        c.train.learning_rate = 1e-5          # language model and projector
        c.train.group_learning_rates.vision_tower = 2e-6
        c.train.batch_size = 128
        c.train.steps = 25_000
        c.train.warmup_steps = 750            # 3%
        c.train.checkpoint_every = 1000
    return c
