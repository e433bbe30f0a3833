"""service/decoder.py: the serving model (fused q/k/v, joint rotary, precomputed tables) gives flm's GPT logits, in
float64 to 1e-10, with and without growth masks (a checkpoint saved mid-ramp), for whole sequences and for a
left-padded batch decoded through the KV cache."""

import pytest
import torch

from flm.checkpoint import load_model
from flm.model import KVCache
from service.decoder import PackedLinear, can_pack
from service.tp import build_shard, input_major, read_config, read_shard_state


@pytest.mark.parametrize("which", ["final", "ramp"])
def test_serving_model_equals_flm_gpt(grown, which):
    model, _ = load_model(grown[which])
    model = model.double().eval()
    assert model.growing == (which == "ramp")
    cfg = read_config(grown[which])
    served = build_shard(cfg, read_shard_state(grown[which], cfg, 0, 1), 1, positions=2 * cfg.seq_len).double()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (3, 12), generator=g)
    with torch.no_grad():
        assert (served(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-10
        # prompts of 12, 9 and 5 tokens, left-padded, then 4 decode steps
        pad = torch.tensor([0, 3, 7])
        caches = [KVCache.empty(cfg, 3, 16, dtype=torch.float64) for _ in range(2)]
        want, _ = model(idx, cache=caches[0], pad=pad)
        got, _ = served(idx, cache=caches[1], pad=pad)
        for _ in range(4):
            assert (got[:, -1] - want[:, -1]).abs().max().item() <= 1e-10
            tok = want[:, -1].argmax(-1, keepdim=True)
            want, _ = model(tok, cache=caches[0], pad=pad)
            got, _ = served(tok, cache=caches[1], pad=pad)
        assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.skipif(not can_pack(torch.float32), reason="no oneDNN on this build")
def test_packed_weights_give_the_same_logits(grown):
    """ServingGPT.pack (oneDNN-packed copies, used from 4 rows on) against the plain float32 model: fp32 rounding."""
    model, _ = load_model(grown["final"])
    cfg = read_config(grown["final"])
    served = build_shard(cfg, read_shard_state(grown["final"], cfg, 0, 1), 1, positions=2 * cfg.seq_len)
    input_major(served)
    served.pack(8, min_numel=0)
    assert isinstance(served.blocks[0].qkv, PackedLinear) and served.head is not None
    idx = torch.randint(0, cfg.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for rows in (1, 8):  # the plain kernel under 4 rows, the packed one from 4 on
            assert (served(idx[:rows])[0] - model(idx[:rows])[0]).abs().max().item() <= 1e-5
