"""SigLIP / SigLIP2 vision encoder (the LLaDA-V vision tower), in Flax Linen.

What it is: the fixed-resolution SigLIP ViT (so400m/14 at 384 px for LLaDA-V): patch embedding,
learned position embedding, pre-norm encoder blocks (LayerNorm, multi-head attention with biases,
tanh-GELU MLP), layers stacked with `nn.scan`, and an optional final LayerNorm. It maps pixels
`[batch, H, W, 3]` (already normalised to [-1, 1], see `llada_jax/data/images.py`) to patch
features `[batch, (H/patch)*(W/patch), width]`.

What it is not: it has no attention-pooling head (LLaDA-V replaces it by an identity), no
position-embedding interpolation (the NaFlex variant of SigLIP2) and no text tower. Projecting the
features into the language model and splicing them into the text is `multimodal.py`.

Which layer's output: `VisionConfig.feature_layer` follows the indexing of Hugging Face's
`hidden_states` tuple (index 0 is the embedding output, index k the output of block k), so
`-1` is the last block and `-2` the penultimate one. Only the blocks that are needed are built:
LLaDA-V deletes the last of the 27 blocks and reads the output of block 26 without the
post-layernorm (`feature_layer=-2, use_post_layernorm=False`, the default here), while
`feature_layer=-1, use_post_layernorm=True` is what transformers' `last_hidden_state` is.

The fixed-resolution SigLIP2 checkpoints (e.g. `google/siglip2-so400m-patch14-384`) have the same
architecture and weight names as SigLIP (their `config.json` says `model_type: siglip`), so
transformers' `SiglipVisionModel` is the reference this module is tested against;
`Siglip2VisionModel` is the NaFlex variant (linear patch embedding on flattened patches, resized
position embeddings) and is not what LLaDA-V uses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The schema lives with the other config sections; imported from here by the tower's users.
from llada_jax.config import VisionConfig
from llada_jax.config import validate_vision_tower as validate_vision
from llada_jax.model.layers import HIDDEN_AXES, Projection, scan_layers

# Every parameter is created with its logical axis names.
_param_init = nn.with_logical_partitioning


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: mean((x - mean)^2), as torch computes it; E[x^2] - E[x]^2 loses
    # digits on the large-mean activations of deep ViTs.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        scale_init=_param_init(nn.initializers.ones, ("norm",)),
        bias_init=_param_init(nn.initializers.zeros, ("norm",)), name=name)


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> width, plus the learned position embedding.

    The stride-p convolution of the reference is written as a reshape to patches and one einsum:
    the same arithmetic, and it lowers to a plain matmul on every backend. Like the reference's
    "valid" convolution it ignores the pixels past the last whole patch: 384 = 27 * 14 + 6, so
    the so400m/14 tower never sees the last 6 rows and columns.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p, g = cfg.patch_size, cfg.patches_per_side
        kernel = self.param(
            "kernel", _param_init(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                  ("patch_h", "patch_w", "channels", "embed")),
            (p, p, cfg.num_channels, cfg.width), cfg.param_dtype)
        bias = self.param("bias", _param_init(nn.initializers.zeros, ("embed",)),
                          (cfg.width,), cfg.param_dtype)
        positions = self.param(
            "position_embedding", _param_init(nn.initializers.normal(stddev=cfg.width ** -0.5),
                                              ("vision_positions", "embed")),
            (cfg.num_patches, cfg.width), cfg.param_dtype)
        batch = pixels.shape[0]
        x = pixels[:, :g * p, :g * p].astype(cfg.dtype).reshape(batch, g, p, g, p,
                                                                 cfg.num_channels)
        # Row-major patch order (row of patches, then column), as the reference's
        # conv(...).flatten(2).transpose(1, 2).
        x = jnp.einsum("bhpwqc,pqce->bhwe", x, kernel.astype(cfg.dtype))
        x = x.reshape(batch, g * g, cfg.width) + bias.astype(cfg.dtype)
        return x + positions.astype(cfg.dtype)[None]


def _linear(cfg: VisionConfig, features: tuple[int, ...], in_axes: tuple[str, ...],
            out_axes: tuple[str, ...], name: str) -> Projection:
    """An affine map from the last `len(in_axes)` dims to `features` (a `Projection` with a
    bias), initialised like the reference (fan-in truncated normal)."""
    n_in = len(in_axes)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + len(features))))
    return Projection(features, in_axes, out_axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=init, use_bias=True, name=name)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases on q, k, v and the output."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        heads, head_dim = cfg.n_heads, cfg.head_dim

        def proj(name: str) -> Projection:
            return _linear(cfg, (heads, head_dim), ("embed",), ("heads", "head_dim"), name)

        q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)  # [b, n, heads, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
        # Softmax in float32 whatever the compute dtype (the reference upcasts too).
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = checkpoint_name(out, "attention_out")
        return _linear(cfg, (cfg.width,), ("heads", "head_dim"), ("embed",), "out_proj")(out)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, `gelu_pytorch_tanh`) -> fc2, with biases."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _linear(cfg, (cfg.mlp_dim,), ("embed",), ("mlp",), "fc1")(x)
        h = nn.gelu(h, approximate=True)
        return _linear(cfg, (cfg.width,), ("mlp",), ("embed",), "fc2")(h)


class EncoderBlock(nn.Module):
    """One pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    Scan-shaped: (x, _) -> (x, None).
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.config
        x = x + SelfAttention(cfg, name="self_attn")(_layer_norm(cfg, "layer_norm1")(x))
        x = x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "layer_norm2")(x))
        return nn.with_logical_constraint(x, HIDDEN_AXES), None


class VisionEncoder(nn.Module):
    """SigLIP vision encoder: pixels [b, H, W, C] in [-1, 1] -> features [b, patches, width].

    Params: `embeddings` (patch kernel/bias, position embedding), `layers` (the scanned blocks,
    leading axis `layers` of length `config.num_layers_used`) and, only when
    `config.use_post_layernorm`, `post_layernorm`.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        validate_vision(cfg)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"VisionEncoder: expected pixels of shape [batch, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}] (channels last), found "
                             f"{tuple(pixels.shape)}")
        x = PatchEmbedding(cfg, name="embeddings")(pixels)
        x = nn.with_logical_constraint(x, HIDDEN_AXES)

        stack = scan_layers(EncoderBlock, cfg.num_layers_used, cfg.remat_policy, nn.broadcast)
        x, _ = stack(cfg, name="layers")(x, None)

        if cfg.use_post_layernorm:
            x = _layer_norm(cfg, "post_layernorm")(x)
        return x
