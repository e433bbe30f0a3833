"""flm/mup.py: AdamW groups whose per-step updates and weight decay do not change with width, also for weights
whose fan-in grows without the residual width (MSG's FFN-only and heads-only growth)."""

import pytest
import torch

from flm import mup
from flm.config import ModelConfig
from flm.model import GPT


def config(**kw) -> ModelConfig:
    base = dict(n_layer=2, d_model=32, n_head=2, head_dim=16, vocab_size=64, seq_len=32, base_width=32)
    return ModelConfig(**{**base, **kw})


def decay_factors(cfg: ModelConfig, lr: float, wd: float) -> dict[str, float]:
    """Parameter name -> p_after / p_before of one AdamW step with zero gradients (only the weight decay acts)."""
    model = GPT(cfg, generator=torch.Generator().manual_seed(0)).double()
    opt = torch.optim.AdamW(mup.param_groups(model, cfg, lr, wd), betas=(0.9, 0.95))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    out = {}
    for n, p in model.named_parameters():
        nonzero = before[n] != 0
        if nonzero.any():
            ratios = p.detach()[nonzero] / before[n][nonzero]
            assert torch.allclose(ratios, ratios[0].expand_as(ratios)), n
            out[n] = ratios[0].item()
    return out


WIDER = {"gpt3_4x": {"d_model": 128, "n_head": 8}, "ffn_4x": {"d_ffn": 512}, "heads_4x": {"n_head": 8}}


@pytest.mark.parametrize("wider", WIDER.values(), ids=WIDER.keys())
def test_weight_decay_per_step_is_width_independent(wider):
    """MuAdamW: matrix-like weights train at lr / w, so their decay is wd · w and lr · wd is the same at every width.
    A model 4x wider (and one whose FFN or attention alone is 4x wider) decays every weight by the same factor per
    step as the base-width model: (1 - base_lr · wd) for matrices and embeddings, 1 for LayerNorms."""
    lr, wd = 1e-2, 0.1
    narrow = decay_factors(config(), lr, wd)
    wide = decay_factors(config(**wider), lr, wd)
    assert wide.keys() == narrow.keys()
    for name, factor in wide.items():
        expected = 1.0 if ".ln_" in name or name.startswith("ln_") else 1 - lr * wd
        assert factor == pytest.approx(expected, abs=1e-9), name
        assert factor == pytest.approx(narrow[name], abs=1e-9), name


def test_weight_decay_scales_with_each_groups_multiplier():
    cfg = config(d_model=64, n_head=4, d_ffn=512, base_width=16)  # w = 4, mlp.proj's w = 8
    groups = {g["name"]: g for g in mup.param_groups(GPT(cfg), cfg, 1e-3, 0.1)}
    assert groups["matrix"]["width_mult"] == 4.0 and groups["matrix_w8"]["width_mult"] == 8.0
    for g in groups.values():
        decay = 0.0 if g["name"] == "no_decay" else 0.1
        assert g["lr"] * g["weight_decay"] == pytest.approx(1e-3 * decay)


def proj_output_change(kind: str, size: int) -> float:
    """RMS change of block 0's attn.proj or mlp.proj output (on the same input) after one AdamW step at a fixed base
    LR, for a model whose FFN width (`kind` "mlp": d_ffn = size) or head count ("attn": n_head = size) varies while
    d_model stays 32."""
    cfg = config(d_ffn=size) if kind == "mlp" else config(n_head=size)
    model = GPT(cfg, generator=torch.Generator().manual_seed(0))
    proj = getattr(model.blocks[0], kind).proj
    seen = {}

    def keep_input(module, args, out):
        seen["x"] = args[0].detach()

    hook = proj.register_forward_hook(keep_input)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(mup.param_groups(model, cfg, 1e-3, 0.0))
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    w0 = proj.weight.detach().clone()
    opt.step()
    hook.remove()
    return (seen["x"] @ (proj.weight.detach() - w0).T).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(("kind", "sizes"), [("mlp", (128, 512, 2048)), ("attn", (2, 8, 32))])
def test_projection_update_is_independent_of_its_fan_in(kind, sizes):
    """μP's defining property for the output projections, whose fan-in (d_ffn, n_head · head_dim) grows when MSG
    grows the FFN or the heads alone: one Adam step changes their output by the same amount at 1x, 4x and 16x the
    fan-in. With the LR of d_model's multiplier (the same at every size here) the change grows with the fan-in
    (measured 3.6x and 14x for the FFN, 4.3x and 17x for the heads)."""
    base = proj_output_change(kind, sizes[0])
    for size in sizes[1:]:
        assert 0.7 < proj_output_change(kind, size) / base < 1.4, size


def test_fan_in_multipliers():
    cfg = config(d_model=64, n_head=8, d_ffn=384, base_width=16)  # attention 128 wide, FFN 1.5 x 4 x d_model
    assert mup.fan_in_mult(cfg, "blocks.0.attn.q.weight") == cfg.width_mult == 4.0
    assert mup.fan_in_mult(cfg, "blocks.0.mlp.fc.weight") == 4.0
    assert mup.fan_in_mult(cfg, "blocks.0.attn.proj.weight") == 128 / 16
    assert mup.fan_in_mult(cfg, "blocks.0.mlp.proj.weight") == 384 / (4 * 16)
    sp = ModelConfig(**{**cfg.model_dump(), "parametrization": "sp"})
    assert mup.fan_in_mult(sp, "blocks.0.mlp.proj.weight") == 1.0
    # GPT-3 shapes: one multiplier for every matrix, hence one "matrix" group
    gpt3 = config(d_model=128, n_head=8)
    assert [g["name"] for g in mup.param_groups(GPT(gpt3), gpt3, 1e-3, 0.1)] == ["matrix", "embedding", "no_decay"]
