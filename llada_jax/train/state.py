"""The train state and its sharded initialisation.

`TrainState` (step, params, opt_state, rng) is a plain pytree: it is what the jitted step takes
and returns, what orbax checkpoints, and what donation recycles.

Sharded init, so that no host or device ever holds the whole model:
  1. `jax.eval_shape` the model init: abstract params still boxed in `nn.LogicallyPartitioned`,
     i.e. carrying their logical axis names;
  2. logical names -> `NamedSharding`s with the config's rule table (`llada_jax.parallel`);
     the optimizer state (Adam moments) is sharded exactly like the params it mirrors
     (`optax.tree_map_params`), its scalars replicated;
  3. `jax.jit(init, out_shardings=...)`: every array is born on its shards.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.interop import safetensors_io
from llada_jax.model.multimodal import LLaDAV
from llada_jax.model.transformer import Transformer


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one step to the next.

    step: int32 scalar, number of optimizer updates done.
    params: the model parameters (unboxed arrays).
    opt_state: the optax state (Adam moments sharded like params).
    rng: uint32 key data of the run's base key; the step key is `fold_in(rng, step)`, so a
        resumed run draws the same noise as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_model(config: ml_collections.ConfigDict) -> Transformer | LLaDAV:
    """The mask predictor of `config.model`; with `vision.enabled`, the LLaDA-V model (vision
    tower + projector in front of it, params `vision_tower` / `projector` / `language_model`)."""
    if config.vision.enabled:
        return LLaDAV(config_lib.model_config(config), config_lib.vision_config(config))
    return Transformer(config_lib.model_config(config))


def _init_tokens(mesh: Mesh | None) -> jax.Array:
    # The dummy batch only fixes parameter shapes; one row per batch shard keeps the activation
    # sharding constraints of the forward pass divisible. Its length does not matter.
    rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    return jnp.zeros((rows, 1), jnp.int32)


def abstract_boxed_params(model: Transformer, mesh: Mesh | None = None) -> Any:
    """Parameter shapes with their logical axis names (`nn.LogicallyPartitioned` boxes)."""
    return jax.eval_shape(lambda rng: model.init(rng, _init_tokens(mesh))["params"],
                          jax.random.key(0))


def _init_state_fn(model: Transformer, tx: optax.GradientTransformation, seed: int,
                   mesh: Mesh | None):
    def init() -> TrainState:
        base = jax.random.key(seed)   # fold 0: the init key, fold 1: the run's key
        init_key, run_key = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
        params = nn.meta.unbox(model.init(init_key, _init_tokens(mesh))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(run_key))
    return init


def state_shardings(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                    rules) -> TrainState:
    """A TrainState of NamedShardings: params by the rules, optimizer state like params."""
    p_shardings = safetensors_io.param_shardings(abstract_boxed_params(model, mesh), mesh, rules)
    abstract = jax.eval_shape(_init_state_fn(model, tx, 0, mesh))
    replicated = parallel.replicated(mesh)
    # Per-group optimizers (optax.multi_transform / masked, see optimizer.py) hold MaskedNode
    # (no array) where another group's params are: those stay MaskedNode.
    opt_shardings = optax.tree_map_params(
        tx, lambda value, sharding: value if isinstance(value, optax.MaskedNode) else sharding,
        abstract.opt_state, p_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
    return TrainState(step=replicated, params=p_shardings, opt_state=opt_shardings,
                      rng=replicated)


def abstract_train_state(model: Transformer, tx: optax.GradientTransformation,
                         shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs of the state carrying their shardings (restore targets, AOT compiles)."""
    return with_shardings(jax.eval_shape(_init_state_fn(model, tx, 0, None)), shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """The `ShapeDtypeStruct`s of `abstract` (boxed or not) carrying the matching `shardings`
    (restore targets, AOT compiles)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract), shardings)


def create_train_state(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh, rules,
                       seed: int, shardings: TrainState | None = None) -> TrainState:
    """A freshly initialised state, every array created directly on its shards."""
    shardings = state_shardings(model, tx, mesh, rules) if shardings is None else shardings
    init = jax.jit(_init_state_fn(model, tx, seed, mesh), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init()


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def non_finite_paths(tree: Any) -> list[str]:
    """Key paths (`['blocks']['ff_out']['kernel']`) of the floating-point arrays of `tree` that
    hold a NaN or an Inf; [] when all are finite. One jitted reduction on the arrays' devices;
    only booleans come back to the host."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = jax.device_get(_finite_flags([x for _, x in leaves]))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, flags, strict=True)
            if not ok]
