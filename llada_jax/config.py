"""The one configuration schema of llada_jax, its defaults and its validation.

Configs are `ml_collections.ConfigDict`s. `default_config()` holds every field with its default;
presets in `configs/` start from it and change what they need; absl flags override any field
(`--config.train.steps=10`). `validate(config)` runs before anything is built and raises a
`ValueError` that names the offending field, the expected and the found value.

The `model`, `sampler` and `vision` sections are derived from frozen dataclasses (hashable, so
they can be Linen module attributes or static jit arguments): `ModelConfig`, `SamplerConfig` and
`VisionConfig` are each the one schema of their section, and `model_config`,
`SamplerConfig.from_config` and `vision_config` build them back from a config.

What this module is not: it imports nothing from `llada_jax.data` or `llada_jax.model` (it is
the bottom layer, see docs/architecture.md). Checks that need the devices (mesh sizes, batch
rows per device) are `parallel.validate_mesh`; checks that open files or parse data-source
specs belong to the data layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
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
# Metadata of a dataclass field that is not a field of its config section (see `section`).
NOT_IN_SECTION = {"in_section": False}
# Mesh axis sizes (`parallel.MESH_AXES`); -1: take every device left over.
MESH_AXIS_DEFAULTS = {
    "data": 1,
    "fsdp": -1,
    "expert": 1,   # expert parallelism (mixture-of-experts models); also a batch axis
    "tensor": 1,
}

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
    # Mixture of experts (model/moe.py). num_experts 0: the dense SwiGLU FFN in every layer.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_mlp_hidden_size: int = 0
    num_shared_experts: int = 0      # always-on experts, one SwiGLU of n * expert_mlp_hidden_size
    first_k_dense: int = 0           # leading layers with the dense FFN of mlp_hidden_size
    router: str = "softmax"          # softmax (LLaDA-MoE) | sigmoid_grouped (LLaDA2)
    router_groups: int = 1           # sigmoid_grouped: experts split into this many groups,
    router_top_groups: int = 1       # of which the best this many may be chosen from
    routed_scaling: float = 1.0      # factor on the routed experts' weights
    normalize_top_k: bool = False    # renormalise the chosen experts' weights to sum to 1
    qk_norm: bool = False            # RMSNorm over head_dim on q and k, before RoPE
    rotary_dim: int = 0              # RoPE on the first rotary_dim dims of a head (0: all)
    tie_embeddings: bool = False     # logits = h @ wte^T, no lm_head parameter

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        """Layers with the MoE FFN (the last n_layers - first_k_dense; 0 for a dense model)."""
        return self.n_layers - self.first_k_dense if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        return self.n_layers - self.num_moe_layers

    def _total(self, experts_counted: int, embedding: bool) -> int:
        """Parameters with `experts_counted` routed experts per MoE layer (and the embedding
        table counted as well as the LM head when `embedding`)."""
        d, hd = self.d_model, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        common = attention + 2 * d + (2 * hd if self.qk_norm else 0)
        dense = common + 3 * d * self.mlp_hidden_size
        moe = (common + d * self.num_experts                       # router
               + (self.num_experts if self.router == "sigmoid_grouped" else 0)  # expert_bias
               + 3 * d * self.expert_mlp_hidden_size * (experts_counted + self.num_shared_experts))
        # Vocabulary-sized matrices: the table and the LM head, one when tied (the table is the
        # head's matmul) or when the lookup is not counted.
        tables = 2 if embedding and not self.tie_embeddings else 1
        return (self.num_dense_layers * dense + self.num_moe_layers * moe
                + tables * self.vocab_size * self.d_model + self.d_model)

    @property
    def num_params(self) -> int:
        """Number of parameters, from the architecture alone (every expert counted)."""
        return self._total(self.num_experts, embedding=True)

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: routed experts counted `experts_per_token` times; the
        embedding table is counted (a lookup; `num_matmul_params` leaves it out)."""
        return self._total(self.experts_per_token, embedding=True)

    @property
    def num_matmul_params(self) -> int:
        """Active parameters that enter a matmul per token: all but the embedding lookup (the
        tied table counts once, as the LM head); what training FLOPs are 6 x tokens x of."""
        return self._total(self.experts_per_token, embedding=False)


def default_config() -> ml_collections.ConfigDict:
    """Every field of the schema with its default (a tiny CPU-sized model)."""
    c = ml_collections.ConfigDict()

    c.model = section(
        ModelConfig, vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
        head_dim=16, mlp_hidden_size=128, rope_theta=10000.0, max_sequence_length=128,
        mask_token_id=3, eos_token_id=2, bos_token_id=1, pad_token_id=2)

    c.mesh = ml_collections.ConfigDict(dict(MESH_AXIS_DEFAULTS))
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
    # Mixture of experts (model.num_experts > 0; ignored by dense models): weights of the Switch
    # load-balancing loss and the router z-loss, and the rate of the auxiliary-loss-free
    # expert-bias update (bias += rate * sign(mean load - load); routers with expert_bias).
    c.train.moe_aux_loss_weight = 0.01
    c.train.moe_z_loss_weight = 0.0
    c.train.moe_bias_update_rate = 0.0
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

    # The fields of `SamplerConfig` (its token ids excepted), with a short default generation
    # for the tiny model (the dataclass keeps LLaDA's 128 tokens in 128 steps).
    c.sampler = section(SamplerConfig, gen_length=32, steps=32)
    # Settings of the programs around the sampler, not of the compiled reverse process:
    c.sampler.eot_token_id = -1      # <|eot_id|> for confidence_eos_eot_inf; -1: the tokenizer's
    c.sampler.seed = 0

    # LLaDA-V (REFERENCE.md section 5): a SigLIP vision tower and an mlp2x_gelu projector in front
    # of the language model. `vision.enabled = False` (the default) is plain LLaDA and ignores the
    # rest of this section: the fields of `VisionConfig` (SigLIP2 so400m/14 at 384 px, features
    # of block 26) and the image layout below.
    c.vision = ml_collections.ConfigDict({"enabled": False, **section(VisionConfig)})
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
    c.train.group_learning_rates = ml_collections.ConfigDict(dict.fromkeys(PARAM_GROUPS, 0.0))

    return c


def section(schema: type, **overrides: Any) -> ml_collections.ConfigDict:
    """The config section of a dataclass schema: its fields with their defaults (`overrides`
    replace some), less those marked `NOT_IN_SECTION`; tuples become lists, as flags give them."""
    values = dataclasses.asdict(schema(**overrides))
    return ml_collections.ConfigDict({
        f.name: list(values[f.name]) if isinstance(values[f.name], tuple) else values[f.name]
        for f in dataclasses.fields(schema) if f.metadata.get("in_section", True)})


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen `ModelConfig` of a config's `model` section (unknown fields are an error)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    given = dict(config.model)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}; known: {sorted(fields)}")
    return ModelConfig(**given)


def fail(field: str, expected: str, found: Any) -> None:
    """Raises `ValueError("config.{field}: expected {expected}, found {found!r}")`."""
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


# A field rule: (is_bad(value), what the error says is expected). `check_fields` walks tables of
# (space-separated field names, rule); the conditions are those under which a value is refused.
Rule = tuple[Callable[[Any], Any], str]
POSITIVE_INT: Rule = (lambda v: not isinstance(v, int) or v <= 0, "a positive integer")
POSITIVE_NUMBER: Rule = (lambda v: v <= 0, "a positive number")
# An integer >= 0, a bool counting as an integer (as it always did).
INT_AT_LEAST_0: Rule = (lambda v: not isinstance(v, int) or v < 0, "an integer >= 0")
# Counts where a bool (an int subclass) is refused too.
COUNT: Rule = (lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 0,
               "an integer >= 0")
POSITIVE_COUNT: Rule = (lambda v: COUNT[0](v) or v == 0, "a positive integer")


def one_of(choices: tuple[str, ...]) -> Rule:
    """The rule of a field that must be one of `choices`."""
    return (lambda v: v not in choices), f"one of {choices}"


def check_fields(where: str, values: Any, rules: Sequence[tuple[str, Rule]]) -> None:
    """Raises `ValueError("{where}: expected ..., found ...")` (`where` formatted with the field
    name) for the first field of `rules`, in order, whose value in `values` (a config section
    or a dataclass) is bad."""
    for names, (is_bad, expected) in rules:
        for name in names.split():
            value = getattr(values, name)
            if is_bad(value):
                raise ValueError(f"{where.format(name)}: expected {expected}, found {value!r}")


ROUTERS = ("softmax", "sigmoid_grouped")


def validate_model(m: ModelConfig) -> None:
    """Checks a ModelConfig (its mixture-of-experts fields too); raises ValueError naming the
    field."""
    check_fields("config.model.{}", m, (
        ("vocab_size d_model n_layers n_heads n_kv_heads head_dim mlp_hidden_size "
         "max_sequence_length", POSITIVE_INT),
        ("n_kv_heads", (lambda v: v > m.n_heads or m.n_heads % v,
                        f"a divisor of n_heads={m.n_heads}")),
        ("head_dim", (lambda v: v % 2, "an even number (rotary embedding)")),
        ("mask_token_id eos_token_id bos_token_id pad_token_id",
         (lambda v: not 0 <= v < m.vocab_size, f"an id in [0, vocab_size={m.vocab_size})")),
        ("dtype param_dtype", one_of(DTYPES)),
        ("remat_policy", one_of(REMAT_POLICIES)),
        ("attention_backend", one_of(ATTENTION_BACKENDS)),
        ("rope_theta", POSITIVE_NUMBER),
        ("rotary_dim", (lambda v: not isinstance(v, int) or not 0 <= v <= m.head_dim or v % 2,
                        f"an even number in [0, head_dim={m.head_dim}] (0: all)")),
        # Mixture of experts.
        ("num_experts experts_per_token expert_mlp_hidden_size num_shared_experts first_k_dense",
         COUNT),
    ))
    if not m.is_moe:
        check_fields("config.model.{}", m, (("experts_per_token num_shared_experts first_k_dense",
                                       (bool, "0 when model.num_experts=0 (a dense model)")),))
        return
    check_fields("config.model.{}", m, (
        ("experts_per_token", (lambda v: not 1 <= v <= m.num_experts,
                               f"in [1, num_experts={m.num_experts}]")),
        ("expert_mlp_hidden_size", (lambda v: v <= 0, "a positive integer with num_experts > 0")),
        ("first_k_dense", (lambda v: v >= m.n_layers,
                           f"less than n_layers={m.n_layers} (some layer must be MoE)")),
        ("router", one_of(ROUTERS)),
        ("routed_scaling", POSITIVE_NUMBER),
    ))
    if m.router == "sigmoid_grouped":
        groups, top = m.router_groups, m.router_top_groups
        if not isinstance(groups, int) or groups <= 0 or m.num_experts % groups:
            fail("model.router_groups", f"a positive divisor of num_experts={m.num_experts}",
                 groups)
        if m.num_experts // groups < 2:
            fail("model.router_groups", "at most num_experts / 2 (a group is scored by its "
                 "top-2 experts)", groups)
        if not isinstance(top, int) or not 1 <= top <= groups:
            fail("model.router_top_groups", f"in [1, router_groups={groups}]", top)
        if top * (m.num_experts // groups) < m.experts_per_token:
            fail("model.router_top_groups", f"enough groups to hold experts_per_token="
                 f"{m.experts_per_token} experts ({m.num_experts // groups} per group)", top)


CACHE_MODES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Settings of the reverse process: the schema of the `sampler` section, plus token ids.

    `threshold` / `factor` > 0 switch from the fixed step schedule to parallel decoding (then
    `steps` is not used). `eot_id < 0` means there is no end-of-turn token. `vocab_limit > 0`
    restricts candidates to ids below it (the tokenizer's size, when the embedding is padded).
    `banned_ids` are never candidates. `stop_at_eot` (LLaDA-V): once a row holds an EoT, only
    masked positions before its first EoT are committed, the row is finished when none is left
    (what follows is returned as EOS), and early exit finishes a row on EoT as well as EOS.
    The ids (`NOT_IN_SECTION`) come from the model and the tokenizer, not from the section.
    """

    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False          # EOS logit -inf: EOS is never generated
    # EOS/EoT logits -inf before the confidence softmax (others renormalised), at every T
    confidence_eos_eot_inf: bool = False
    # Fast sampling (REFERENCE.md section 6): KV caches, parallel decoding, early exit.
    cache: str = "none"           # none | prefix (cache before the block) | dual (and after it)
    refresh_every: int = 0        # with a cache: full pass every n steps of a block (0: first)
    threshold: float = 0.0        # > 0: commit every block candidate with confidence >= it
    factor: float = 0.0           # > 0: commit the largest n with c_k >= 1 - factor / (k + 1)
    early_exit: bool = False      # stop once every row has an EOS with nothing masked before it
    mask_id: int = dataclasses.field(default=126336, metadata=NOT_IN_SECTION)
    eos_id: int = dataclasses.field(default=126081, metadata=NOT_IN_SECTION)
    eot_id: int = dataclasses.field(default=126348, metadata=NOT_IN_SECTION)
    vocab_limit: int = dataclasses.field(default=0, metadata=NOT_IN_SECTION)
    # LLaDA-V sampling (REFERENCE.md section 5): ids never generated (their logits are -inf at
    # every masked position; LLaDA-V bans EOS, BOS and the header ids) and `<|eot_id|>` as a
    # finishing token for early_exit as well as EOS.
    banned_ids: tuple[int, ...] = ()
    # LLaDA-V: once an EoT is committed, later commits only before it; the row ends there
    stop_at_eot: bool = False

    def __post_init__(self):
        validate_sampler(self)
        if self.stop_at_eot and self.eot_id < 0:
            fail("sampler.stop_at_eot", "False when there is no EoT id (sampler.eot_token_id "
                 "and the tokenizer give none)", True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that finish a row for early exit: EOS, and EoT with `stop_at_eot`."""
        return (self.eos_id, self.eot_id) if self.stop_at_eot else (self.eos_id,)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict,
                    eot_id: int | None = None, **overrides: Any) -> SamplerConfig:
        """From `config.sampler` and the mask / EOS ids of `config.model`.

        The EoT id is `config.sampler.eot_token_id` when >= 0, else `eot_id` (pass the
        tokenizer's), else none. `overrides` replace single fields (e.g. from flags).
        """
        s = config.sampler
        fields = {f.name: _as_field_type(f, s[f.name]) for f in dataclasses.fields(cls)
                  if f.metadata.get("in_section", True)}
        fields.update(
            mask_id=config.model.mask_token_id, eos_id=config.model.eos_token_id,
            eot_id=s.eot_token_id if s.eot_token_id >= 0 else (-1 if eot_id is None else eot_id))
        return cls(**(fields | overrides))

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def parallel(self) -> bool:
        """True for threshold / factor decoding (a variable number of tokens per step)."""
        return self.threshold > 0 or self.factor > 0

    @property
    def schedule_steps(self) -> int:
        """Columns of the fixed schedule: steps per block (1, unused, for parallel decoding)."""
        return 1 if self.parallel else self.steps // self.num_blocks

    @property
    def max_steps_per_block(self) -> int:
        """Fixed schedule: steps / num_blocks; parallel decoding: one token per step at worst."""
        return self.block_length if self.parallel else self.steps // self.num_blocks


def _as_field_type(field: dataclasses.Field, value: Any) -> Any:
    """A section value as its dataclass field takes it: floats and flags cast (a flag may give
    `1` for `1.0`), lists of ids as tuples; other values as they are, for validation to judge."""
    if field.type == "float":
        return float(value)
    if field.type == "bool":
        return bool(value)
    if field.type.startswith("tuple"):
        return tuple(int(i) for i in value)
    return value


def validate_sampler(s: Any) -> None:
    """Checks the sampler settings (the `sampler` section or a `SamplerConfig`).

    Raises ValueError naming the field, including for contradictory fast-sampling settings.
    """
    check_fields("config.sampler.{}", s, (
        ("remasking", one_of(REMASKING)),
        ("gen_length", POSITIVE_INT),
        ("block_length", (lambda v: not isinstance(v, int) or v <= 0 or s.gen_length % v,
                          f"a positive divisor of sampler.gen_length={s.gen_length}")),
    ))
    num_blocks = s.gen_length // s.block_length
    parallel = s.threshold > 0 or s.factor > 0
    # Threshold / factor decoding choose their own number of steps.
    steps_rules = () if parallel else (
        ("steps", (lambda v: not isinstance(v, int) or v <= 0 or v % num_blocks,
                   f"a positive multiple of the number of blocks ({num_blocks} = gen_length "
                   f"{s.gen_length} / block_length {s.block_length})")),
        ("steps", (lambda v: v > s.gen_length, f"at most sampler.gen_length={s.gen_length} (a "
                   f"step commits at least one token)")),
    )
    check_fields("config.sampler.{}", s, (
        *steps_rules,
        ("temperature cfg_scale", (lambda v: v < 0, "a number >= 0")),
        ("cache", one_of(CACHE_MODES)),
        ("refresh_every", INT_AT_LEAST_0),
        ("refresh_every", (lambda v: v > 0 and s.cache == "none",
                           "0 when sampler.cache='none' (there is no cache to refresh)")),
        ("threshold", (lambda v: not 0 <= v <= 1, "a confidence in (0, 1], or 0 to turn it off")),
        ("factor", (lambda v: v < 0, "a number > 0, or 0 to turn it off")),
        ("factor", (lambda v: s.threshold > 0 and v > 0, f"0 when sampler.threshold="
                    f"{s.threshold} is set (choose one parallel decoding rule)")),
        ("remasking", (lambda v: parallel and v != "low_confidence", "'low_confidence' with "
                       "threshold/factor decoding (they compare model probabilities)")),
        ("banned_ids", (lambda v: any(COUNT[0](i) for i in v), "a list of token ids >= 0")),
    ))
    eos_banned = s.logits_eos_inf or getattr(s, "eos_id", None) in list(s.banned_ids)
    if s.early_exit and eos_banned and not s.stop_at_eot:
        fail("sampler.early_exit", "False when EOS is never generated (sampler.logits_eos_inf "
             "or EOS in sampler.banned_ids) unless sampler.stop_at_eot=True (there is nothing "
             "to exit on)", s.early_exit)


PACKINGS = ("concat", "pack")
SFT_MULTITURN = ("sample_turn", "all_responses")
BAD_RECORDS = ("error", "skip")


PARAM_GROUPS = ("vision_tower", "projector", "language_model")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of the SigLIP vision encoder (defaults: so400m/14 at 384 px, as LLaDA-V);
    the schema of the `vision` section but for its switch (`enabled`) and the image layout."""

    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    n_layers: int = 27           # blocks of the pretrained model (before any is dropped)
    n_heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6
    # Index into Hugging Face's `hidden_states` (0 = embeddings, k = output of block k, negative
    # counts from the end): -2 is LLaDA-V's choice (drop the last block), -1 the full depth.
    feature_layer: int = -2
    use_post_layernorm: bool = False
    num_channels: int = dataclasses.field(default=3, metadata=NOT_IN_SECTION)  # RGB pixels
    dtype: str = "float32"         # compute dtype of activations
    param_dtype: str = "float32"   # storage dtype of parameters
    remat_policy: str = "none"

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image (27 * 27 = 729 for so400m/14 at 384 px)."""
        return self.patches_per_side ** 2

    @property
    def num_layers_used(self) -> int:
        """Blocks that are built and run: the ones up to `feature_layer`."""
        if self.feature_layer < 0:
            return self.n_layers + 1 + self.feature_layer
        return self.feature_layer

    @property
    def num_params(self) -> int:
        """Parameters of the blocks that are built (see the test for the derivation)."""
        w, m, p, c = self.width, self.mlp_dim, self.patch_size, self.num_channels
        embeddings = p * p * c * w + w + self.num_patches * w
        per_layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 2 * 2 * w
        post = 2 * w if self.use_post_layernorm else 0
        return embeddings + self.num_layers_used * per_layer + post


def validate_vision_tower(cfg: VisionConfig) -> None:
    """Checks a VisionConfig; raises ValueError naming the offending field."""
    n = cfg.n_layers
    check_fields("vision config field {}", cfg, (
        ("image_size patch_size width n_layers n_heads mlp_dim num_channels", POSITIVE_COUNT),
        ("patch_size", (lambda v: v > cfg.image_size, f"at most image_size={cfg.image_size}")),
        ("n_heads", (lambda v: cfg.width % v, f"a divisor of width={cfg.width}")),
        ("feature_layer", (lambda v: not isinstance(v, int) or not (-n <= v <= -1 or 1 <= v <= n),
                           f"an index of a block output in [1, {n}] or [-{n}, -1] (0, the "
                           f"embedding output, is not a feature layer)")),
        ("layer_norm_eps", (lambda v: not v > 0, "a positive number")),
        ("dtype param_dtype", one_of(DTYPES)),
        ("remat_policy", one_of(REMAT_POLICIES)),
    ))


def vision_config(config: ml_collections.ConfigDict) -> VisionConfig | None:
    """The frozen `VisionConfig` of the `vision` section (None when vision is disabled)."""
    if not config.vision.enabled:
        return None
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionConfig(**{k: v for k, v in config.vision.items() if k in fields})


def anyres_max_tiles(image_aspect_ratio: str) -> int | None:
    """N of 'anyres_max_N'; None for 'square'. Raises ValueError for anything else."""
    if image_aspect_ratio == "square":
        return None
    match = isinstance(image_aspect_ratio, str) and re.fullmatch(r"anyres_max_(\d+)",
                                                                 image_aspect_ratio)
    if match and int(match[1]) > 0:
        return int(match[1])
    fail("vision.image_aspect_ratio", "'square' or 'anyres_max_N' with N a positive integer "
         "(e.g. 'anyres_max_4')", image_aspect_ratio)


def parse_trainable(spec: str) -> tuple[str, ...]:
    """The parameter groups a `train.trainable` spec names ('all': every group); what the
    optimizer does with them is `train/optimizer.py`."""
    if not isinstance(spec, str) or not spec.strip():
        fail("train.trainable", f"'all' or a comma-separated list of {PARAM_GROUPS}", spec)
    if spec.strip() == "all":
        return PARAM_GROUPS
    groups = tuple(g.strip() for g in spec.split(","))
    if not set(groups) <= set(PARAM_GROUPS) or len(set(groups)) != len(groups):
        fail("train.trainable", f"'all' or distinct names among {PARAM_GROUPS}", spec)
    return groups


def validate_vision(config: ml_collections.ConfigDict) -> None:
    """Checks the `vision` section and the multimodal training fields; raises ValueError."""
    t = config.train
    groups = parse_trainable(t.trainable)
    for group in PARAM_GROUPS:
        value = t.group_learning_rates.get(group)
        if not isinstance(value, (int, float)) or value < 0:
            fail(f"train.group_learning_rates.{group}", "a learning rate >= 0 (0: "
                 "train.learning_rate)", value)
    unknown = sorted(set(t.group_learning_rates) - set(PARAM_GROUPS))
    if unknown:
        fail("train.group_learning_rates", f"only the groups {PARAM_GROUPS}", unknown)
    if not config.vision.enabled:
        if groups != PARAM_GROUPS and groups != ("language_model",):
            fail("train.trainable", "'all' or 'language_model' without a vision tower "
                 "(vision.enabled=False)", t.trainable)
        return
    try:
        validate_vision_tower(vision_config(config))
    except ValueError as e:  # re-worded with the config path of the field
        raise ValueError(f"config.vision: {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Validates the whole config early; raises ValueError naming the field.

    Nothing here depends on the devices: `parallel.validate_mesh(config, num_devices)` checks
    the mesh sizes and the batch rows against them.
    """
    m = model_config(config)
    validate_model(m)
    validate_vision(config)
    t = config.train
    check_fields("config.train.{}", t, (
        ("objective", one_of(OBJECTIVES)),
        ("schedule", one_of(SCHEDULES)),
        ("steps batch_size seq_len grad_accum_steps", POSITIVE_INT),
        ("seq_len", (lambda v: v > m.max_sequence_length,
                     f"at most model.max_sequence_length={m.max_sequence_length}")),
        ("grad_accum_steps", (lambda v: t.batch_size % v,
                              f"a divisor of train.batch_size={t.batch_size}")),
        ("loss_chunk_size", (INT_AT_LEAST_0[0], "an integer >= 0 (0: no chunking)")),
        ("mask_eps", (lambda v: not 0 < v < 1, "a number in (0, 1)")),
        ("random_length_prob", (lambda v: not 0 <= v <= 1, "a probability in [0, 1]")),
        ("decay_fraction", (lambda v: not 0 <= v <= 1, "a fraction in [0, 1]")),
        ("learning_rate", POSITIVE_NUMBER),
        # warmup_steps > steps is allowed: a short run (--config.train.steps=10) is all warmup.
        ("warmup_steps", INT_AT_LEAST_0),
        ("log_every keep_checkpoints eval_batches", POSITIVE_INT),
        ("moe_aux_loss_weight moe_z_loss_weight moe_bias_update_rate",
         (lambda v: not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0,
          "a number >= 0")),
        ("checkpoint_every eval_every max_bad_steps",
         (INT_AT_LEAST_0[0], "an integer >= 0 (0: none)")),
    ))
    if t.eval_every > 0 and not config.data.eval_source:
        fail("data.eval_source", f"a source spec such as 'synthetic' when train.eval_every="
             f"{t.eval_every} > 0", config.data.eval_source)
    check_fields("config.train.{}", t, (
        ("b1 b2", (lambda v: not 0 <= v < 1, "a number in [0, 1)")),
        ("weight_decay grad_clip", (lambda v: v < 0, "a number >= 0 (grad_clip 0: no clipping)")),
        ("adam_eps", POSITIVE_NUMBER),
        ("min_lr_ratio", (lambda v: not 0 <= v <= 1,
                          "a fraction of the peak learning rate in [0, 1]")),
        ("init_from", (lambda v: not isinstance(v, str), "a checkpoint directory or ''")),
        # The range of grain's shuffle seed (a bad seed used to fail there, inside grain).
        ("seed", (lambda v: COUNT[0](v) or v >= 2**32, "an integer in [0, 2**32)")),
    ))
    validate_sampler(config.sampler)
