"""Bidirectional multi-head / grouped-query attention with key masks and a KV-cache window.

The attention layer computes queries, keys and values for a *window* of positions (the whole
sequence in training). For fast sampling the caller can pass the cached keys/values of the whole
sequence: the window's fresh keys/values are written into that cache at `cache_index` and the
window attends over every cached position. The layer returns the window's keys/values so the
caller can keep (or drop) them: caches are values passed in and out, never hidden state.

Backends (`ModelConfig.attention_backend`):
  * `xla`    - plain einsum + float32 softmax, in blocks of queries for long sequences;
               runs everywhere and is the reference.
  * `cudnn`  - `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel on
               NVIDIA GPUs (bf16/fp16 only).
  * `splash` - the Pallas splash-attention kernel on TPU.
All take a `MaskInfo` (key-padding mask and/or segment ids); a query sees a key when the key is
not padding and both are in the same segment.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.model.layers import Projection, RMSNorm, rotary_embedding

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Logical axes of per-head activations [B, L, heads, head_dim].
_HEAD_ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_heads", None)


class MaskInfo(NamedTuple):
    """Who may attend to whom, in the compact form every backend can use.

    key_mask: [B, Lk] bool, False for padded keys (or None); segment_ids [B, L] int: a query
    sees only keys of its own segment (or None; packed documents are never a cached window, so
    queries and keys are the same L positions). Keeping the pieces instead of a dense
    [B, Lq, Lk] mask lets the splash kernel use segment ids and keeps XLA from materialising a
    quadratic mask.
    """

    key_mask: jax.Array | None = None
    segment_ids: jax.Array | None = None

    def dense(self, q_len: int, k_len: int) -> jax.Array | None:
        """[B, Lq, Lk] bool mask (True = may attend), or None when everything is visible."""
        mask = None if self.key_mask is None else self.key_mask[:, None, :].astype(bool)
        if self.segment_ids is not None:
            same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
            mask = same if mask is None else mask & same
        return None if mask is None else jnp.broadcast_to(mask, (mask.shape[0], q_len, k_len))


# Queries per block of the xla backend's score matrix. The scores of a whole training sequence
# are [B, H, L, L] float32 (2 GiB per layer for the 1B preset at 8 x 2048, more again in the
# backward pass); computing them a block of queries at a time, each block rematerialised in the
# backward pass, bounds that to [B, H, block, L]. Every query's softmax is unchanged.
QUERY_BLOCK = 512


def _attend(q, k, v, dense_mask):
    """q [B, Lq, KVH, G, D], k/v [B, Lk, KVH, D], dense_mask [B, Lq, Lk] or None."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    if dense_mask is not None:
        scores = jnp.where(dense_mask[:, None, None, :, :], scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", weights, v)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo,
                  query_block: int = QUERY_BLOCK) -> jax.Array:
    """q: [B, Lq, H, D]; k, v: [B, Lk, KVH, D] -> [B, Lq, H, D]. Softmax in float32.

    Sequences longer than `query_block` that it divides are computed a block of queries at a
    time in a `lax.scan`, each block under `jax.checkpoint`, so neither pass holds the whole
    [B, H, Lq, Lk] score matrix; the values are those of one block.
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, lq, kvh, h // kvh, d)
    dense = mask.dense(lq, k.shape[1])
    if lq <= query_block or lq % query_block:
        return _attend(q, k, v, dense).reshape(b, lq, h, d)
    blocks = lq // query_block

    def split(x):  # [B, Lq, ...] -> [blocks, B, query_block, ...]
        return jnp.moveaxis(x.reshape((b, blocks, query_block, *x.shape[2:])), 1, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_block(q_block, mask_block):
        return _attend(q_block, k, v, mask_block)

    xs = (split(q), None if dense is None else split(dense))
    _, out = jax.lax.scan(lambda carry, x: (carry, one_block(*x)), None, xs)
    return jnp.moveaxis(out, 0, 1).reshape(b, lq, h, d)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo) -> jax.Array:
    """The fused cuDNN flash-attention kernel of `jax.nn.dot_product_attention` (NVIDIA GPUs)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_backend='cudnn' needs model.dtype bfloat16 or float16, "
                         f"found {q.dtype}")
    dense = mask.dense(q.shape[1], k.shape[1])
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if dense is None else dense[:, None], implementation="cudnn")


def _splash_block(length: int) -> int:
    for block in (512, 256, 128):
        if length % block == 0:
            return block
    raise ValueError(f"attention_backend='splash' needs sequence lengths that are multiples of "
                     f"128, found {length}; pad the batch or use attention_backend='xla'")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo) -> jax.Array:
    """The Pallas splash-attention kernel (TPU), full bidirectional mask plus segment ids.

    Padding is expressed as segment ids (padded keys get segment 0, which no query has). On CPU
    the kernel runs in Pallas interpret mode (slow; for tests and debugging); GPUs should use
    'cudnn'.
    """
    backend = jax.default_backend()
    if backend not in ("tpu", "cpu"):
        raise ValueError(f"attention_backend='splash' runs on TPU (or interpreted on CPU), not "
                         f"on {backend!r}: use 'cudnn' or 'xla'")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    bq, bk = _splash_block(lq), _splash_block(lk)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    # One MQA kernel per key/value head over its group of query heads (GQA without repeating K/V).
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([sm.FullMask((lq, lk))] * groups), block_sizes=sizes,
        interpret=backend != "tpu")
    q_seg = jnp.ones((b, lq), jnp.int32) if mask.segment_ids is None else mask.segment_ids
    k_seg = jnp.ones((b, lk), jnp.int32) if mask.segment_ids is None else mask.segment_ids
    if mask.key_mask is not None:
        k_seg = jnp.where(mask.key_mask, k_seg, 0)
    qt = (q / math.sqrt(d)).reshape(b, lq, kvh, groups, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # [B, KVH, Lk, D]

    def one_row(qr, kr, vr, qs, ks):
        segments = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(qr, kr, vr)

    out = jax.vmap(one_row)(qt, kt, vt, q_seg, k_seg)                 # [B, KVH, G, Lq, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(q.dtype)


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}


class Attention(nn.Module):
    """Self-attention of one block over a window of positions.

    Inputs: x [B, Lw, d] for the window; positions [B, Lw] RoPE positions; mask a MaskInfo;
    `cache` = (k, v) each [B, L, KVH, hd] of the whole sequence, or None (then the window is
    the whole sequence); `cache_index` the (possibly traced) start of the window in the cache.
    Returns (out [B, Lw, d], (k, v) of the window [B, Lw, KVH, hd]).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        proj = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.init_std)

        def project(name: str, heads: int, heads_axis: str) -> jax.Array:  # [B, Lw, heads, hd]
            return Projection((heads, c.head_dim), ("embed",), (heads_axis, "head_dim"),
                              name=f"{name}_proj", **proj)(x)

        q, k, v = (project("q", c.n_heads, "heads"), project("k", c.n_kv_heads, "kv_heads"),
                   project("v", c.n_kv_heads, "kv_heads"))
        if c.qk_norm:  # RMSNorm over head_dim of every query and key head, before RoPE
            norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        q, k = (rotary_embedding(x, positions, c.rope_theta, c.rotary_dim) for x in (q, k))
        q = nn.with_logical_constraint(q, _HEAD_ACTIVATION_AXES)
        window_kv = (k, v)
        if cache is not None:  # the window's keys/values written over the cached sequence
            start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            k, v = (jax.lax.dynamic_update_slice_in_dim(cached.astype(new.dtype), new, start, 1)
                    for cached, new in zip(cache, (k, v), strict=True))
        out = nn.with_logical_constraint(BACKENDS[c.attention_backend](q, k, v, mask),
                                         _HEAD_ACTIVATION_AXES)
        out = Projection((c.d_model,), ("heads", "head_dim"), ("embed",), name="attn_out",
                         **proj)(out)
        return out, window_kv
