"""The FLM-101B decoder: GPT-3 style, pre-LayerNorm, xPos or RoPE rotary positions, μP multipliers,
tied embeddings, SDPA attention, a KV cache, and the MSG growth masks.

Growth masks are buffers that exist only while a growth is being ramped in (`flm.growth` installs them, `MaskRamp`
moves them from 0 to 1 and then removes them). Their values are 1 on old coordinates and m < 1 on new ones, so the
new coordinates are exactly those below 1. Without masks the forward pass is a plain GPT: no extra kernels.

- hidden_mask (d_model,): multiplies every write into the residual stream and every LayerNorm output; LayerNorm
  statistics are taken over the masked coordinates only, so at m = 0 old coordinates see the old function.
- mlp.ffn_mask (d_ffn,): multiplies the FFN pre-activation (GELU(0) = 0).
- attn.head_mask (n_head,): multiplies the new heads' q, k and v.
- gate (): a new block's output h <- h + gate · (block(h) - h).

Masks multiply the outputs of the projections (not their weights), and attention reads its head count from the
projection's output width: so the same code runs on a tensor-parallel shard (flm/parallelize.py), whose q/k/v and
FFN-in layers produce only its own heads and units and whose head and FFN masks are sliced to match.
q, k and v are three projections (checkpoints of the older fused `attn.qkv` are split on load): each one shards by
rows over tensor-parallel ranks as it is, which one fused [q | k | v] matrix does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flm import mup
from flm.config import ModelConfig

MASK_NAMES = ("hidden_mask", "ffn_mask", "head_mask", "gate")


class LayerNorm(nn.Module):
    """LayerNorm with bias whose statistics can be restricted to masked coordinates (MSG width growth)."""

    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        weights = mask / mask.sum()
        with torch.autocast(x.device.type, enabled=False):  # statistics in the residual stream's precision
            xc = x - (x @ weights).unsqueeze(-1)
            rstd = torch.rsqrt((xc * xc) @ weights + self.eps).unsqueeze(-1)
        w = self.weight * mask  # the output mask, folded into the affine parameters
        return xc * rstd * w if self.bias is None else torch.addcmul(self.bias * mask, xc * rstd, w)


def masked_linear(x: torch.Tensor, layer: nn.Module, out_mask: torch.Tensor | None) -> torch.Tensor:
    """layer(x) * out_mask. The mask multiplies the output rather than being folded into the weight: a sharded
    weight (a DTensor under tensor parallelism) and a plain mask do not mix, a local output and a local mask do."""
    y = layer(x)
    return y if out_mask is None else y * out_mask.to(y.dtype)


class Rotary(nn.Module):
    """Rotary positions (GPT-NeoX "rotate half" layout), optionally with xPos decay.

    xPos scales q at absolute position n by ζ^((n - c)/scale_base) and k by its inverse, so q·k decays with
    distance as ζ^((n - m)/scale_base); ζ_i = (2i/head_dim + 0.4) / 1.4 per rotated pair. We centre the exponent
    at c = seq_len // 2 (our choice) to keep both factors near 1 over the training window, in bf16 too.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.xpos = cfg.pos == "xpos"
        self.scale_base = cfg.xpos_scale_base
        self.center = cfg.seq_len // 2
        self._last: tuple | None = None  # (key, tables): training asks for the same positions every step

    def tables(self, start: int, length: int, dtype: torch.dtype, device: torch.device,
               pad: torch.Tensor | None = None):
        """cos, sin and (xPos) scale for positions start..start+length, each (length, head_dim); computed in
        float64 whatever the model dtype, so every model of the same config sees the same angles. With `pad`
        (B,) left-padding counts, row b's positions are shifted by -pad[b] and the tables are (B, 1, T, hd)."""
        key = (start, length, dtype, device)
        if pad is None and self._last is not None and self._last[0] == key:
            return self._last[1]
        f64 = dict(dtype=torch.float64, device=device)
        pairs = torch.arange(0, self.head_dim, 2, **f64)
        inv_freq = 1.0 / (self.theta ** (pairs / self.head_dim))
        pos = torch.arange(start, start + length, **f64)
        if pad is not None:
            pos = (pos - pad.to(**f64).unsqueeze(-1)).clamp(min=0)  # (B, T)
        emb = pos.unsqueeze(-1) * inv_freq
        emb = torch.cat((emb, emb), dim=-1)
        scale = None
        if self.xpos:
            log_zeta = ((pairs + 0.4 * self.head_dim) / (1.4 * self.head_dim)).log()
            s = torch.exp(((pos - self.center) / self.scale_base).unsqueeze(-1) * log_zeta)
            scale = torch.cat((s, s), dim=-1).to(dtype)
        out = (emb.cos().to(dtype), emb.sin().to(dtype), scale)
        if pad is not None:
            return tuple(None if t is None else t.unsqueeze(1) for t in out)
        self._last = (key, out)
        return out


def padding_mask(pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, 1, T, start+T) boolean attention mask: causal, and blind to each row's left padding (a padding query
    sees itself only, so no row is all -inf)."""
    q = torch.arange(start, start + length, device=pad.device)
    k = torch.arange(start + length, device=pad.device)
    allowed = (k <= q.unsqueeze(-1)) & (k >= pad.view(-1, 1, 1))
    return (allowed | (k == q.unsqueeze(-1))).unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin, scale):
    """Rotate q, k of shape (B, h, T, hd); xPos multiplies q by `scale` and divides k by it."""
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if scale is not None:
        q = q * scale
        k = k / scale
    return q, k


@dataclass
class KVCache:
    """Preallocated keys/values per layer, (B, h, max_len, hd); `pos` is the number of filled positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0
    max_len: int = field(init=False)

    def __post_init__(self):
        self.max_len = self.k[0].shape[2]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        make = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]  # noqa: E731
        return cls(make(), make())


def cached_attention(q, k, v, cache: KVCache | None, layer: int, attn_mask=None, dropout_p: float = 0.0):
    """Causal attention of q over k, v (each (B, h, T, hd)); with a `cache`, k and v are written at its position and
    the queries attend over every cached key before them too. `attn_mask` (bool, True = may attend) replaces the
    causal rule: a batch of left-padded rows (`padding_mask`)."""
    B, _, T, _ = q.shape
    start = 0
    if cache is not None:
        start = cache.pos
        cache.k[layer][:B, :, start:start + T] = k
        cache.v[layer][:B, :, start:start + T] = v
        k = cache.k[layer][:B, :, :start + T]
        v = cache.v[layer][:B, :, :start + T]
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if T == 1:  # decoding one token: it is the newest position and sees every cached key
        return F.scaled_dot_product_attention(q, k, v)
    allowed = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # query i sits at position start + i


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.attn_dim, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, cfg.attn_dim, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, cfg.attn_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.register_buffer("head_mask", None)

    def forward(self, x, rope, hidden_mask=None, cache: KVCache | None = None, layer: int = 0, attn_mask=None):
        B, T, _ = x.shape
        rows = None if self.head_mask is None else self.head_mask.repeat_interleave(self.head_dim)
        # heads from the output width: a tensor-parallel shard computes only its own heads
        q, k, v = (masked_linear(x, layer, rows).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))  # each (B, h, T, hd)
        q, k = apply_rotary(q, k, *rope)
        y = cached_attention(q, k, v, cache, layer, attn_mask, self.dropout if self.training else 0.0)
        return masked_linear(y.transpose(1, 2).reshape(B, T, -1), self.proj, hidden_mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)
        self.register_buffer("ffn_mask", None)

    def forward(self, x, hidden_mask=None):
        a = masked_linear(x, self.fc, self.ffn_mask)
        return masked_linear(F.gelu(a, approximate="tanh"), self.proj, hidden_mask)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("gate", None)

    def forward(self, x, rope, hidden_mask=None, cache=None, layer=0, attn_mask=None):
        h = x + self.drop(self.attn(self.ln_1(x, hidden_mask), rope, hidden_mask, cache, layer, attn_mask))
        h = h + self.drop(self.mlp(self.ln_2(h, hidden_mask), hidden_mask))
        if self.gate is not None:
            h = torch.lerp(x, h, self.gate.to(h.dtype))  # exact x at gate 0
        return h


def embed_input(wte: nn.Embedding, idx: torch.Tensor, input_mult: float, hidden_mask: torch.Tensor | None):
    """The residual stream's input: token embeddings times μP's input multiplier, times the growth's hidden mask
    (new d_model columns start at 0). Returns (x, the mask in x's dtype or None)."""
    x = wte(idx)
    if input_mult != 1.0:
        x = x * input_mult
    c = None if hidden_mask is None else hidden_mask.to(x.dtype)
    return (x if c is None else x * c), c


def split_fused_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every `attn.qkv.{weight,bias}` (rows [q heads | k heads | v heads], the layout before q, k
    and v became three projections) split into `attn.q`, `attn.k` and `attn.v`; other states are returned as they
    are."""
    if not any(".attn.qkv." in name for name in state):
        return state
    out = {}
    for name, t in state.items():
        if ".attn.qkv." in name:
            prefix, _, kind = name.rpartition(".qkv.")
            for part, chunk in zip("qkv", t.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{part}.{kind}"] = chunk.contiguous()
        else:
            out[name] = t
    return out


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.bias)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.register_buffer("hidden_mask", None)
        for name, p in self.named_parameters():
            mup.init_parameter(cfg, name, p, generator)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pad: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits (B, T, V), float32 under autocast; the mean cross-entropy if targets.

        `pad` (B,) counts left-padding tokens per row (batched prompts of different lengths): padded rows see
        the same positions and keys as they would alone."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        x, c = embed_input(self.wte, idx, self.cfg.input_mult, self.hidden_mask)
        x = self.drop(x)
        dev = x.device.type
        compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        rope = self.rotary.tables(start, T, compute, x.device, pad)
        attn_mask = None if pad is None else padding_mask(pad, start, T)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, c, cache, i, attn_mask)
        x = self.ln_f(x, c)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head) * mup.logit_scale(self.cfg)
        if cache is not None:
            cache.pos += T
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A model holding `state` (masks included), built without a wasted random init."""
        with torch.device("meta"):
            model = cls(cfg)
        state = split_fused_qkv(state)
        ref = state["wte.weight"]
        model = model.to_empty(device=ref.device).to(ref.dtype)
        model.load_state_dict(state)
        return model

    # --- growth masks ----------------------------------------------------------------------------------------
    def growth_masks(self) -> dict[str, torch.Tensor]:
        """The mask buffers present now, by state-dict name (empty when no growth is in progress)."""
        return {n: b for n, b in self.named_buffers() if n.rsplit(".", 1)[-1] in MASK_NAMES}

    @property
    def growing(self) -> bool:
        return bool(self.growth_masks())

    @torch.no_grad()
    def set_mask_value(self, m: float) -> None:
        """Move every new coordinate (mask < 1) to m, 0 <= m < 1."""
        if not 0.0 <= m < 1.0:
            raise ValueError(f"mask value {m} must be in [0, 1); use clear_masks() at 1")
        for buf in self.growth_masks().values():
            buf[buf < 1] = m

    def clear_masks(self) -> None:
        """End of a ramp (m = 1): drop every mask, leaving a plain model of the same function."""
        for name in self.growth_masks():
            owner, attr = self._owner(name)
            setattr(owner, attr, None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like nn.Module's, but first installs (or removes) mask buffers to match the state being loaded, and
        splits a fused `attn.qkv` of older checkpoints."""
        state_dict = split_fused_qkv(state_dict)
        self.clear_masks()
        for name, t in state_dict.items():
            if name.rsplit(".", 1)[-1] in MASK_NAMES:
                owner, attr = self._owner(name)
                setattr(owner, attr, torch.empty_like(t, device=self.wte.weight.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return (self.get_submodule(path) if path else self), attr

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

