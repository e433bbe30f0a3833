"""The serving forward pass: flm's GPT (one rank's slices of it) recomposed for decoding, with the same numbers.

Training wants q, k and v as three projections (each one shards by rows for tensor parallelism, flm/model.py);
a decode step wants as few kernels and Python calls as possible, because at one token per row the matmuls are
small and the per-operation cost (~2-5 µs of dispatch each on CPU) is a large share of the step. So `ServingGPT`
takes a built rank model (`service.tp.build_shard`) and, without changing its parameters' values:

- fuses each block's q, k and v rows (this rank's heads of each) into one [q | k | v] matrix: one matmul instead
  of three (the regression of the q/k/v split: 1.67x -> 1.34x of transformers on the tiny model);
- rotates q and k together, with `rotate_half(x) * sin` computed as `roll(x) * sin'` (sin' = sin with its first
  half negated: the same products, the sign moved onto the table): 4 kernels for both instead of 12;
- builds the rotary tables of every position once (flm's float64 computation, gathered per step);
- skips multiplies by exactly 1 (μP input and logit scales at base width) and every growth mask that is absent;
- on CPU in float32, `pack` gives every projection a oneDNN-packed copy for steps of 4 rows or more
  (`PackedLinear`: the plain matmul of a few rows by a large weight is far from the core's FLOP rate).

Growth masks are kept (a checkpoint saved mid-ramp is served exactly): LayerNorm is flm's own module (its masked
statistics), the head mask multiplies the fused q/k/v rows, the FFN mask the FFN pre-activation, the gate lerps;
the hidden mask on the two row-parallel outputs is already folded into their weights by `build_shard`.

`forward(idx, cache=, pad=)` has GPT.forward's meaning (left padding, flm's KVCache), so `SlotBatch` and
`flm.generate` drive either. Greedy decoding equals flm/generate.py token for token in fp32 (tests/service).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flm import mup
from flm.model import GPT, KVCache, Rotary, cached_attention, embed_input, padding_mask

PACKED_ROWS = 4  # rows from which oneDNN's packed weights beat the plain matmul
PACKED_MIN_NUMEL = 1 << 19  # smaller weights (the tiny model's 256 x 1024) gain nothing from packing: left plain


class PackedLinear(nn.Module):
    """y = x @ W^T + b on CPU in float32, by the faster of two kernels for the number of rows in x: under
    `PACKED_ROWS` rows the plain matmul of W stored input-major (service.tp.input_major), from `PACKED_ROWS` rows on
    oneDNN's matmul of W reordered once into its blocked layout. Measured on one AVX2 core (768 x 3072 weight):
    1-3 rows, the plain one is 1.2-2x faster; 4-16 rows, the packed one 1.4-2.5x (benchmarks/serve.py measures both
    side by side, `linear_kernels`). Holding both doubles the projections' weight memory on CPU. The two kernels
    agree to fp32 rounding (their sums run in different orders). `reduce`: row-parallel (sum over the
    tensor-parallel ranks, then the bias once)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, reduce: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.reduce else self.bias
        if x.numel() < PACKED_ROWS * x.shape[-1]:
            y = F.linear(x, self.weight, bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        if not self.reduce:
            return y
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN packed float32 weights on this CPU (any x86 with AVX2; bf16 packing needs AVX512-BF16 class CPUs)."""
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


class FusedBlock(nn.Module):
    """One transformer block of a rank: LayerNorms replicated, [q | k | v] and FFN-in column-parallel, the two
    output projections row-parallel (`proj` modules of service.tp, which all-reduce when tp > 1)."""

    def __init__(self, block: nn.Module, head_dim: int):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.ln_1, self.ln_2, self.head_dim = block.ln_1, block.ln_2, head_dim
        w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]).detach()
        self.qkv = nn.Linear(w.shape[1], w.shape[0], bias=attn.q.bias is not None, device="meta")
        self.qkv.weight = nn.Parameter(w, requires_grad=False)
        if attn.q.bias is not None:
            self.qkv.bias = nn.Parameter(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]).detach(),
                                         requires_grad=False)
        self.attn_proj, self.fc, self.mlp_proj = attn.proj, mlp.fc, mlp.proj
        self.heads = w.shape[0] // 3 // head_dim
        # the head mask multiplies each head's q, k and v rows alike
        head_mask = attn.head_mask
        self.register_buffer("qkv_mask", None if head_mask is None else head_mask.repeat_interleave(head_dim).repeat(3))
        self.register_buffer("ffn_mask", mlp.ffn_mask)
        self.register_buffer("gate", block.gate)

    def forward(self, x, rope, c, cache: KVCache | None, layer: int, attn_mask):
        B, T, _ = x.shape
        qkv = self.qkv(self.ln_1(x, c))
        if self.qkv_mask is not None:
            qkv = qkv * self.qkv_mask.to(qkv.dtype)
        qkv = qkv.view(B, T, 3, self.heads, self.head_dim)
        cos, sin, scale = rope  # (T, 1, 1, hd) or, per row, (B, T, 1, 1, hd)
        qk = qkv[:, :, :2]
        qk = qk * cos + qk.roll(self.head_dim // 2, -1) * sin
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if scale is not None:  # xPos
            q, k = q * scale, k / scale
        y = cached_attention(q, k, v, cache, layer, attn_mask)
        h = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, -1))
        a = self.fc(self.ln_2(h, c))
        if self.ffn_mask is not None:
            a = a * self.ffn_mask.to(a.dtype)
        h = h + self.mlp_proj(F.gelu(a, approximate="tanh"))
        if self.gate is not None:
            h = torch.lerp(x, h, self.gate.to(h.dtype))
        return h


class ServingGPT(nn.Module):
    """GPT.forward for inference over fused blocks (see the module docstring); `positions`: rotary tables are
    precomputed for positions 0 .. positions - 1 (the KV cache's capacity), computed on the fly beyond."""

    def __init__(self, model: GPT, positions: int):
        super().__init__()
        cfg = self.cfg = model.cfg
        self.wte, self.ln_f, self.lm_head = model.wte, model.ln_f, model.lm_head
        self.register_buffer("hidden_mask", model.hidden_mask)
        self.blocks = nn.ModuleList(FusedBlock(b, cfg.head_dim) for b in model.blocks)
        self.rotary, self.positions = Rotary(cfg), positions
        self.logit_scale = mup.logit_scale(cfg)
        self.head: PackedLinear | None = None  # set by pack()
        self._tables: dict[tuple, tuple] = {}  # (dtype, device) -> (cos, signed sin, xPos scale), (positions, hd)

    def pack(self, rows: int, min_numel: int = PACKED_MIN_NUMEL) -> None:
        """Hold every projection and the output head of `min_numel` weights or more as `PackedLinear` (CPU float32;
        see there). The head gets its own packed copy of the tied embedding (vocab x d_model floats more), the
        lookup keeps reading `wte`."""
        for block in self.blocks:
            for name in ("qkv", "attn_proj", "fc", "mlp_proj"):
                m = getattr(block, name)
                if m.weight.numel() >= min_numel:
                    setattr(block, name, PackedLinear(m.weight, m.bias, rows, getattr(m, "reduce", False)))
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        if head.numel() >= min_numel:
            self.head = PackedLinear(head, None, rows)

    def _rope(self, start: int, length: int, dtype: torch.dtype, device: torch.device, pad: torch.Tensor | None):
        """cos, signed sin (first half negated) and xPos scale, shaped for FusedBlock: (T, 1, 1, hd) for q/k laid
        out (B, T, 2, h, hd), and the scale (1, 1, T, hd) for q, k as (B, h, T, hd); per row with `pad`."""
        def signed(positions: int) -> tuple:
            cos, sin, scale = self.rotary.tables(0, positions, dtype, device)
            half = sin.shape[-1] // 2
            return cos, torch.cat([-sin[:, :half], sin[:, half:]], -1), scale

        key = (dtype, device)
        if key not in self._tables:
            self._tables[key] = signed(max(self.positions, 1))
        tables = self._tables[key]
        if start + length > self.positions:  # beyond the precomputed positions (whole-sequence scoring only)
            tables = signed(start + length)
        if pad is None:
            cos, sin, scale = (None if t is None else t[start:start + length] for t in tables)
            return cos[:, None, None], sin[:, None, None], None if scale is None else scale[None, None]
        pos = (torch.arange(start, start + length, device=device) - pad.unsqueeze(-1)).clamp(min=0)  # (B, T)
        cos, sin, scale = (None if t is None else t[pos] for t in tables)
        return cos[:, :, None, None], sin[:, :, None, None], None if scale is None else scale[:, None]

    def forward(self, idx: torch.Tensor, targets: None = None, cache: KVCache | None = None,
                pad: torch.Tensor | None = None):
        """idx (B, T) -> (logits (B, T, V), None), as GPT.forward (fp16/bf16 logits in float32; no loss)."""
        if targets is not None:
            raise ValueError("ServingGPT is for inference: use flm.model.GPT to compute a loss")
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        x, c = embed_input(self.wte, idx, self.cfg.input_mult, self.hidden_mask)
        rope = self._rope(start, T, x.dtype, x.device, pad)
        attn_mask = None if pad is None else padding_mask(pad, start, T)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, c, cache, i, attn_mask)
        x = self.ln_f(x, c)
        if self.head is not None:
            logits = self.head(x)
        else:
            logits = F.linear(x, self.wte.weight if self.lm_head is None else self.lm_head.weight)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if cache is not None:
            cache.pos += T
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return logits, None
