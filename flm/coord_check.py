"""The μP coordinate check (Yang et al., Tensor Programs V): train models of growing width a few steps with the same
hyperparameters and watch each layer's activation scale. Under μP every curve is flat in width; under standard
parametrisation the logits (and later the hidden activations) grow with width, which is why SP hyperparameters
found on a narrow proxy do not transfer.

    flm mup check [--widths 64,128,256,512] [--steps 4] [--out runs/mup/coord_check.png]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flm import mup
from flm.config import ModelConfig
from flm.model import GPT


def activation_scales(cfg: ModelConfig, steps: int, lr: float, batch: torch.Tensor, seed: int = 0) -> list[dict]:
    """Mean |activation| of the embedding output, every block output and the logits, after each of `steps`
    AdamW steps on `batch` (B, T+1)."""
    model = GPT(cfg, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(mup.param_groups(model, cfg, lr, 0.0), betas=(0.9, 0.95))
    x, y = batch[:, :-1], batch[:, 1:]
    seen: dict[str, float] = {}
    hooks = [model.wte.register_forward_hook(lambda m, i, o: seen.__setitem__("embedding", o.abs().mean().item()))]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(f"block {i}", out.abs().mean().item())))
    out = []
    for step in range(steps):
        logits, loss = model(x, y)
        out.append({"step": step, **seen, "logits": logits.abs().mean().item(), "loss": loss.item()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in hooks:
        h.remove()
    return out


def coord_check(base: ModelConfig, widths: list[int], steps: int = 4, lr: float = 1e-2, seed: int = 0) -> dict:
    """{parametrization: {width: [per-step scales]}} for μP and SP, same data, same LR, base width = widths[0]."""
    batch = torch.randint(0, base.vocab_size, (8, base.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    result: dict = {}
    for param in ("mup", "sp"):
        result[param] = {}
        for w in widths:
            cfg = ModelConfig(**{**base.model_dump(), "d_model": w, "n_head": max(1, w // base.head_dim),
                                 "d_ffn": 4 * w, "base_width": widths[0], "parametrization": param})
            result[param][w] = activation_scales(cfg, steps, lr, batch, seed)
    return result


def plot(result: dict, path: str | Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (param, by_width) in zip(axes, result.items(), strict=True):
        widths = sorted(by_width)
        layers = [k for k in by_width[widths[0]][-1] if k not in ("step", "loss")]
        for layer in layers:
            ax.plot(widths, [by_width[w][-1][layer] for w in widths], marker="o", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (d_model)")
        ax.set_title(f"{'μP' if param == 'mup' else 'standard parametrisation'}: after "
                     f"{len(by_width[widths[0]])} steps")
    axes[0].set_ylabel("mean |activation|")
    axes[1].legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return path


def logit_growth(result: dict, param: str) -> float:
    """Ratio of the logits' scale at the widest width to the narrowest, after the last step."""
    by_width = result[param]
    widths = sorted(by_width)
    return by_width[widths[-1]][-1]["logits"] / by_width[widths[0]][-1]["logits"]
