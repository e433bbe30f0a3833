"""Parameter and FLOPs accounting, one function each, shared by training logs, benchmarks and the planner.

Training FLOPs per token = 6·N + 12·L·A·T (Kaplan et al.; nanoGPT's MFU formula), where N counts the weights
that take part in matmuls (non-embedding parameters plus the output head, tied or not), A = n_head·head_dim
the attention width and T the sequence length: 6N for the forward+backward matmuls, 12·L·A·T for attention.
"""

from __future__ import annotations

from flm.config import ModelConfig


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Number of parameters; `embeddings=False` leaves out the token embedding (and an untied head)."""
    d, a, f, b = cfg.d_model, cfg.attn_dim, cfg.d_ffn, int(cfg.bias)
    ln = d * (1 + b)
    block = 2 * ln + (3 * a * d + 3 * a * b) + (a * d + d * b) + (f * d + f * b) + (f * d + d * b)
    total = cfg.n_layer * block + ln
    if embeddings:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len` (default: cfg.seq_len)."""
    t = cfg.seq_len if seq_len is None else seq_len
    n_matmul = param_count(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.attn_dim * t


def mfu(cfg: ModelConfig, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (FLOP/s)."""
    return flops_per_token(cfg) * tokens_per_second / peak_flops
