"""MSG operators (flm/growth.py): exact preservation at m = 0, a plain model at m = 1, optimizer transfer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flm import mup
from flm.config import ModelConfig
from flm.growth import (
    GrowthError,
    MaskRamp,
    check_preservation,
    grow_depth,
    grow_ffn,
    grow_heads,
    grow_model,
    grow_width,
    layer_sources,
    transfer_adamw_state,
)
from flm.model import GPT
from flm.reference import ReferenceGPT

OPERATORS = ("width", "ffn", "heads", "depth")


@st.composite
def growth_cases(draw):
    """A random small config and a random composition of operators growing it."""
    hd = draw(st.sampled_from([4, 8]))
    n_head = draw(st.integers(1, 3))
    old = ModelConfig(
        n_layer=draw(st.integers(1, 3)), d_model=draw(st.integers(4, 24)), n_head=n_head, head_dim=hd,
        d_ffn=draw(st.integers(4, 40)), vocab_size=draw(st.integers(11, 40)), seq_len=16,
        pos=draw(st.sampled_from(["xpos", "rope"])), base_width=draw(st.sampled_from([4, 8, 16])),
        input_mult=draw(st.sampled_from([1.0, 0.5, 3.0])), output_mult=draw(st.sampled_from([1.0, 2.0, 0.3])),
        tie_embeddings=draw(st.booleans()), bias=draw(st.booleans()), init_std=0.05,
    )
    ops = draw(st.lists(st.sampled_from(OPERATORS), min_size=1, max_size=4, unique=True))
    grow = {"width": ("d_model", 24), "ffn": ("d_ffn", 40), "heads": ("n_head", 3), "depth": ("n_layer", 3)}
    new = {grow[op][0]: getattr(old, grow[op][0]) + draw(st.integers(1, grow[op][1])) for op in ops}
    placement = draw(st.sampled_from(["stack", "interleave"]))
    return old, ModelConfig(**{**old.model_dump(), **new}), tuple(draw(st.permutations(ops))), placement


def trained_like(cfg: ModelConfig, dtype, seed=0) -> GPT:
    """A model whose every parameter, LayerNorms and biases included, is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(cfg, generator=g).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=growth_cases(), seed=st.integers(0, 2**16))
def test_growth_preserves_function_at_m0(case, seed):
    old_cfg, new_cfg, order, placement = case
    idx = torch.randint(0, old_cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(seed))
    for dtype, abs_tol, rel_tol in ((torch.float64, 1e-10, None), (torch.float32, None, 1e-5)):
        old = trained_like(old_cfg, dtype, seed)
        new = grow_model(old, new_cfg, order, placement, torch.Generator().manual_seed(seed + 1))
        assert new.cfg == new_cfg and new.growing
        kept = check_preservation(old, new, idx)
        if abs_tol is not None:
            assert kept.max_abs <= abs_tol, (dtype, kept)
        else:
            assert kept.max_rel <= rel_tol, (dtype, kept)


@pytest.mark.parametrize(
    "operator,arg",
    [(grow_width, 40), (grow_ffn, 160), (grow_heads, 3), (grow_depth, 4)],
    ids=["width", "ffn", "heads", "depth"],
)
@pytest.mark.parametrize("pos", ["xpos", "rope"])
def test_each_operator_alone_is_exact(operator, arg, pos):
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, head_dim=16, vocab_size=50, seq_len=16, pos=pos,
                      base_width=8, output_mult=2.0, input_mult=1.5)
    old = trained_like(cfg, torch.float64)
    state, new_cfg = operator(old.state_dict(), cfg, arg)
    new = GPT.from_state(new_cfg, state)
    assert new.num_params() > old.num_params()
    idx = torch.randint(0, 50, (4, 16))
    assert check_preservation(old, new, idx).max_abs <= 1e-10


def test_growth_actually_changes_the_model_when_the_mask_opens():
    """Guards the preservation tests: the new coordinates are live, only the mask hides them."""
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, vocab_size=30, seq_len=8)
    old = trained_like(cfg, torch.float64)
    new = grow_model(old, ModelConfig(**{**cfg.model_dump(), "d_model": 32, "n_head": 4, "n_layer": 3}))
    new.set_mask_value(0.5)
    assert check_preservation(old, new, torch.randint(0, 30, (2, 8))).max_abs > 1e-3


def test_m1_equals_plain_model_of_new_size():
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, head_dim=8, vocab_size=30, seq_len=12, output_mult=2.0,
                      base_width=8)
    new_cfg = ModelConfig(**{**cfg.model_dump(), "d_model": 32, "n_head": 4, "d_ffn": 100, "n_layer": 4})
    grown = grow_model(trained_like(cfg, torch.float64), new_cfg, placement="interleave")
    with torch.no_grad():
        for mask in grown.growth_masks().values():
            mask.fill_(1.0)
    plain_state = {k: v for k, v in grown.state_dict().items() if k not in grown.growth_masks()}
    plain = GPT.from_state(new_cfg, plain_state)
    assert not plain.growing
    ref = ReferenceGPT(new_cfg).double()
    ref.load_state_dict(plain_state)
    idx = torch.randint(0, 30, (3, 12))
    masked_logits = grown(idx)[0]
    assert torch.allclose(masked_logits, plain(idx)[0], atol=1e-12, rtol=0)
    assert torch.allclose(masked_logits, ref(idx), atol=1e-12, rtol=0)


def test_mask_ramp_is_linear_and_ends_plain():
    cfg = ModelConfig(n_layer=1, d_model=8, n_head=2, vocab_size=20, seq_len=8)
    grown = grow_model(GPT(cfg), ModelConfig(**{**cfg.model_dump(), "d_model": 16, "n_head": 4}))
    ramp = MaskRamp(start_step=10, ramp_steps=4)
    assert [ramp.value(s) for s in (9, 10, 11, 13, 14, 99)] == [0.0, 0.0, 0.25, 0.75, 1.0, 1.0]
    assert ramp.apply(grown, 11)
    assert grown.hidden_mask[8:].eq(0.25).all() and grown.hidden_mask[:8].eq(1).all()
    assert ramp.apply(grown, 13)
    assert grown.hidden_mask[8:].eq(0.75).all()
    assert not ramp.apply(grown, 14)
    assert not grown.growing
    assert MaskRamp.from_state(ramp.state_dict()) == ramp


def test_growing_during_a_ramp_is_refused():
    cfg = ModelConfig(n_layer=1, d_model=8, n_head=2, vocab_size=20, seq_len=8)
    grown = grow_model(GPT(cfg), ModelConfig(**{**cfg.model_dump(), "d_model": 16, "n_head": 4}))
    grown.set_mask_value(0.5)
    with pytest.raises(GrowthError, match="ramp is still in progress"):
        grow_model(grown, ModelConfig(**{**grown.cfg.model_dump(), "n_layer": 2}))


@pytest.mark.parametrize("change,field", [({"d_model": 4}, "d_model"), ({"head_dim": 8}, "head_dim"),
                                          ({"vocab_size": 30}, "vocab_size")])
def test_invalid_growth_is_refused(change, field):
    cfg = ModelConfig(n_layer=1, d_model=8, n_head=2, vocab_size=20, seq_len=8)
    with pytest.raises(GrowthError, match=field):
        grow_model(GPT(cfg), ModelConfig(**{**cfg.model_dump(), **change}))


def test_layer_sources():
    assert layer_sources(2, 4, "stack") == [0, 1, None, None]
    assert layer_sources(2, 4, "interleave") == [0, None, 1, None]
    assert layer_sources(3, 5, "interleave") == [0, 1, None, 2, None]
    assert layer_sources(2, 7, "interleave") == [0, None, None, 1, None, None, None]


@pytest.mark.parametrize("placement", ["stack", "interleave"])
def test_adamw_state_transfer_keeps_old_slices(placement):
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, vocab_size=30, seq_len=8, base_width=8)
    new_cfg = ModelConfig(**{**cfg.model_dump(), "d_model": 24, "n_head": 3, "d_ffn": 100, "n_layer": 3})
    model = GPT(cfg, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(mup.param_groups(model, cfg, 1e-3, 0.1))
    idx = torch.randint(0, 30, (2, 8))
    for _ in range(3):
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    grown = grow_model(model, new_cfg, placement=placement)
    new_opt = torch.optim.AdamW(mup.param_groups(grown, new_cfg, 1e-3, 0.1))
    transfer_adamw_state(opt, model, new_opt, grown, placement)
    old_params, new_params = dict(model.named_parameters()), dict(grown.named_parameters())
    sources = layer_sources(2, 3, placement)
    new_layer = sources.index(None)
    for name, p in new_params.items():
        state = new_opt.state[p]
        assert state["step"].item() == 3
        if name.startswith(f"blocks.{new_layer}."):
            assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
            continue
        src = name if not name.startswith("blocks.") else f"blocks.{sources[int(name.split('.')[1])]}." + \
            name.split(".", 2)[2]
        old_state = opt.state[old_params[src]]
        for key in ("exp_avg", "exp_avg_sq"):
            old_m, new_m = old_state[key], state[key]
            lead = tuple(slice(0, s) for s in old_m.shape)
            assert torch.equal(new_m[lead], old_m)
            rest = new_m.clone()
            rest[lead] = 0
            assert not rest.any()  # zeros everywhere else
    # the grown optimizer steps without error and training goes on
    new_opt.zero_grad()
    grown(idx, idx)[1].backward()
    new_opt.step()


@pytest.mark.parametrize(("dim", "size", "proj"), [("d_ffn", 512, "mlp"), ("n_head", 8, "attn")])
def test_ffn_or_head_growth_gives_the_projection_its_new_fan_in(dim, size, proj):
    """Growing the FFN or the heads 4x without the width quadruples the fan-in of mlp.proj / attn.proj only: their
    new columns are initialised as in a scratch model of the grown shape (std / sqrt(4 · 2L), half the old columns'
    std) and their AdamW group trains at a quarter of the LR with 4x the weight decay (flm/mup.py)."""
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, head_dim=16, vocab_size=30, seq_len=8, base_width=32)
    new_cfg = ModelConfig(**{**cfg.model_dump(), dim: size})
    grown = grow_model(GPT(cfg, generator=torch.Generator().manual_seed(0)), new_cfg,
                       generator=torch.Generator().manual_seed(1))
    scratch = GPT(new_cfg, generator=torch.Generator().manual_seed(2))
    old_cols = cfg.d_ffn if proj == "mlp" else cfg.attn_dim
    for b in range(2):
        w_grown = getattr(grown.blocks[b], proj).proj.weight.detach()
        w_scratch = getattr(scratch.blocks[b], proj).proj.weight.detach()
        assert w_grown[:, old_cols:].std().item() == pytest.approx(w_scratch.std().item(), rel=0.1)
        assert w_grown[:, :old_cols].std().item() == pytest.approx(2 * w_scratch.std().item(), rel=0.15)
    group_of = {id(p): g for g in mup.param_groups(grown, new_cfg, 1e-3, 0.1) for p in g["params"]}
    group = {name: group_of[id(p)] for name, p in grown.named_parameters()}
    assert group[f"blocks.1.{proj}.proj.weight"]["lr"] == pytest.approx(1e-3 / 4)
    assert group[f"blocks.1.{proj}.proj.weight"]["weight_decay"] == pytest.approx(0.4)
    for name in ("blocks.1.attn.q.weight", "blocks.1.mlp.fc.weight"):  # fan-in d_model: unchanged
        assert (group[name]["lr"], group[name]["weight_decay"]) == pytest.approx((1e-3, 0.1))
