"""The one configuration schema of llada_jax, its defaults and its validation.

Configs are `ml_collections.ConfigDict`s. `default_config()` holds every field with its default;
presets in `configs/` start from it and change what they need; absl flags override any field
(`--config.train.steps=10`). `validate(config)` runs before anything is built and raises a
`ValueError` that names the offending field, the expected and the found value.

The network itself is configured by the frozen `ModelConfig` dataclass (hashable, so it can be a
Linen module attribute); `model_config(config)` builds it from the `model` section.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_attention_out")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("wsd", "cosine", "constant")
# pretrain: 1/p CE over batch x length; sft: per-row 1/p CE / answer_len (prompt never masked);
# masked_response (LLaDA-V): 1/p CE over labelled positions / number of labelled positions.
OBJECTIVES = ("pretrain", "sft", "masked_response")
CONVERSATION_OBJECTIVES = ("sft", "masked_response")
REMASKING = ("low_confidence", "random")

# Logical axis name -> mesh axes. Parameters use the plain names, activations the `activation_*`
# names. A logical name that is missing here is replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    # Mixture of experts: the expert dimension of expert weights and dispatched tokens.
    ("experts", "expert"),
    ("activation_experts", "expert"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the LLaDA mask predictor (REFERENCE.md section 1)."""

    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    bos_token_id: int = 126080
    pad_token_id: int = 126081
    dtype: str = "float32"          # compute dtype of activations
    param_dtype: str = "float32"    # storage dtype of parameters
    remat_policy: str = "none"
    attention_backend: str = "xla"
    init_std: float = 0.02

    @property
    def num_params(self) -> int:
        """Number of parameters, from the architecture alone."""
        d, hd = self.d_model, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.mlp_hidden_size
        per_layer = attention + mlp + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d


def default_config() -> ml_collections.ConfigDict:
    """Every field of the schema with its default (a tiny CPU-sized model)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(
        vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
        mlp_hidden_size=128, rope_theta=10000.0, max_sequence_length=128,
        mask_token_id=3, eos_token_id=2, bos_token_id=1, pad_token_id=2)))

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1     # -1: take every device left over
    c.mesh.expert = 1    # expert parallelism (mixture-of-experts models); also a batch axis
    c.mesh.tensor = 1
    c.mesh.logical_axis_rules = [list(r) for r in DEFAULT_LOGICAL_AXIS_RULES]

    c.train = ml_collections.ConfigDict()
    c.train.objective = "pretrain"
    c.train.steps = 200
    c.train.batch_size = 16          # global batch, in sequences
    c.train.seq_len = 64
    c.train.grad_accum_steps = 1
    c.train.learning_rate = 3e-3
    c.train.schedule = "wsd"
    c.train.warmup_steps = 20
    c.train.decay_fraction = 0.2     # WSD: last fraction of steps decays linearly to min_lr_ratio
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.adam_eps = 1e-8
    c.train.grad_clip = 1.0
    c.train.mask_eps = 1e-3          # p = (1 - eps) t + eps
    c.train.random_length_prob = 0.01
    c.train.seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    # A non-finite loss or gradient stops training (no checkpoint of it is written). With N > 0,
    # up to N consecutive non-finite updates are skipped instead (optax.apply_if_finite: params
    # and optimizer state stay as they were) before training stops.
    c.train.max_bad_steps = 0
    c.train.eval_every = 0           # 0: no periodic eval
    c.train.eval_batches = 4
    # Pluggable evaluators run every eval_every steps (llada_jax/train/evaluators.py), as dicts:
    # {"kind": "elbo", "data": "heldout.jsonl", "mc_num": 16} or {"kind": "tasks", "tasks": ...}
    c.train.evaluators = []
    c.train.init_from = ""           # a checkpoint directory to take params from (fine-tuning)
    # Cross-entropy in chunks of this many sequence positions, so the [B, L, vocab] logits never
    # exist at once (the LM head runs per chunk, recomputed in the backward pass); 0: one chunk.
    c.train.loss_chunk_size = 0

    c.data = ml_collections.ConfigDict()
    # synthetic (built-in pre-training corpus) | synthetic_chat[@test] | tfds:NAME[@SPLIT] |
    # files:GLOB (.jsonl records or text lines) | mix:SPEC=W,SPEC=W (see llada_jax/data/sources.py)
    c.data.source = "synthetic"
    c.data.tokenizer = "char"        # char | sentencepiece:PATH | hf:DIR
    c.data.packing = "concat"        # concat | pack (segment ids)
    c.data.num_workers = 0
    c.data.shuffle = True
    c.data.synthetic_size = 20000    # examples in the built-in corpora
    c.data.text_field = "text"
    c.data.tfds_data_dir = ""        # where prepared tfds datasets live; "": the tfds default
    c.data.eval_source = ""          # a source spec for evaluation batches; "": none
    c.data.num_epochs = 0            # 0: repeat the data forever
    c.data.add_bos = False           # pre-training: start every document with BOS
    c.data.pack_bins = 8             # packing='pack': rows filled at once by first-fit packing
    c.data.read_threads = 2          # grain ReadOptions (per worker process)
    c.data.prefetch_buffer_size = 64
    c.data.worker_buffer_size = 2    # batches each worker process keeps ready
    c.data.bad_records = "error"     # error | skip (logged and counted)
    # SFT (objective 'sft'; llada_jax/data/chat.py): conversations in `messages` JSONL.
    c.data.messages_field = "messages"
    c.data.sft_multiturn = "sample_turn"  # sample_turn (reference) | all_responses (LLaDA-V)

    c.sampler = ml_collections.ConfigDict()
    c.sampler.gen_length = 32
    c.sampler.block_length = 32
    c.sampler.steps = 32
    c.sampler.temperature = 0.0
    c.sampler.cfg_scale = 0.0
    c.sampler.remasking = "low_confidence"
    c.sampler.logits_eos_inf = False         # EOS logit -inf: EOS is never generated
    # EOS/EoT logits -inf before the confidence softmax (others renormalised), at every T
    c.sampler.confidence_eos_eot_inf = False
    c.sampler.eot_token_id = -1      # <|eot_id|> for confidence_eos_eot_inf; -1: the tokenizer's
    c.sampler.seed = 0
    # Fast sampling (REFERENCE.md section 6): KV caches, parallel decoding, early exit.
    c.sampler.cache = "none"         # none | prefix (cache before the block) | dual (and after it)
    c.sampler.refresh_every = 0      # with a cache: full pass every n steps of a block (0: first)
    c.sampler.threshold = 0.0        # > 0: commit every block candidate with confidence >= it
    c.sampler.factor = 0.0           # > 0: commit the largest n with c_k >= 1 - factor / (k + 1)
    c.sampler.early_exit = False     # stop once every row has an EOS with nothing masked before it
    # LLaDA-V sampling (REFERENCE.md section 5): ids never generated (their logits are -inf at
    # every masked position; LLaDA-V bans EOS, BOS and the header ids) and `<|eot_id|>` as a
    # finishing token for early_exit as well as EOS.
    c.sampler.banned_ids = []
    # LLaDA-V: once an EoT is committed, later commits only before it; the row ends there
    c.sampler.stop_at_eot = False

    # LLaDA-V (REFERENCE.md section 5): a SigLIP vision tower and an mlp2x_gelu projector in front
    # of the language model. `vision.enabled = False` (the default) is plain LLaDA and ignores the
    # rest of this section. Defaults: SigLIP2 so400m/14 at 384 px, features of block 26.
    c.vision = ml_collections.ConfigDict()
    c.vision.enabled = False
    c.vision.image_size = 384
    c.vision.patch_size = 14
    c.vision.width = 1152
    c.vision.n_layers = 27           # blocks of the pretrained tower (before any is dropped)
    c.vision.n_heads = 16
    c.vision.mlp_dim = 4304
    c.vision.layer_norm_eps = 1e-6
    c.vision.feature_layer = -2      # -2: drop the last block, as LLaDA-V does
    c.vision.use_post_layernorm = False
    c.vision.dtype = "float32"
    c.vision.param_dtype = "float32"
    c.vision.remat_policy = "none"
    # How an image becomes views and tokens: 'square' (one image_size view: tokens + a newline)
    # or 'anyres_max_N' (base view + tiles of a grid up to max_grid x max_grid, downsampled to
    # about N tiles' worth of tokens; llada_jax/data/images.py).
    c.vision.image_aspect_ratio = "anyres_max_4"
    c.vision.max_grid = 6
    c.vision.max_views = 37          # pixel views per example (a static shape): 1 + 6 * 6
    c.data.image_folder = ""         # LLaVA JSON: image paths are relative to it ('': its dir)
    # Which parameter groups (vision_tower, projector, language_model) train, and their peak
    # learning rates (0: train.learning_rate); every group follows train.schedule's shape.
    # LLaDA-V stage 1: trainable='projector'; stage 2: 'all' with vision_tower 2e-6.
    c.train.trainable = "all"        # 'all' or a comma-separated list of groups
    c.train.group_learning_rates = ml_collections.ConfigDict(
        {"vision_tower": 0.0, "projector": 0.0, "language_model": 0.0})

    return c


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen `ModelConfig` of a config's `model` section (unknown fields are an error)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    given = dict(config.model)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}; known: {sorted(fields)}")
    return ModelConfig(**given)


def _fail(field: str, expected: str, found: Any) -> None:
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Checks a ModelConfig; raises ValueError naming the field."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_hidden_size", "max_sequence_length"):
        value = getattr(m, name)
        if not isinstance(value, int) or value <= 0:
            _fail(f"{prefix}.{name}", "a positive integer", value)
    if m.n_kv_heads > m.n_heads or m.n_heads % m.n_kv_heads:
        _fail(f"{prefix}.n_kv_heads", f"a divisor of n_heads={m.n_heads}", m.n_kv_heads)
    if m.head_dim % 2:
        _fail(f"{prefix}.head_dim", "an even number (rotary embedding)", m.head_dim)
    for name in ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(m, name)
        if not 0 <= value < m.vocab_size:
            _fail(f"{prefix}.{name}", f"an id in [0, vocab_size={m.vocab_size})", value)
    if m.dtype not in DTYPES:
        _fail(f"{prefix}.dtype", f"one of {DTYPES}", m.dtype)
    if m.param_dtype not in DTYPES:
        _fail(f"{prefix}.param_dtype", f"one of {DTYPES}", m.param_dtype)
    if m.remat_policy not in REMAT_POLICIES:
        _fail(f"{prefix}.remat_policy", f"one of {REMAT_POLICIES}", m.remat_policy)
    if m.attention_backend not in ATTENTION_BACKENDS:
        _fail(f"{prefix}.attention_backend", f"one of {ATTENTION_BACKENDS}", m.attention_backend)
    if m.rope_theta <= 0:
        _fail(f"{prefix}.rope_theta", "a positive number", m.rope_theta)


def mesh_shape(config: ml_collections.ConfigDict,
               num_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, expert, tensor) with a -1 axis filled so that the product is `num_devices`.

    Errors about the product name the axes with their values (`expert` only when it is not 1):
    the culprit is whichever axis the user set, which this function cannot know (fsdp is -1 by
    default). Configs saved before the expert axis existed have expert 1.
    """
    expert = config.mesh.get("expert", 1)
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "expert": expert,
             "tensor": config.mesh.tensor}
    named = {k: v for k, v in sizes.items() if k != "expert" or v != 1}
    shown = ", ".join(f"mesh.{k}={v}" for k, v in named.items())
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            _fail(f"mesh.{k}", "a positive integer or -1", v)
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1 (take the devices left "
                         f"over), found {shown}")
    known = 1
    for v in sizes.values():
        if v != -1:
            known *= v
    if fill:
        if num_devices % known:
            set_axes = " * ".join(f"{k}={v}" for k, v in named.items() if v != -1)
            raise ValueError(f"config.mesh: {set_axes} = {known} does not divide the "
                             f"{num_devices} devices (mesh.{fill[0]}=-1 takes the rest); "
                             f"found {shown}")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        product = " * ".join(named)
        raise ValueError(f"config.mesh: {product} = {known} must equal the "
                         f"{num_devices} devices; found {shown}")
    return sizes["data"], sizes["fsdp"], sizes["expert"], sizes["tensor"]


CACHE_MODES = ("none", "prefix", "dual")


def validate_sampler(s: Any, prefix: str = "sampler") -> None:
    """Checks the sampler settings (the `sampler` section or a `SamplerConfig`).

    Raises ValueError naming the field, including for contradictory fast-sampling settings.
    """
    if s.remasking not in REMASKING:
        _fail(f"{prefix}.remasking", f"one of {REMASKING}", s.remasking)
    if not isinstance(s.gen_length, int) or s.gen_length <= 0:
        _fail(f"{prefix}.gen_length", "a positive integer", s.gen_length)
    if not isinstance(s.block_length, int) or s.block_length <= 0 or s.gen_length % s.block_length:
        _fail(f"{prefix}.block_length", f"a positive divisor of {prefix}.gen_length="
              f"{s.gen_length}", s.block_length)
    num_blocks = s.gen_length // s.block_length
    parallel = s.threshold > 0 or s.factor > 0
    if not parallel:  # threshold / factor decoding choose their own number of steps
        if not isinstance(s.steps, int) or s.steps <= 0 or s.steps % num_blocks:
            _fail(f"{prefix}.steps", f"a positive multiple of the number of blocks "
                  f"({num_blocks} = gen_length {s.gen_length} / block_length {s.block_length})",
                  s.steps)
        if s.steps > s.gen_length:
            _fail(f"{prefix}.steps", f"at most {prefix}.gen_length={s.gen_length} (a step "
                  f"commits at least one token)", s.steps)
    if s.temperature < 0:
        _fail(f"{prefix}.temperature", "a number >= 0", s.temperature)
    if s.cfg_scale < 0:
        _fail(f"{prefix}.cfg_scale", "a number >= 0", s.cfg_scale)
    if s.cache not in CACHE_MODES:
        _fail(f"{prefix}.cache", f"one of {CACHE_MODES}", s.cache)
    if not isinstance(s.refresh_every, int) or s.refresh_every < 0:
        _fail(f"{prefix}.refresh_every", "an integer >= 0", s.refresh_every)
    if s.refresh_every > 0 and s.cache == "none":
        _fail(f"{prefix}.refresh_every", f"0 when {prefix}.cache='none' (there is no cache to "
              f"refresh)", s.refresh_every)
    if not 0 <= s.threshold <= 1:
        _fail(f"{prefix}.threshold", "a confidence in (0, 1], or 0 to turn it off", s.threshold)
    if s.factor < 0:
        _fail(f"{prefix}.factor", "a number > 0, or 0 to turn it off", s.factor)
    if s.threshold > 0 and s.factor > 0:
        _fail(f"{prefix}.factor", f"0 when {prefix}.threshold={s.threshold} is set (choose one "
              f"parallel decoding rule)", s.factor)
    if parallel and s.remasking != "low_confidence":
        _fail(f"{prefix}.remasking", "'low_confidence' with threshold/factor decoding (they "
              "compare model probabilities)", s.remasking)
    banned = list(s.banned_ids)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in banned):
        _fail(f"{prefix}.banned_ids", "a list of token ids >= 0", s.banned_ids)
    eos_banned = s.logits_eos_inf or getattr(s, "eos_id", None) in banned
    if s.early_exit and eos_banned and not s.stop_at_eot:
        _fail(f"{prefix}.early_exit", f"False when EOS is never generated ({prefix}."
              f"logits_eos_inf or EOS in {prefix}.banned_ids) unless {prefix}.stop_at_eot=True "
              f"(there is nothing to exit on)", s.early_exit)


PACKINGS = ("concat", "pack")
SFT_MULTITURN = ("sample_turn", "all_responses")
BAD_RECORDS = ("error", "skip")


def validate_data(config: ml_collections.ConfigDict) -> None:
    """Checks the `data` section (`llada_jax.data.validation.check_data`)."""
    from llada_jax.data import validation  # TODO(lead): call from the trainer/launch instead

    validation.check_data(config)


PARAM_GROUPS = ("vision_tower", "projector", "language_model")


def vision_config(config: ml_collections.ConfigDict):
    """The frozen `VisionConfig` of the `vision` section (None when vision is disabled)."""
    from llada_jax.model.vision import VisionConfig

    if not config.vision.enabled:
        return None
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionConfig(**{k: v for k, v in config.vision.items() if k in fields})


def anyres_max_tiles(image_aspect_ratio: str) -> int | None:
    """N of 'anyres_max_N'; None for 'square'. Raises ValueError for anything else."""
    prefix = "anyres_max_"
    if image_aspect_ratio == "square":
        return None
    if (isinstance(image_aspect_ratio, str) and image_aspect_ratio.startswith(prefix)
            and image_aspect_ratio[len(prefix):].isdigit()
            and int(image_aspect_ratio[len(prefix):]) > 0):
        return int(image_aspect_ratio[len(prefix):])
    _fail("vision.image_aspect_ratio", "'square' or 'anyres_max_N' with N a positive integer "
          "(e.g. 'anyres_max_4')", image_aspect_ratio)


def trainable_groups(train: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parameter groups `train.trainable` names ('all': every group)."""
    spec = train.trainable
    if not isinstance(spec, str) or not spec.strip():
        _fail("train.trainable", f"'all' or a comma-separated list of {PARAM_GROUPS}", spec)
    if spec.strip() == "all":
        return PARAM_GROUPS
    groups = tuple(g.strip() for g in spec.split(","))
    unknown = [g for g in groups if g not in PARAM_GROUPS]
    if unknown or len(set(groups)) != len(groups):
        _fail("train.trainable", f"'all' or distinct names among {PARAM_GROUPS}", spec)
    return groups


def validate_vision(config: ml_collections.ConfigDict) -> None:
    """Checks the `vision` section and the multimodal training fields; raises ValueError."""
    t = config.train
    groups = trainable_groups(t)
    for group in PARAM_GROUPS:
        value = t.group_learning_rates.get(group)
        if not isinstance(value, (int, float)) or value < 0:
            _fail(f"train.group_learning_rates.{group}", "a learning rate >= 0 (0: "
                  "train.learning_rate)", value)
    unknown = sorted(set(t.group_learning_rates) - set(PARAM_GROUPS))
    if unknown:
        _fail("train.group_learning_rates", f"only the groups {PARAM_GROUPS}", unknown)
    v = config.vision
    if not v.enabled:
        if groups != PARAM_GROUPS and groups != ("language_model",):
            _fail("train.trainable", "'all' or 'language_model' without a vision tower "
                  "(vision.enabled=False)", t.trainable)
        return
    from llada_jax.model.vision import validate_vision as validate_tower

    try:
        validate_tower(vision_config(config))
    except ValueError as e:  # re-worded with the config path of the field
        raise ValueError(f"config.vision: {e}") from None
    from llada_jax.data import validation  # TODO(lead): call from the trainer/launch instead

    validation.check_vision_data(config)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Validates the whole config early; raises ValueError naming the field."""
    m = model_config(config)
    validate_model(m)
    validate_vision(config)
    t = config.train
    if t.objective not in OBJECTIVES:
        _fail("train.objective", f"one of {OBJECTIVES}", t.objective)
    if t.schedule not in SCHEDULES:
        _fail("train.schedule", f"one of {SCHEDULES}", t.schedule)
    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps"):
        if not isinstance(t[name], int) or t[name] <= 0:
            _fail(f"train.{name}", "a positive integer", t[name])
    if t.seq_len > m.max_sequence_length:
        _fail("train.seq_len", f"at most model.max_sequence_length={m.max_sequence_length}",
              t.seq_len)
    if t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", f"a divisor of train.batch_size={t.batch_size}",
              t.grad_accum_steps)
    if not isinstance(t.loss_chunk_size, int) or t.loss_chunk_size < 0:
        _fail("train.loss_chunk_size", "an integer >= 0 (0: no chunking)", t.loss_chunk_size)
    if not 0 < t.mask_eps < 1:
        _fail("train.mask_eps", "a number in (0, 1)", t.mask_eps)
    if not 0 <= t.random_length_prob <= 1:
        _fail("train.random_length_prob", "a probability in [0, 1]", t.random_length_prob)
    if not 0 <= t.decay_fraction <= 1:
        _fail("train.decay_fraction", "a fraction in [0, 1]", t.decay_fraction)
    if t.learning_rate <= 0:
        _fail("train.learning_rate", "a positive number", t.learning_rate)
    # warmup_steps > steps is allowed: a short run (--config.train.steps=10) is all warmup.
    if not isinstance(t.warmup_steps, int) or t.warmup_steps < 0:
        _fail("train.warmup_steps", "an integer >= 0", t.warmup_steps)
    for name in ("log_every", "keep_checkpoints", "eval_batches"):
        if not isinstance(t[name], int) or t[name] <= 0:
            _fail(f"train.{name}", "a positive integer", t[name])
    for name in ("checkpoint_every", "eval_every", "max_bad_steps"):
        if not isinstance(t[name], int) or t[name] < 0:
            _fail(f"train.{name}", "an integer >= 0 (0: none)", t[name])
    if t.eval_every > 0 and not config.data.eval_source:
        _fail("data.eval_source", f"a source spec such as 'synthetic' when train.eval_every="
              f"{t.eval_every} > 0", config.data.eval_source)
    for name in ("b1", "b2"):
        if not 0 <= t[name] < 1:
            _fail(f"train.{name}", "a number in [0, 1)", t[name])
    for name in ("weight_decay", "grad_clip"):
        if t[name] < 0:
            _fail(f"train.{name}", "a number >= 0 (grad_clip 0: no clipping)", t[name])
    if t.adam_eps <= 0:
        _fail("train.adam_eps", "a positive number", t.adam_eps)
    if not 0 <= t.min_lr_ratio <= 1:
        _fail("train.min_lr_ratio", "a fraction of the peak learning rate in [0, 1]",
              t.min_lr_ratio)
    if not isinstance(t.init_from, str):
        _fail("train.init_from", "a checkpoint directory or ''", t.init_from)
    validate_sampler(config.sampler)
    validate_data(config)
    if num_devices is not None:
        data, fsdp, expert, tensor = mesh_shape(config, num_devices)
        axes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert,
                "train.grad_accum_steps": t.grad_accum_steps}
        if expert == 1:
            del axes["mesh.expert"]
        multiple = 1
        for size in axes.values():
            multiple *= size
        if t.batch_size % multiple:
            _fail("train.batch_size", f"a multiple of {' * '.join(axes)} = "
                  f"{' * '.join(map(str, axes.values()))} = {multiple}", t.batch_size)
        for name in ("n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
            if getattr(m, name) % tensor:
                _fail(f"model.{name}", f"a multiple of mesh.tensor={tensor}", getattr(m, name))
