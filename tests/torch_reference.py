"""An independent PyTorch LLaDA mask predictor written from REFERENCE.md section 1.

Deliberately plain (no caching, no fusion) and keyed exactly like the released checkpoint
(`model.transformer.blocks.{i}.q_proj.weight`, ... with PyTorch `[out, in]` weights), so tests can
build a random checkpoint in the released layout, load exported ones with strict key/shape checks,
and compare logits with the JAX model. It shares no code with llada_jax.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RefConfig:
    def __init__(self, vocab_size, d_model, n_layers, n_heads, n_kv_heads, mlp_hidden_size,
                 rope_theta=500000.0, rms_norm_eps=1e-5):
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.n_kv_heads, self.mlp_hidden_size = n_heads, n_kv_heads, mlp_hidden_size
        self.head_dim = d_model // n_heads
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


def rope(x, theta):
    """x: [B, H, T, hd]; rotate-half layout, positions 0..T-1, float32."""
    t, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x.float()[..., : hd // 2], x.float()[..., hd // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        d, hd = c.d_model, c.head_dim
        self.c = c
        self.attn_norm = RMSNorm(d, c.rms_norm_eps)
        self.ff_norm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(c.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)

    def forward(self, x, key_mask=None):
        c = self.c
        b, t, _ = x.shape
        a = self.attn_norm(x)
        q = self.q_proj(a).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, c.rope_theta), rope(k, c.rope_theta)
        rep = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = scores.softmax(-1) @ v
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim))
        f = self.ff_norm(x)
        return x + self.ff_out(torch.nn.functional.silu(self.ff_proj(f)) * self.up_proj(f))


class Transformer(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_out = nn.Linear(c.d_model, c.vocab_size, bias=False)  # LM head, untied


class RefLLaDA(nn.Module):
    """Keys: model.transformer.* exactly as the released checkpoint."""

    def __init__(self, c: RefConfig):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.transformer = Transformer(c)

    def forward(self, tokens, key_mask=None):
        tr = self.model.transformer
        h = tr.wte(tokens)
        for block in tr.blocks:
            h = block(h, key_mask)
        return tr.ff_out(tr.ln_f(h))


def random_reference(c: RefConfig, seed: int = 0) -> RefLLaDA:
    """A reference model with random weights (norm weights too, so they are tested)."""
    torch.manual_seed(seed)
    model = RefLLaDA(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_f" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()
