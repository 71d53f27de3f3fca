"""The LLaDA mask predictor: embed -> scanned bidirectional blocks -> RMSNorm -> LM head.

`Transformer.apply(variables, tokens)` maps (noisy) token ids, or embeddings (LLaDA-V), to
logits. It knows nothing about time, masking or sampling (that is `llada_jax.diffusion`).

Windows and KV caches (fast sampling): pass `kv_cache` (keys/values of the whole sequence for
every layer) and `cache_index` (where the window starts), and only the window's tokens are
computed; they attend over every cached position. With `return_kv=True` the call also returns the
window's fresh keys/values, stacked over layers, so callers build or refresh caches:

    logits, kv = model.apply(v, tokens, return_kv=True)            # full pass, kv of everything
    logits_w, kv_w = model.apply(v, window_tokens, kv_cache=kv,
                                 cache_index=start, return_kv=True)  # window only
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llada_jax.config import ModelConfig
from llada_jax.model.attention import Attention, MaskInfo
from llada_jax.model.layers import HIDDEN_AXES, Projection, RMSNorm, scan_layers, swiglu
from llada_jax.model.moe import MoE


class KVCache(NamedTuple):
    """Keys and values of every layer: each [n_layers, batch, length, n_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


@jax.custom_vjp
def embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens]: rows [..., d] of the embedding table [V, d], with a sharded gradient.

    Under FSDP the table is split along d ("embed"). The rows are looked up, and their gradient
    scatter-added, in that layout: every device takes the d-slice of all the batch's rows
    (tokens replicated, a few MiB), so no device ever holds a whole [V, d] table or gradient
    (1.9 GiB in float32 for LLaDA-8B), which is what the partitioner builds for a plain
    `jnp.take` and its transpose. Without logical axis rules the constraints do nothing.
    """
    ids = nn.with_logical_constraint(tokens, (None,) * tokens.ndim)
    rows = jnp.take(table, ids, axis=0)
    return nn.with_logical_constraint(rows, (None,) * tokens.ndim + ("embed",))


def _embedding_fwd(table, tokens):
    return embedding_lookup(table, tokens), (table, tokens)


def _embedding_bwd(residuals, rows_grad):
    table, tokens = residuals
    ids = nn.with_logical_constraint(tokens, (None,) * tokens.ndim)
    rows_grad = nn.with_logical_constraint(rows_grad.astype(table.dtype),
                                           (None,) * tokens.ndim + ("embed",))
    table_grad = nn.with_logical_constraint(jnp.zeros(table.shape, table.dtype),
                                            ("vocab", "embed"))
    table_grad = table_grad.at[ids].add(rows_grad)
    return nn.with_logical_constraint(table_grad, ("vocab", "embed")), None


embedding_lookup.defvjp(_embedding_fwd, _embedding_bwd)


class Block(nn.Module):
    """One pre-norm block: h + attention(norm(h)), then h + FFN(norm(h)).

    The FFN is the dense SwiGLU of `mlp_hidden_size`, or with `moe` the mixture of experts of
    model/moe.py. Returns (h, (KVCache of the window or None, RouterStats or None)).
    """

    config: ModelConfig
    moe: bool = False

    @nn.compact
    def __call__(self, h, positions, mask, cache, cache_index, return_kv):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

        a = RMSNorm(name="attn_norm", **norm)(h)
        a, (k, v) = Attention(c, name="attn")(a, positions, mask, cache, cache_index)
        h = h + checkpoint_name(a, "attention_out")

        f = RMSNorm(name="ff_norm", **norm)(h)
        stats = None
        if self.moe:
            f, stats = MoE(c, name="moe")(f)
        else:
            f = swiglu(f, c.mlp_hidden_size, dtype=dtype, param_dtype=param_dtype,
                       init_std=c.init_std, d_model=c.d_model)
        h = nn.with_logical_constraint(h + f, HIDDEN_AXES)
        return h, ((KVCache(k, v) if return_kv else None), stats)


def scanned_blocks(config: ModelConfig, length: int, moe: bool) -> nn.Module:
    """`length` Blocks stacked by `nn.scan`, remat'd by `config.remat_policy`."""
    in_axes = (nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast)
    return scan_layers(Block, length, config.remat_policy, in_axes,
                       static_argnums=(6,))(config, moe=moe)


class Transformer(nn.Module):
    """LLaDA mask predictor (REFERENCE.md section 1), layers scanned with `nn.scan`."""

    config: ModelConfig

    def setup(self):
        c = self.config
        dtypes = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.wte = self.param(
            "wte", nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                ("vocab", "embed")),
            (c.vocab_size, c.d_model), dtypes["param_dtype"])
        self.ln_f = RMSNorm(eps=c.rms_norm_eps, **dtypes)
        if not c.tie_embeddings:
            self.lm_head = Projection((c.vocab_size,), ("embed",), ("vocab",), init_std=c.init_std,
                                      **dtypes)
        # A mixture-of-experts model's first_k_dense dense layers are a second scanned stack of
        # the same Block (dense FFN), `dense_blocks`, in front of the MoE stack `blocks`.
        if c.num_dense_layers and c.is_moe:
            self.dense_blocks = scanned_blocks(c, c.num_dense_layers, False)
        self.blocks = scanned_blocks(c, c.num_moe_layers if c.is_moe else c.n_layers, c.is_moe)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [B, L, d] in the compute dtype (no scaling, as in LLaDA)."""
        return embedding_lookup(self.wte, tokens).astype(jnp.dtype(self.config.dtype))

    def __call__(self, tokens: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 kv_cache: KVCache | None = None,
                 cache_index: jax.Array | int | None = None,
                 return_kv: bool = False,
                 return_hidden: bool = False):
        """Logits [B, Lw, vocab] of a window (the whole sequence without a cache).

        tokens [B, Lw] int, or inputs_embeds [B, Lw, d]; positions [B, Lw] (default: window
        offsets from `cache_index`, i.e. 0..L-1 without a cache); attention_mask [B, Lk] bool key
        mask over the whole sequence (Lk = cache length with a cache, else Lw); segment_ids
        [B, Lw] keep packed documents apart (no cache). Returns logits, or (logits, KVCache of
        the window) with `return_kv`. With `return_hidden` the final normed hidden states
        [B, Lw, d] (the LM head's input) replace the logits, so callers that need logits at only
        some positions, or in chunks, apply `logits_from_hidden` themselves.
        """
        c = self.config
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Transformer: pass exactly one of tokens or inputs_embeds")
        h = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(c.dtype)
        if h.ndim != 3 or h.shape[-1] != c.d_model:
            raise ValueError(f"Transformer: inputs must be [batch, length, d_model={c.d_model}], "
                             f"found {h.shape}")
        batch, length = h.shape[:2]
        key_length = length if kv_cache is None else kv_cache.k.shape[2]
        if kv_cache is not None and segment_ids is not None:
            raise ValueError("Transformer: segment_ids are not supported together with kv_cache")
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                                         (batch, length))
        if attention_mask is not None and attention_mask.shape != (batch, key_length):
            raise ValueError(f"Transformer: attention_mask must be [batch={batch}, "
                             f"keys={key_length}], found {attention_mask.shape}")
        mask = MaskInfo(attention_mask, segment_ids)
        h = nn.with_logical_constraint(h, HIDDEN_AXES)
        h, window_kv = self._run_blocks(h, positions, mask, kv_cache, cache_index, return_kv)
        out = self.ln_f(h) if return_hidden else self.logits_from_hidden(self.ln_f(h))
        return (out, window_kv) if return_kv else out

    def _run_blocks(self, h, positions, mask, kv_cache, cache_index, return_kv):
        """The scanned stacks; MoE router statistics are sown into the `moe_stats` collection
        (`RouterStats` stacked over the MoE layers) when the caller makes it mutable."""
        first = self.config.num_dense_layers if self.config.is_moe else 0
        stacks = [(self.dense_blocks, slice(0, first))] if first else []
        stacks.append((self.blocks, slice(first, None)))
        kv_parts = []
        for blocks, layers in stacks:  # each stack reads and returns its own layers' cache
            cache = None if kv_cache is None else KVCache(kv_cache.k[layers], kv_cache.v[layers])
            h, (kv, stats) = blocks(h, positions, mask, cache, cache_index, return_kv)
            kv_parts.append(kv)
        if stats is not None and not self.is_initializing():
            self.sow("moe_stats", "router", stats, init_fn=lambda: None,
                     reduce_fn=lambda _, new: new)
        if not return_kv:
            return h, None
        return h, jax.tree.map(lambda *parts: jnp.concatenate(parts), *kv_parts)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The LM head: final normed hidden states [..., d] -> logits [..., vocab].

        With `tie_embeddings` the head is the embedding table: logits = hidden @ wte^T.
        Call it as `model.apply(variables, hidden, method=Transformer.logits_from_hidden)`.
        """
        c = self.config
        if c.tie_embeddings:
            logits = jnp.einsum("...d,vd->...v", hidden.astype(c.dtype), self.wte.astype(c.dtype))
        else:
            logits = self.lm_head(hidden)
        if logits.ndim == 3:
            logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                         "activation_vocab"))
        return logits
