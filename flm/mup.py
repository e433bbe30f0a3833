"""μP as the FLM-101B authors implement it, in one place.

With width multiplier w = d_model / base_width:
- matrix-like weights (the ones whose fan-in grows with width) are initialised N(0, σ²/w), residual output
  projections additionally divided by 2L in variance; embeddings, LayerNorms and biases are width-independent;
- Adam learning rate of matrix-like weights is base_lr / w, everything else base_lr;
- logits = lm_head(x) · output_mult / w; the embedding output is multiplied by input_mult.
Hyperparameters found on a narrow proxy (LR, init std, output_mult) then transfer to the wide model.

Precisely, the w of a matrix-like weight is its own fan-in multiplier (`fan_in_mult`): its fan-in over the same
weight's fan-in in the base model, GPT-3's shape at d_model = base_width (attention width base_width, FFN
4·base_width; the proxy family's shape). For q, k, v and mlp.fc the fan-in is d_model, so this is d_model /
base_width; for attn.proj it is n_head·head_dim and for mlp.proj d_ffn. In the GPT-3 shapes every preset uses the
three are equal. They differ after MSG grows the FFN or the heads without the width (flm/growth.py): then mlp.proj /
attn.proj get the init and LR of their larger fan-in, as microsoft/mup's per-parameter width multipliers would.

Weight decay (AdamW's, decoupled: p ← p·(1 − lr·wd) each step) of a matrix-like weight is wd·w, as microsoft/mup's
MuAdamW scales it, so that the per-step decay lr·wd = base_lr·wd is the same at every width. Without it the decay
of the 101B model (w = 40) would be 40x weaker than on the proxy where wd was chosen.

Attention scores use 1/sqrt(head_dim), not μP's 1/head_dim: exact μP only because head_dim is fixed at every width
and through every growth (MSG grows heads, not head_dim), so the attention logits' scale never changes with width.
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


FFN_RATIO = 4  # d_ffn / d_model of the base model (GPT-3's shape), the reference for mlp.proj's fan-in


def fan_in_mult(cfg: ModelConfig, name: str) -> float:
    """μP width multiplier of matrix-like weight `name`: its fan-in over its fan-in in the base model (see the module
    docstring); 1 under standard parametrisation."""
    if cfg.parametrization != "mup":
        return 1.0
    if name.endswith("attn.proj.weight"):
        return cfg.attn_dim / cfg.base_width
    if name.endswith("mlp.proj.weight"):
        return cfg.d_ffn / (FFN_RATIO * cfg.base_width)
    return cfg.width_mult


def init_std(cfg: ModelConfig, name: str) -> float:
    """Standard deviation of the initial value of parameter `name` (0 means zeros, as for biases)."""
    if name.endswith("bias"):
        return 0.0
    if name.endswith(RESIDUAL_OUTPUTS):
        return cfg.init_std / math.sqrt(fan_in_mult(cfg, name) * 2 * cfg.n_layer)
    if is_matrix_like(name):
        return cfg.init_std / math.sqrt(fan_in_mult(cfg, name))
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
    """AdamW groups, as microsoft/mup's MuAdamW builds them: matrix-like weights in one group per fan-in multiplier
    w (`fan_in_mult`), at lr / w and weight decay wd · w (so lr·wd, AdamW's per-step decay, does not change with
    width); embeddings with decay wd at lr; LN and biases without decay at lr. Each group records its `lr_scale`
    (and `width_mult`) so schedulers can rescale from a base LR.

    In GPT-3 shapes every matrix-like weight has the same w and there is one "matrix" group; the order of the
    parameters over the groups (which optimizer checkpoints index by) is then named_parameters' order within each
    of "matrix", "embedding", "no_decay"."""
    matrix: dict[float, list] = {}
    embedding, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_matrix_like(name):
            matrix.setdefault(fan_in_mult(cfg, name), []).append(p)
        elif p.ndim >= 2:
            embedding.append(p)
        else:
            no_decay.append(p)
    groups = [{"name": "matrix" if w == cfg.width_mult else f"matrix_w{w:g}", "params": params, "width_mult": w,
               "lr_scale": 1.0 / w, "weight_decay": weight_decay * w} for w, params in matrix.items()]
    groups.append({"name": "embedding", "params": embedding, "width_mult": 1.0, "lr_scale": 1.0,
                   "weight_decay": weight_decay})
    groups.append({"name": "no_decay", "params": no_decay, "width_mult": 1.0, "lr_scale": 1.0, "weight_decay": 0.0})
    return [{**g, "lr": lr * g["lr_scale"]} for g in groups if g["params"]]
