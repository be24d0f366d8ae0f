"""The plain reference decoder, written straight from docs/attnres.md.

No KV cache, no packing, no fast paths: a batched full-recompute forward over [B, T] token ids.
It is the oracle the serving path is tested against, and, being an ordinary differentiable
nn.Module whose parameter names are the checkpoint names, it is also what the trainer trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (as Hugging Face does)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = xf.to(dtype)
    return out if weight is None else weight.to(dtype) * out


def naive_mix(query: torch.Tensor, norm_weight: torch.Tensor, sources: torch.Tensor, eps: float,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """mix(q, sources): softmax over w·RMSNorm(v_i), then sum alpha_i v_i. Scores in fp32.

    query, norm_weight: [d]; sources: [..., n, d]. Returns (x [..., d], alpha [..., n]).
    """
    keys = rms_norm(sources.float(), norm_weight.float(), eps)  # [..., n, d]
    scores = keys @ query.float()  # [..., n]
    alpha = torch.softmax(scores, dim=-1)
    x = (alpha.unsqueeze(-1) * sources.float()).sum(-2)
    return x.to(sources.dtype), alpha


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., head_dim] for the half-rotation (Hugging Face Llama) convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, H, hd]; cos/sin: [..., T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos.unsqueeze(-2) + rotated.float() * sin.unsqueeze(-2)).to(x.dtype)


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_attn_res:
            # Zero queries: uniform depth weights at initialisation (docs/attnres.md §3).
            self.self_attention_res_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.self_attention_res_proj = nn.Linear(cfg.hidden_size, 1, bias=False)
            self.mlp_res_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_res_proj = nn.Linear(cfg.hidden_size, 1, bias=False)
            nn.init.zeros_(self.self_attention_res_proj.weight)
            nn.init.zeros_(self.mlp_res_proj.weight)


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_attn_res:
            self.output_attn_res_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.output_attn_res_proj = nn.Linear(cfg.hidden_size, 1, bias=False)
            nn.init.zeros_(self.output_attn_res_proj.weight)


class ReferenceLlama(nn.Module):
    """Full-recompute Llama / Block AttnRes / Full AttnRes decoder. Parameter names = checkpoint names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, depth_weights: list | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. If `depth_weights` is a list, each mixing site appends
        its softmax weights [B, T, n_sources] in forward order (layer 0 attn, layer 0 mlp, ..., output)."""
        cfg = self.cfg
        body = self.model
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        h = body.embed_tokens(input_ids)  # [B, T, d]
        if cfg.attn_res_mode == "none":
            for layer in body.layers:
                h = h + layer.self_attn(layer.input_layernorm(h), cos, sin)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            final = h
        elif cfg.attn_res_mode == "full":
            final = self._full(h, cos, sin, depth_weights)
        else:
            final = self._block(h, cos, sin, depth_weights)
        return F.linear(body.norm(final), self.head_weight())

    def _mix(self, proj: nn.Linear, norm: _RMSNorm, sources: list[torch.Tensor], record: list | None,
             ) -> torch.Tensor:
        x, alpha = naive_mix(proj.weight[0], norm.weight, torch.stack(sources, dim=-2), self.cfg.rms_norm_eps)
        if record is not None:
            record.append(alpha)
        return x

    def _full(self, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rec: list | None) -> torch.Tensor:
        sources = [emb]
        for layer in self.model.layers:
            x = self._mix(layer.self_attention_res_proj, layer.self_attention_res_norm, sources, rec)
            sources.append(layer.self_attn(layer.input_layernorm(x), cos, sin))
            x = self._mix(layer.mlp_res_proj, layer.mlp_res_norm, sources, rec)
            sources.append(layer.mlp(layer.post_attention_layernorm(x)))
        body = self.model
        return self._mix(body.output_attn_res_proj, body.output_attn_res_norm, sources, rec)

    def _block(self, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rec: list | None) -> torch.Tensor:
        bs = self.cfg.attn_res_block_size
        blocks: list[torch.Tensor] = []
        partial: torch.Tensor | None = emb
        for i, layer in enumerate(self.model.layers):
            if not blocks:
                x = partial
                if rec is not None:
                    rec.append(torch.ones(*emb.shape[:-1], 1, device=emb.device))
            else:
                srcs = blocks + ([partial] if partial is not None else [])
                x = self._mix(layer.self_attention_res_proj, layer.self_attention_res_norm, srcs, rec)
            if i % bs == 0:
                blocks.append(partial)
                partial = None
            a = layer.self_attn(layer.input_layernorm(x), cos, sin)
            partial = a if partial is None else partial + a
            x = self._mix(layer.mlp_res_proj, layer.mlp_res_norm, blocks + [partial], rec)
            partial = partial + layer.mlp(layer.post_attention_layernorm(x))
        body = self.model
        return self._mix(body.output_attn_res_proj, body.output_attn_res_norm, blocks + [partial], rec)
