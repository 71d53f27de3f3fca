"""Independent PyTorch references of the LLaDA-MoE, LLaDA2-style and iLLaDA mask predictors.

Written from the published facts (issue 16), not from llada_jax: plain loops over experts (no
sorting, no grouped matmul), PyTorch `[out, in]` weights, and module names that give exactly the
checkpoint keys of each released layout:
  * `llada_moe`: model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
    self_attn.{q,k}_norm, {input,post_attention}_layernorm, mlp.gate [E, d],
    mlp.experts.{j}.{gate,up,down}_proj, model.norm, lm_head;
  * `llada2`: model.word_embeddings, model.layers.{i}.attention.{query_key_value (rows q|k|v),
    dense, query_layernorm, key_layernorm}, mlp.gate.{weight, expert_bias},
    mlp.experts.{j}.*, mlp.shared_experts.*, the first_k_dense layers' mlp.{gate,up,down}_proj,
    model.norm, lm_head;
  * `illada`: the LLaDA (OLMo) layout model.transformer.{wte, blocks.{i}.*, ln_f} with the
    output tied to wte (no ff_out head).
Routers: softmax in float32, top-k, no renormalisation (LLaDA-MoE); sigmoid in float32 plus
expert_bias for the choice only, group-limited (groups scored by the sum of their top-2 biased
scores), weights = unbiased scores renormalised x routed_scaling (LLaDA2). Top-k takes a stable
descending sort, so ties go to the lower expert index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoERefConfig:
    layout: str                 # llada_moe | llada2 | illada
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden_size: int = 0    # dense FFN (first_k_dense layers, iLLaDA)
    num_experts: int = 0
    experts_per_token: int = 0
    expert_mlp_hidden_size: int = 0
    num_shared_experts: int = 0
    first_k_dense: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    qk_norm: bool = False
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) \
            * self.weight


def partial_rope(x, theta, rotary_dim):
    """x [B, H, T, hd]: rotate-half RoPE on the first rotary_dim dims (0: all), float32."""
    t, hd = x.shape[-2], x.shape[-1]
    r = rotary_dim or hd
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    xr, rest = x.float()[..., :r], x.float()[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = xr * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()
    return torch.cat([rotated, rest], dim=-1).to(x.dtype)


def stable_topk(x, k):
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SigmoidGate(nn.Module):
    """LLaDA2's router: `weight` [E, d] and the `expert_bias` buffer [E]."""

    def __init__(self, c: MoERefConfig):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.zeros(c.num_experts, c.d_model))
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, x):
        c = self.c
        logits = x.float() @ self.weight.float().t()
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias
        t, e = biased.shape
        top2 = stable_topk(biased.view(t, c.n_group, e // c.n_group), 2)[0].sum(-1)
        groups = stable_topk(top2, c.topk_group)[1]
        group_mask = torch.zeros(t, c.n_group).scatter_(1, groups, 1.0).bool()
        expert_mask = group_mask.repeat_interleave(e // c.n_group, dim=1)
        _, chosen = stable_topk(biased.masked_fill(~expert_mask, float("-inf")),
                                c.experts_per_token)
        weights = scores.gather(1, chosen)
        if c.experts_per_token > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return chosen, weights * c.routed_scaling, logits


class SparseMoE(nn.Module):
    def __init__(self, c: MoERefConfig):
        super().__init__()
        self.c = c
        if c.layout == "llada2":
            self.gate = SigmoidGate(c)
        else:
            self.gate = nn.Linear(c.d_model, c.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [SwiGLU(c.d_model, c.expert_mlp_hidden_size) for _ in range(c.num_experts)])
        if c.num_shared_experts:
            self.shared_experts = SwiGLU(c.d_model, c.num_shared_experts
                                         * c.expert_mlp_hidden_size)

    def route(self, x):
        """x [T, d] -> (chosen [T, k], weights [T, k], logits [T, E])."""
        if self.c.layout == "llada2":
            return self.gate(x)
        logits = x.float() @ self.gate.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        weights, chosen = stable_topk(probs, self.c.experts_per_token)
        return chosen, weights, logits

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(b * t, d)
        chosen, weights, _ = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        out = out.view(b, t, d)
        if self.c.num_shared_experts:
            out = out + self.shared_experts(h)
        return out


def attention(c, x, q, k, v, q_norm, k_norm, key_mask):
    b, t, _ = x.shape
    q = q.view(b, t, c.n_heads, c.head_dim)
    k = k.view(b, t, c.n_kv_heads, c.head_dim)
    v = v.view(b, t, c.n_kv_heads, c.head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    q, k = partial_rope(q, c.rope_theta, c.rotary_dim), partial_rope(k, c.rope_theta, c.rotary_dim)
    rep = c.n_heads // c.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)   # bidirectional: no causal mask
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim)


class SelfAttention(nn.Module):   # LLaDA-MoE: self_attn.{q,k,v,o}_proj, {q,k}_norm
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, hd = c.d_model, c.head_dim
        self.q_proj = nn.Linear(d, c.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.n_heads * hd, d, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps)

    def forward(self, x, key_mask):
        c = self.c
        norms = (self.q_norm, self.k_norm) if c.qk_norm else (None, None)
        return self.o_proj(attention(c, x, self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                     *norms, key_mask))


class FusedAttention(nn.Module):   # LLaDA2: attention.{query_key_value, dense, *_layernorm}
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, hd = c.d_model, c.head_dim
        self.query_key_value = nn.Linear(d, (c.n_heads + 2 * c.n_kv_heads) * hd, bias=False)
        self.dense = nn.Linear(c.n_heads * hd, d, bias=False)
        self.query_layernorm = RMSNorm(hd, c.rms_norm_eps)
        self.key_layernorm = RMSNorm(hd, c.rms_norm_eps)

    def forward(self, x, key_mask):
        c = self.c
        q, k, v = self.query_key_value(x).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        return self.dense(attention(c, x, q, k, v, self.query_layernorm, self.key_layernorm,
                                    key_mask))


class DecoderLayer(nn.Module):
    def __init__(self, c, index):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.rms_norm_eps)
        if c.layout == "llada2":
            self.attention = FusedAttention(c)
        else:
            self.self_attn = SelfAttention(c)
        self.mlp = (SwiGLU(c.d_model, c.mlp_hidden_size) if index < c.first_k_dense
                    else SparseMoE(c))
        self.layout = c.layout

    def forward(self, x, key_mask):
        attn = self.attention if self.layout == "llada2" else self.self_attn
        x = x + attn(self.input_layernorm(x), key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class OlmoBlock(nn.Module):   # iLLaDA: the LLaDA layout
    def __init__(self, c):
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

    def forward(self, x, key_mask):
        a = self.attn_norm(x)
        x = x + self.attn_out(attention(self.c, a, self.q_proj(a), self.k_proj(a),
                                        self.v_proj(a), None, None, key_mask))
        f = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(f)) * self.up_proj(f))


class RefMoEModel(nn.Module):
    """forward(tokens [B, T], key_mask [B, T] bool or None) -> logits [B, T, V] (float32)."""

    def __init__(self, c: MoERefConfig):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        if c.layout == "illada":
            self.model.transformer = nn.Module()
            tr = self.model.transformer
            tr.wte = nn.Embedding(c.vocab_size, c.d_model)
            tr.blocks = nn.ModuleList([OlmoBlock(c) for _ in range(c.n_layers)])
            tr.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
            return
        embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.layout == "llada2":
            self.model.word_embeddings = embed
        else:
            self.model.embed_tokens = embed
        self.model.layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.n_layers)])
        self.model.norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, tokens, key_mask=None):
        c = self.config
        if c.layout == "illada":
            tr = self.model.transformer
            h = tr.wte(tokens)
            for block in tr.blocks:
                h = block(h, key_mask)
            return tr.ln_f(h) @ tr.wte.weight.t()        # tied output
        embed = self.model.word_embeddings if c.layout == "llada2" else self.model.embed_tokens
        h = embed(tokens)
        for layer in self.model.layers:
            h = layer(h, key_mask)
        return self.lm_head(self.model.norm(h))


def router_losses(logits, chosen, num_experts, softmax=True):
    """The auxiliary losses as the official (HF) code computes them, from one layer's router
    logits [T, E] and choices [T, k]: load balancing E * sum_e (tokens routed to e / T) * mean
    router probability of e (the sigmoid router's scores normalised per token), and z-loss
    mean(logsumexp(logits)^2)."""
    logits = logits.float()
    if softmax:
        probs = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    per_choice = F.one_hot(chosen, num_experts).float().mean(0)          # [k, E]
    balance = num_experts * (per_choice * probs.mean(0)[None]).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return balance, z


def random_reference(c: MoERefConfig, seed: int = 0, bias_scale: float = 0.0) -> RefMoEModel:
    """A reference with random weights (norm weights around 1, expert_bias ~ bias_scale)."""
    torch.manual_seed(seed)
    model = RefMoEModel(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(bias_scale * torch.randn_like(b))
    return model.eval()
