"""Bidirectional multi-head / grouped-query attention with key masks and a KV-cache window.

The attention layer computes queries, keys and values for a *window* of positions (the whole
sequence in training). For fast sampling the caller can pass the cached keys/values of the whole
sequence: the window's fresh keys/values are written into that cache at `cache_index` and the
window attends over every cached position. The layer returns the window's keys/values so the
caller can keep (or drop) them: caches are values passed in and out, never hidden state.

Backends (`ModelConfig.attention_backend`):
  * `xla`    - plain einsum + float32 softmax; runs everywhere and is the reference.
  * `cudnn`  - `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel on
               NVIDIA GPUs (bf16/fp16 only).
  * `splash` - the Pallas splash-attention kernel on TPU.
All take the same boolean mask semantics: `mask[b, q, k]` True means query q may see key k.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.model.layers import Projection, dtype_of, rotary_embedding

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def build_attention_mask(key_mask: jax.Array | None, query_segments: jax.Array | None,
                   key_segments: jax.Array | None, batch: int, q_len: int,
                   k_len: int) -> jax.Array | None:
    """Boolean [batch, q_len, k_len] mask from a key-padding mask and/or segment ids (or None)."""
    mask = None
    if key_mask is not None:
        mask = jnp.broadcast_to(key_mask[:, None, :].astype(bool), (batch, q_len, k_len))
    if query_segments is not None and key_segments is not None:
        same = query_segments[:, :, None] == key_segments[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q: [B, Lq, H, D]; k, v: [B, Lk, KVH, D]; mask: [B, Lq, Lk] bool or None -> [B, Lq, H, D]."""
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    groups = h // kvh
    q = q.reshape(b, lq, kvh, groups, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(b, lq, h, d)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None) -> jax.Array:
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_backend='cudnn' needs model.dtype bfloat16 or float16, "
                         f"found {q.dtype}")
    m = None if mask is None else mask[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: jax.Array | None) -> jax.Array:
    """TPU Pallas splash attention (full bidirectional; segment masks only, no arbitrary mask)."""
    if jax.default_backend() != "tpu":
        raise ValueError(f"attention_backend='splash' runs on TPU only; this is "
                         f"{jax.default_backend()!r}: use 'xla' (or 'cudnn' on GPU)")
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
        splash_attention_kernel as sk, splash_attention_mask as sm)

    if mask is not None:
        raise ValueError("attention_backend='splash' supports neither padding masks nor "
                         "segment masks in this version; use 'xla' for padded batches")
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((lq, lk))] * h),
                                head_shards=1, q_seq_shards=1)
    groups = h // kvh
    qt = jnp.swapaxes(q, 1, 2) / math.sqrt(d)          # [B, H, Lq, D]
    kt = jnp.repeat(jnp.swapaxes(k, 1, 2), groups, 1)  # [B, H, Lk, D]
    vt = jnp.repeat(jnp.swapaxes(v, 1, 2), groups, 1)
    return jnp.swapaxes(jax.vmap(kernel)(qt, kt, vt), 1, 2)


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}


class Attention(nn.Module):
    """Self-attention of one block over a window of positions.

    Inputs: x [B, Lw, d] for the window; positions [B, Lw] RoPE positions; mask [B, Lw, Lk] or
    None; `cache` = (k, v) each [B, L, KVH, hd] of the whole sequence, or None (then the window is
    the whole sequence); `cache_index` the (possibly traced) start of the window in the cache.
    Returns (out [B, Lw, d], (k, v) of the window [B, Lw, KVH, hd]).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.config
        dtype, param_dtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
        proj = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.init_std)
        q = Projection((c.n_heads, c.head_dim), ("embed",), ("heads", "head_dim"),
                       name="q_proj", **proj)(x)
        k = Projection((c.n_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                       name="k_proj", **proj)(x)
        v = Projection((c.n_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                       name="v_proj", **proj)(x)
        q = rotary_embedding(q, positions, c.rope_theta)
        k = rotary_embedding(k, positions, c.rope_theta)
        q = nn.with_logical_constraint(
            q, ("activation_batch", "activation_length", "activation_heads", None))
        window_kv = (k, v)
        if cache is not None:
            cache_k, cache_v = cache
            start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            k = jax.lax.dynamic_update_slice_in_dim(cache_k.astype(k.dtype), k, start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v.astype(v.dtype), v, start, axis=1)
        out = BACKENDS[c.attention_backend](q, k, v, mask)
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", None))
        out = Projection((c.d_model,), ("heads", "head_dim"), ("embed",), num_in_dims=2,
                         name="attn_out", **proj)(out)
        return out, window_kv
