"""flm/model.py against the independent reference implementation, the KV cache, and the cost of idle masks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flm.config import ModelConfig
from flm.growth import grow_model
from flm.model import GPT, KVCache
from flm.reference import ReferenceGPT


def small(**kw) -> ModelConfig:
    base = dict(n_layer=2, d_model=32, n_head=4, vocab_size=61, seq_len=24, base_width=16, output_mult=2.0,
                input_mult=1.5, init_std=0.05)
    return ModelConfig(**{**base, **kw})


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A float64 model whose every parameter (LN and biases too) is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(cfg, generator=g).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("pos", ["xpos", "rope"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(pos, tied, bias):
    cfg = small(pos=pos, tie_embeddings=tied, bias=bias)
    model = perturbed(cfg)
    ref = ReferenceGPT(cfg).double()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    ours, _ = model(idx)
    assert torch.allclose(ours, ref(idx), atol=1e-12, rtol=0)


def test_xpos_differs_from_rope():
    idx = torch.randint(0, 61, (2, 24))
    a = perturbed(small(pos="xpos"))
    b = perturbed(small(pos="rope"))
    assert not torch.allclose(a(idx)[0], b(idx)[0])


def test_kv_cache_decoding_equals_full_forward():
    cfg = small()
    model = perturbed(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full, _ = model(idx)
    cache = KVCache.empty(cfg, batch=2, max_len=20, dtype=torch.float64)
    pieces = [model(idx[:, :7], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=0)


def test_loss_is_cross_entropy_of_logits():
    cfg = small()
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    logits, loss = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_mup_init_scales_with_width():
    narrow, wide = GPT(small(d_model=32, n_head=4)), GPT(small(d_model=128, n_head=16))
    ratio = wide.blocks[0].mlp.fc.weight.std() / narrow.blocks[0].mlp.fc.weight.std()
    assert ratio.item() == pytest.approx(0.5, rel=0.1)  # σ²/w: 4x the width, half the std
    assert wide.wte.weight.std().item() == pytest.approx(narrow.wte.weight.std().item(), rel=0.1)


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forward_ops(model, idx) -> list[str]:
    with torch.no_grad():
        model(idx)  # warm the rotary table cache, as every training step after the first does
        with OpRecorder() as rec:
            model(idx)
    return rec.ops


def test_idle_masks_cost_no_kernels():
    """After a ramp ends the grown model runs exactly the ops of a never-grown model of the same shape."""
    small_cfg, big_cfg = small(), small(n_layer=3, d_model=48, n_head=6, d_ffn=160)
    grown = grow_model(GPT(small_cfg), big_cfg)
    idx = torch.randint(0, 61, (2, 24))
    ramping = forward_ops(grown, idx)
    grown.clear_masks()
    assert forward_ops(grown, idx) == forward_ops(GPT(big_cfg), idx)
    assert len(ramping) > len(forward_ops(grown, idx))  # the recorder does see the masks while they act


@pytest.mark.parametrize("pos", ["rope", "xpos"])
def test_rotary_scores_depend_only_on_relative_distance(pos):
    """Property of RoPE and xPos, not a comparison with a second implementation: the same query and key vectors
    placed at positions (n, m) score the same for every pair with the same n - m."""
    from flm.model import Rotary, apply_rotary

    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=8, seq_len=256, pos=pos, xpos_scale_base=64)
    cos, sin, scale = Rotary(cfg).tables(0, 256, torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(32, dtype=torch.float64, generator=g).expand(1, 1, 256, 32)
    k = torch.randn(32, dtype=torch.float64, generator=g).expand(1, 1, 256, 32)
    qr, kr = apply_rotary(q, k, cos, sin, scale)
    scores = qr[0, 0] @ kr[0, 0].T  # (n, m)
    for d in (0, 1, 7, 50, 200):
        diag = torch.diagonal(scores, offset=-d)  # pairs with n - m = d
        assert torch.allclose(diag, diag[0].expand_as(diag), rtol=1e-9, atol=1e-12), (pos, d)


def test_xpos_scale_decays_with_distance():
    """xPos: q at n times k at m carries ζ^((n - m) / scale_base) per rotated pair (ζ < 1): for a query after its key,
    the factor shrinks as they move apart, on every pair, and is 1 at distance 0."""
    from flm.model import Rotary

    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=8, seq_len=512, pos="xpos", xpos_scale_base=128)
    _, _, scale = Rotary(cfg).tables(0, 512, torch.float64, torch.device("cpu"))
    factor = scale[300] / scale[300 - torch.arange(0, 300)]  # q at 300, k at 300 - d, d = 0 .. 299
    assert torch.allclose(factor[0], torch.ones_like(factor[0]))
    assert (factor[1:] < factor[:-1]).all()  # strictly decaying in d, every channel pair
    assert factor[-1].max() < 1


@pytest.mark.parametrize("pos", ["rope", "xpos"])
def test_rotary_scores_are_translation_invariant_across_offsets(pos):
    """The decoding path asks for the query's tables separately (`start` = its position) and may run past the
    training window: a query at n + s against keys at m + s scores as at s = 0, for offsets s within and beyond
    seq_len, with the query's and the keys' tables computed by separate calls."""
    from flm.model import Rotary, apply_rotary

    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=8, seq_len=128, pos=pos)
    rotary, f64, cpu = Rotary(cfg), torch.float64, torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 32, dtype=f64, generator=g)
    k = torch.randn(1, 1, 128, 32, dtype=f64, generator=g)  # a different key at every position m

    def scores(s: int, split: bool, n: int = 100) -> torch.Tensor:
        window = rotary.tables(s, 128, f64, cpu)
        q_tables = rotary.tables(s + n, 1, f64, cpu) if split else [t if t is None else t[n : n + 1] for t in window]
        qr, _ = apply_rotary(q, q, *q_tables)
        _, kr = apply_rotary(k, k, *window)
        return (qr @ kr.transpose(-1, -2))[0, 0, 0, : n + 1]  # keys at m <= n, as causal attention sees them

    ref = scores(0, split=False)  # one call for the whole window, as in training
    for s in (0, 1, 37, 128, 1000):
        for split in (False, True):
            assert torch.allclose(scores(s, split), ref, rtol=1e-9, atol=1e-12), (s, split)
