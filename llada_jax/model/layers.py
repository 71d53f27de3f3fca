"""Building blocks of the mask predictor: RMSNorm, rotary embedding, projections with logical axes.

Every parameter is created through `nn.with_logical_partitioning`, so its logical axis names
(`embed`, `heads`, `mlp`, ...) travel with it and `llada_jax.parallel` can shard it by the rule
table of the config. These modules know nothing about diffusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = nn.initializers.Initializer


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


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
    """A bias-free linear map from the last `len(in_axes)` dims to `features`, with logical axes.

    The kernel has shape `in_shape + features` and logical names `in_axes + out_axes`.
    """

    features: Sequence[int]
    in_axes: Sequence[str]
    out_axes: Sequence[str]
    num_in_dims: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.num_in_dims:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                         tuple(self.in_axes) + tuple(self.out_axes)),
            tuple(in_shape) + tuple(self.features), self.param_dtype)
        contract = tuple(range(x.ndim - self.num_in_dims, x.ndim))
        return jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype),
            ((contract, tuple(range(self.num_in_dims))), ((), ())))


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
