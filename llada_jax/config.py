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
OBJECTIVES = ("pretrain", "sft")
REMASKING = ("low_confidence", "random")

# Logical axis name -> mesh axes. Parameters use the plain names, activations the `activation_*`
# names. A logical name that is missing here is replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
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
    c.train.eval_every = 0           # 0: no periodic eval
    c.train.eval_batches = 4
    c.train.init_from = ""           # a checkpoint directory to take params from (fine-tuning)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"      # synthetic | synthetic_chat | tfds:NAME | files:GLOB
    c.data.tokenizer = "char"        # char | sentencepiece:PATH | hf:DIR
    c.data.packing = "concat"        # concat | pack (segment ids)
    c.data.num_workers = 0
    c.data.shuffle = True
    c.data.synthetic_size = 20000    # examples in the built-in corpora
    c.data.text_field = "text"

    c.sampler = ml_collections.ConfigDict()
    c.sampler.gen_length = 32
    c.sampler.block_length = 32
    c.sampler.steps = 32
    c.sampler.temperature = 0.0
    c.sampler.cfg_scale = 0.0
    c.sampler.remasking = "low_confidence"
    c.sampler.logits_eos_inf = False
    c.sampler.confidence_eos_eot_inf = False

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


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 axis filled so that the product is `num_devices`."""
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        _fail(f"mesh.{fill[1]}", "at most one mesh axis set to -1", -1)
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v <= 0):
            _fail(f"mesh.{k}", "a positive integer or -1", v)
    known = 1
    for k, v in sizes.items():
        if v != -1:
            known *= v
    if fill:
        if num_devices % known:
            _fail(f"mesh.{fill[0]}", f"a fill of {num_devices} devices, but the other axes "
                  f"multiply to {known}, which does not divide it", -1)
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*"
                         f"{sizes['tensor']} = {known}, but there are {num_devices} devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Validates the whole config early; raises ValueError naming the field."""
    m = model_config(config)
    validate_model(m)
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
    if not 0 < t.mask_eps < 1:
        _fail("train.mask_eps", "a number in (0, 1)", t.mask_eps)
    if not 0 <= t.random_length_prob <= 1:
        _fail("train.random_length_prob", "a probability in [0, 1]", t.random_length_prob)
    if not 0 <= t.decay_fraction <= 1:
        _fail("train.decay_fraction", "a fraction in [0, 1]", t.decay_fraction)
    if t.learning_rate <= 0:
        _fail("train.learning_rate", "a positive number", t.learning_rate)
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        _fail("train.warmup_steps", f"an integer in [0, train.steps={t.steps}]", t.warmup_steps)
    s = config.sampler
    if s.remasking not in REMASKING:
        _fail("sampler.remasking", f"one of {REMASKING}", s.remasking)
    if s.block_length <= 0 or s.gen_length % s.block_length:
        _fail("sampler.block_length", f"a positive divisor of sampler.gen_length={s.gen_length}",
              s.block_length)
    num_blocks = s.gen_length // s.block_length
    if s.steps <= 0 or s.steps % num_blocks:
        _fail("sampler.steps", f"a positive multiple of the number of blocks ({num_blocks})",
              s.steps)
    if num_devices is not None:
        data, fsdp, tensor = mesh_shape(config, num_devices)
        if t.batch_size % (data * fsdp * t.grad_accum_steps):
            _fail("train.batch_size", f"a multiple of data*fsdp*grad_accum_steps = "
                  f"{data * fsdp * t.grad_accum_steps}", t.batch_size)
        for name in ("n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
            if getattr(m, name) % tensor:
                _fail(f"model.{name}", f"a multiple of mesh.tensor={tensor}", getattr(m, name))
