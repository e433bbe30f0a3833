"""μP as the FLM authors implement it (DESIGN §2), in one place.

With width multiplier w = d_model / base_width:
- matrix-like weights (the ones whose fan-in grows with width) are initialised N(0, σ²/w), residual output
  projections additionally divided by 2L in variance; embeddings, LayerNorms and biases are width-independent;
- Adam learning rate of matrix-like weights is base_lr / w, everything else base_lr;
- logits = lm_head(x) · output_mult / w; the embedding output is multiplied by input_mult.
Hyperparameters found on a narrow proxy (LR, init std, output_mult) then transfer to the wide model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flm.config import ModelConfig

# Parameter-name suffixes of the weights μP treats as "matrix-like" (hidden fan-in).
MATRIX_WEIGHTS = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight", "mlp.fc.weight",
                  "mlp.proj.weight")
RESIDUAL_OUTPUTS = ("attn.proj.weight", "mlp.proj.weight")


def is_matrix_like(name: str) -> bool:
    return name.endswith(MATRIX_WEIGHTS)


def init_std(cfg: ModelConfig, name: str) -> float:
    """Standard deviation of the initial value of parameter `name` (0 means zeros, as for biases)."""
    if name.endswith("bias"):
        return 0.0
    if name.endswith(RESIDUAL_OUTPUTS):
        return cfg.init_std / math.sqrt(cfg.width_mult * 2 * cfg.n_layer)
    if is_matrix_like(name):
        return cfg.init_std / math.sqrt(cfg.width_mult)
    return cfg.init_std  # embeddings and an untied lm_head: the output_mult / w factor makes them vector-like


@torch.no_grad()
def init_parameter(cfg: ModelConfig, name: str, p: torch.Tensor, generator: torch.Generator | None = None):
    """Initialise one parameter in place following the μP rules; LayerNorm weights are ones."""
    if ".ln_" in name or name.startswith("ln_"):
        p.fill_(1.0 if name.endswith("weight") else 0.0)
        return
    std = init_std(cfg, name)
    if std == 0.0:
        p.zero_()
    else:
        p.normal_(0.0, std, generator=generator)


def logit_scale(cfg: ModelConfig) -> float:
    return cfg.output_mult / cfg.width_mult


def param_groups(model: nn.Module, cfg: ModelConfig, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: matrix-like weights at lr / w with weight decay; embeddings with decay at lr; LN and biases
    without decay at lr. Each group records its `lr_scale` so schedulers can rescale from a base LR."""
    w = cfg.width_mult
    groups: dict[str, dict] = {
        "matrix": {"params": [], "lr_scale": 1.0 / w, "weight_decay": weight_decay},
        "embedding": {"params": [], "lr_scale": 1.0, "weight_decay": weight_decay},
        "no_decay": {"params": [], "lr_scale": 1.0, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_matrix_like(name):
            key = "matrix"
        elif p.ndim >= 2:
            key = "embedding"
        else:
            key = "no_decay"
        groups[key]["params"].append(p)
    out = []
    for key, g in groups.items():
        if g["params"]:
            out.append({**g, "name": key, "lr": lr * g["lr_scale"]})
    return out
