"""The mixture-of-experts feed-forward block: a router, routed SwiGLU experts, shared experts.

Routers (`ModelConfig.router`), both computed in float32 from the block's input:
  * `softmax` (LLaDA-MoE-7B-A1B): p = softmax(x W_r) over the E experts; the top-k experts by p,
    weighted by their p as they are (no renormalisation unless `normalize_top_k`).
  * `sigmoid_grouped` (LLaDA2.x): s = sigmoid(x W_r); selection uses s + expert_bias (a learned
    per-expert offset that only steers the choice): the experts form `router_groups` groups,
    a group scores the sum of its two best biased scores, the best `router_top_groups` groups
    stay eligible, and the top-k eligible experts are chosen; their weights are the UNbiased s,
    renormalised to sum to 1 (`normalize_top_k`, when k > 1) and times `routed_scaling`.
Ties go to the lower expert index (`lax.top_k` is stable).

Dispatch is capacity-free (no token is ever dropped): the T x k (token, expert) assignments are
sorted by expert, each expert's contiguous run of token rows goes through its SwiGLU in one
grouped matmul (`jax.lax.ragged_dot`, three per layer), and the rows are put back in token order
and summed with the routing weights. No [T, E, d] tensor and no all-experts einsum exist; the
compute is that of the k chosen experts only. (On TPU and GPU `ragged_dot` lowers to XLA's
native ragged dot; XLA:CPU has none, and jax lowers it there as a dense masked dot over every
expert: right, and fine for tests, but E times the work and memory, so CPU compiles, including
AOT memory analyses on fake CPU devices, overstate the MoE layers' cost.)

Sharding. Expert weights [E, d, f] are stored sharded over the `expert` mesh axis (logical
`experts`) and d over `fsdp` (`embed`), f over `tensor` (`mlp`); tokens stay sharded over the
batch axes (data, fsdp, expert), and each device sorts and computes only its own tokens
(`dispatch`, a shard_map over the batch axes). Each layer's expert weights are gathered for the
grouped matmuls (ZeRO-3 style, as FSDP already does for every dense kernel) rather than
move tokens to experts with an all-to-all: an all-to-all needs static per-device buffers, i.e.
a capacity factor that drops tokens or a worst-case T x k buffer per peer, and the unbalanced
routing of an untrained or fine-grained (256-expert) model makes both bad trades on small
meshes; gathering weights is exact, drop-free and needs no hand-written collective, and the
sharded storage still divides expert memory (params, gradients and Adam moments: the bulk of
an MoE model) by the expert-axis size. Its cost is a per-layer weight all-gather (and gradient
reduce-scatter) of the expert weights; an all-to-all dispatch (shard_map) is the upgrade once
expert weights per layer outgrow the activations they would replace.

Router statistics (`RouterStats`, per layer): `load` [E] (assignments per expert; they sum to
T x k, nothing is dropped), `aux_loss` (Switch load balancing E * sum_e f_e P_e with f_e =
load_e / T as in the official (HF) loss, so k at perfect balance; P_e = the mean router
probability of expert e; for the sigmoid router the per-token
normalised scores), `z_loss` (mean over tokens of logsumexp(logits)^2). The train step weights
them with `train.moe_aux_loss_weight` / `train.moe_z_loss_weight` and uses `load` for the
auxiliary-loss-free expert-bias update (`expert_bias_update`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.model.layers import Projection, swiglu


class RouterStats(NamedTuple):
    """One MoE layer's routing statistics (stacked over layers by the scan)."""

    load: jax.Array       # [E] float32: token-expert assignments per expert
    aux_loss: jax.Array   # [] float32: Switch load-balancing loss
    z_loss: jax.Array     # [] float32: router z-loss


class Routing(NamedTuple):
    experts: jax.Array    # [T, k] int32 chosen experts, best first
    weights: jax.Array    # [T, k] float32 combine weights
    probs: jax.Array      # [T, E] float32 router probabilities (for the balancing loss)


def route(logits: jax.Array, config: ModelConfig, expert_bias: jax.Array | None = None) -> Routing:
    """Chooses k experts per token from float32 router logits [T, E] (module docstring)."""
    c = config
    k = c.experts_per_token
    logits = logits.astype(jnp.float32)
    if c.router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, k)
    elif c.router == "sigmoid_grouped":
        scores = jax.nn.sigmoid(logits)
        biased = scores if expert_bias is None else scores + expert_bias.astype(jnp.float32)
        tokens, num_experts = biased.shape
        groups = c.router_groups
        grouped = biased.reshape(tokens, groups, num_experts // groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)            # [T, G]
        _, best_groups = jax.lax.top_k(group_scores, c.router_top_groups)         # [T, tg]
        eligible = jnp.any(best_groups[:, :, None] == jnp.arange(groups)[None, None, :],
                           axis=1)                                                # [T, G]
        eligible = jnp.repeat(eligible, num_experts // groups, axis=1)            # [T, E]
        _, experts = jax.lax.top_k(jnp.where(eligible, biased, -jnp.inf), k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"config.model.router: expected 'softmax' or 'sigmoid_grouped', "
                         f"found {c.router!r}")
    if c.normalize_top_k and k > 1:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), weights * c.routed_scaling, probs)


def router_stats(logits: jax.Array, routing: Routing, num_experts: int) -> RouterStats:
    """Load per expert and the two auxiliary losses of one layer (module docstring)."""
    tokens = routing.experts.shape[0]
    load = jnp.zeros((num_experts,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
    fraction = load / tokens      # as the official loss: k at perfect balance, not 1
    mean_prob = jnp.mean(routing.probs, axis=0)
    aux = num_experts * jnp.sum(fraction * mean_prob)
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))
    return RouterStats(load, aux, z)


def grouped_swiglu(x: jax.Array, experts: jax.Array, wi_gate: jax.Array, wi_up: jax.Array,
                   wo: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Every (token, expert) assignment through its expert: x [T, d], experts [T, k] ->
    [T, k, d], with the assignments sorted by expert and one `ragged_dot` per projection."""
    tokens, k = experts.shape
    num_experts = wi_gate.shape[0]
    flat = experts.reshape(-1)                                    # assignment a = t * k + j
    order = jnp.argsort(flat, stable=True)                        # sorted position -> a
    rows = x[order // k].astype(dtype)                            # [T k, d], grouped by expert
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    gate = jax.lax.ragged_dot(rows, wi_gate.astype(dtype), sizes)
    up = jax.lax.ragged_dot(rows, wi_up.astype(dtype), sizes)
    hidden = nn.silu(gate) * up
    out = jax.lax.ragged_dot(hidden, wo.astype(dtype), sizes)   # [T k, d], sorted
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return out[inverse].reshape(tokens, k, -1)


def _batch_mesh_axes(tokens: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the token rows are split over, when a mesh and rule table
    are active and split them evenly; () otherwise (no mesh, one device, or an odd batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    spec = nn.logical_to_mesh_axes(("activation_batch",))
    names = spec[0] if spec else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    axes = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return axes if axes and tokens % size == 0 else ()


def dispatch(x: jax.Array, experts: jax.Array, wi_gate: jax.Array, wi_up: jax.Array,
             wo: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`grouped_swiglu` with each device sorting only its own token rows.

    Under a mesh the token rows [T, d] are split over the batch axes; a global argsort would
    gather every token onto every device. Instead the sort, the grouped matmuls and the unsort
    run per device in a `shard_map` over the batch axes, with the expert weights replicated
    over those axes inside it: the partitioner all-gathers them (and reduce-scatters their
    gradients) as for any FSDP weight, see the module docstring. The other mesh axes (tensor)
    stay under automatic partitioning.
    """
    axes = _batch_mesh_axes(x.shape[0])
    # XLA:CPU (jax 0.10.2) aborts compiling the backward pass of this shard_map in a 16-bit
    # compute dtype ("AllReducePromotion ... Invalid binary instruction opcode copy"); there the
    # partitioner's global sort is used instead (same values, every device sorts all tokens).
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) != jnp.float32:
        axes = ()
    if not axes:
        return grouped_swiglu(x, experts, wi_gate, wi_up, wo, dtype)
    rows = jax.sharding.PartitionSpec(axes)
    local = jax.shard_map(
        lambda *args: grouped_swiglu(*args, dtype=dtype), axis_names=set(axes),
        in_specs=(rows, rows, jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(),
                  jax.sharding.PartitionSpec()),
        out_specs=rows)
    return local(x, experts, wi_gate, wi_up, wo)


class MoE(nn.Module):
    """The MoE feed-forward of one block: x [B, L, d] -> (y [B, L, d], RouterStats)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        num_experts, d, f = c.num_experts, c.d_model, c.expert_mlp_hidden_size
        batch, length, _ = x.shape
        tokens = jnp.asarray(x).reshape(batch * length, d)

        logits = Projection((num_experts,), ("embed",), (None,), dtype=jnp.float32,
                            param_dtype=param_dtype, init_std=c.init_std, name="router")(tokens)
        expert_bias = None
        if c.router == "sigmoid_grouped":
            # Float32 always: the aux-loss-free update moves it by tiny steps.
            expert_bias = self.param("expert_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, (None,)), (num_experts,), jnp.float32)
        routing = route(logits, c, expert_bias)

        def expert_weight(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(
                nn.initializers.normal(c.init_std), axes), shape, param_dtype)

        wi_gate = expert_weight("wi_gate", (num_experts, d, f), ("experts", "embed", "mlp"))
        wi_up = expert_weight("wi_up", (num_experts, d, f), ("experts", "embed", "mlp"))
        wo = expert_weight("wo", (num_experts, f, d), ("experts", "mlp", "embed"))
        per_expert = dispatch(tokens, routing.experts, wi_gate, wi_up, wo, dtype)
        y = jnp.einsum("tkd,tk->td", per_expert.astype(jnp.float32), routing.weights)
        y = y.astype(dtype).reshape(batch, length, d)
        if c.num_shared_experts:
            y = y + SharedExperts(c, name="shared")(x)
        y = nn.with_logical_constraint(y, ("activation_batch", "activation_length",
                                           "activation_embed"))
        return y, router_stats(logits, routing, num_experts)


class SharedExperts(nn.Module):
    """The always-on experts: one SwiGLU of num_shared_experts * expert_mlp_hidden_size."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        return swiglu(x, c.num_shared_experts * c.expert_mlp_hidden_size,
                      dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                      init_std=c.init_std, d_model=c.d_model)


def expert_bias_update(params: Any, load: jax.Array, rate: float, old_params: Any) -> Any:
    """The auxiliary-loss-free balancing step: every `expert_bias` [L, E] becomes its value in
    `old_params` (the optimizer never moves it, weight decay included) plus rate * sign(mean
    load - load) per layer: under-loaded experts become more attractive, over-loaded less.
    `load` [L, E] is the step's assignments per expert; rate 0 only keeps the bias fixed."""
    def update(path, new, old):
        if not any(getattr(entry, "key", None) == "expert_bias" for entry in path):
            return new
        if rate == 0:
            return old
        step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return (old + rate * step).astype(old.dtype)
    return jax.tree_util.tree_map_with_path(update, params, old_params)
