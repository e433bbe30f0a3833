"""A deliberately plain, mask-free implementation of the FLM decoder, written independently of `flm.model`.

It is the oracle of the model tests (same state-dict names, so the same weights load into both) and the
baseline of `benchmarks/overhead.py`. It knows nothing of growth; keep it that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flm.config import ModelConfig


def rotary_tables(cfg: ModelConfig, T: int, dtype, device):
    """cos/sin (T, hd) in GPT-NeoX rotate-half layout, and the xPos factor ζ^((n - seq_len//2)/scale_base)."""
    hd = cfg.head_dim
    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    ang = pos[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=1)
    scale = None
    if cfg.pos == "xpos":
        zeta = torch.tensor([(2 * i + 0.4 * hd) / (1.4 * hd) for i in range(hd // 2)], dtype=torch.float64)
        s = zeta[None, :] ** ((pos[:, None] - cfg.seq_len // 2) / cfg.xpos_scale_base)
        scale = torch.cat([s, s], dim=1).to(dtype=dtype, device=device)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device), scale


class RefBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = nn.Module()
        for name in "qkv":
            setattr(self.attn, name, nn.Linear(cfg.d_model, cfg.attn_dim, bias=cfg.bias))
        self.attn.proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=cfg.bias)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.mlp.proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)

    def forward(self, x, cos, sin, scale):
        B, T, _ = x.shape
        h, hd = self.cfg.n_head, self.cfg.head_dim
        x1 = self.ln_1(x)
        q, k, v = (t.view(B, T, h, hd).transpose(1, 2) for t in (self.attn.q(x1), self.attn.k(x1), self.attn.v(x1)))

        def rot(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rot(q), rot(k)
        if scale is not None:
            q, k = q * scale, k / scale
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, h * hd)
        x = x + self.attn.proj(y)
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln_2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx):
        dev = idx.device.type
        key = (idx.shape[1], torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        if getattr(self, "_tables_key", None) != key:  # computed once per length, as a fast baseline should
            dtype = key[1] or self.wte.weight.dtype
            self._tables, self._tables_key = rotary_tables(self.cfg, idx.shape[1], dtype, idx.device), key
        cos, sin, scale = self._tables
        x = self.wte(idx) * self.cfg.input_mult
        for block in self.blocks:
            x = block(x, cos, sin, scale)
        head = self.wte.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return F.linear(self.ln_f(x), head) * (self.cfg.output_mult * self.cfg.base_width / self.cfg.d_model)
