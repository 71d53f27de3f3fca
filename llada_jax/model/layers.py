"""Building blocks of the mask predictor: RMSNorm, rotary embedding, projections with logical axes.

Every parameter is created through `nn.with_logical_partitioning`, so its logical axis names
(`embed`, `heads`, `mlp`, ...) travel with it and `llada_jax.parallel` can shard it by the rule
table of the config. These modules know nothing about diffusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axes of the hidden states [B, L, d] between blocks.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class RMSNorm(nn.Module):
    """RMSNorm as LLaDA computes it: normalise in float32, cast back, then scale by the weight."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float,
                     rotary_dim: int = 0) -> jax.Array:
    """Rotate-half (non-interleaved) RoPE, computed in float32.

    x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions.
    Over the first `rotary_dim` dims of a head (0: all of head_dim; LLaDA2 rotates 64 of 128 and
    passes the rest through), the first half pairs with the second half: (x1, x2) ->
    (x1 cos - x2 sin, x2 cos + x1 sin), with frequency theta^(-2i/rotary_dim) for pair i.
    """
    head_dim = x.shape[-1]
    if rotary_dim and rotary_dim != head_dim:
        rotated = rotary_embedding(x[..., :rotary_dim], positions, theta)
        return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, L, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, hd]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Projection(nn.Module):
    """A linear map from the last `len(in_axes)` dims to `features`, with logical axes.

    The kernel has shape `in_shape + features` and logical names `in_axes + out_axes`: created
    at its real rank (not flattened as `nn.DenseGeneral` does), so its sharding annotation is
    valid at creation under an active mesh. It is initialised by `kernel_init` (default
    normal(init_std)); with `use_bias` a bias of shape `features` (named `out_axes`, zeros) is
    added. Computed in `dtype`.
    """

    features: Sequence[int]
    in_axes: Sequence[str]
    out_axes: Sequence[str]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    kernel_init: nn.initializers.Initializer | None = None
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        init = self.kernel_init or nn.initializers.normal(self.init_std)
        axes = tuple(self.in_axes) + tuple(self.out_axes)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, axes),
                            tuple(x.shape[-n_in:]) + tuple(self.features), self.param_dtype)
        contract = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((contract, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   tuple(self.out_axes)),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def swiglu(x: jax.Array, hidden: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
           init_std: float, d_model: int) -> jax.Array:
    """The SwiGLU feed-forward ff_out(silu(ff_proj(x)) * up_proj(x)), created in the calling
    module's scope (call it from inside a compact `__call__`): its kernels are that module's
    `ff_proj`, `up_proj` and `ff_out`."""
    proj = dict(dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    gate = Projection((hidden,), ("embed",), ("mlp",), name="ff_proj", **proj)(x)
    up = Projection((hidden,), ("embed",), ("mlp",), name="up_proj", **proj)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up,
                                   ("activation_batch", "activation_length", "activation_mlp"))
    return Projection((d_model,), ("mlp",), ("embed",), name="ff_out", **proj)(h)


def scan_layers(block: type[nn.Module], length: int, remat_policy: str, in_axes: Any,
                static_argnums: tuple[int, ...] = ()) -> Any:
    """`length` copies of `block` stacked by `nn.scan` (params with a leading `layers` axis),
    rematerialised by `remat_policy` (a `REMAT_POLICIES` name, or "none"). `in_axes` and
    `static_argnums` count the block's call arguments (`static_argnums` from 1: self is 0).
    Returns the scanned class; construct it with the block's fields."""
    if remat_policy != "none":
        # prevent_cse=False: the scan already keeps XLA from merging the recomputation away.
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False,
                         static_argnums=static_argnums)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})
