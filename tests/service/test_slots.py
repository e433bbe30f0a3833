"""service/slots.py: rows that join and leave a running batch (and the cache shifts that make room) see exactly what
they would see alone."""

import random

import pytest
import torch

from flm.config import ModelConfig
from flm.model import GPT
from service.slots import SlotBatch, apply_release
from service.tp import build_shard


def test_release_keeps_every_other_row_contiguous():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        gone = rng.sample(range(n), rng.randint(0, n))
        after = apply_release(list(range(n)), gone)
        assert sorted(after) == sorted(set(range(n)) - set(gone))
        assert len(after) == n - len(gone)


def model(pos: str) -> GPT:
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=50, seq_len=12, pos=pos, base_width=16)
    m = GPT(cfg, generator=torch.Generator().manual_seed(0)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    return m


@pytest.mark.parametrize("serving", [False, True], ids=["GPT", "ServingGPT"])
@pytest.mark.parametrize("leave", [{1: 6}, {0: 8, 1: 6}], ids=["first-row-stays", "first-row-leaves"])
def test_joining_leaving_and_shifting_rows_see_what_they_see_alone(serving, leave):
    """Three sequences join at different steps (one longer than the filled columns: a right shift), some leave
    early, and the capacity (context + 1) forces left shifts; every logit equals the sequence's own forward (flm's
    GPT). Batched by flm's GPT and by the serving model built from the same weights; once every row is padded (the
    first left, or a right shift), decode steps read only the columns right of the smallest pad (the window)."""
    for pos in ("xpos", "rope"):
        m = model(pos)
        served = build_shard(m.cfg, m.state_dict(), 1, positions=13).double() if serving else m
        g = torch.Generator().manual_seed(2)
        seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (12, 10, 12)]
        prompts, joins = [3, 7, 2], {0: 0, 2: 1, 4: 2}  # prompt lengths, step -> seq; `leave`: seq -> length
        batch = SlotBatch(served, max_batch=3, capacity=13)
        rows, release, shifted, windowed = [], [], False, False
        for step in range(12):
            rows = apply_release(rows, release)
            tokens = [seqs[i][n] for i, n in rows]
            new = [joins[step]] if step in joins else []
            pos_before = batch.cache.pos
            kept = apply_release(list(range(batch.rows)), release)  # the rows this step decodes
            windowed |= bool(kept) and min(int(batch.pad[k]) for k in kept) > 0
            logits = batch.step(release, tokens, [seqs[i][:prompts[i]] for i in new])
            shifted |= batch.cache.pos < pos_before
            rows = [(i, n + 1) for i, n in rows] + [(i, prompts[i]) for i in new]
            for b, (i, n) in enumerate(rows):
                alone, _ = m(torch.tensor([seqs[i][:n]]))
                assert torch.allclose(logits[b], alone[0, -1], atol=1e-10, rtol=0), (pos, step, i)
            release = [b for b, (i, n) in enumerate(rows) if n >= leave.get(i, len(seqs[i]))]
        assert shifted
        assert windowed
