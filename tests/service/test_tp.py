"""service/tp.py on a real local Ray cluster: TP = 2 shards of a grown checkpoint (finished, and mid-ramp with its
growth masks) give the single-process model's logits and greedy generations; each rank reads only its slices; a
dead rank fails fast instead of hanging the others."""

import asyncio
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from flm.checkpoint import load_model
from flm.config import FLMConfigError, ModelConfig
from flm.generate import SamplingParams, generate
from service.engine import Engine
from service.tp import ShardGroup, read_config, read_shard_state, shard_config

SHARDED = ("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias", "attn.v.weight", "attn.v.bias",
           "attn.proj.weight", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight",
           "head_mask", "ffn_mask")


@pytest.fixture(scope="module")
def group(ray_cluster, grown):
    g = ShardGroup(str(grown["final"]), 2, num_cpus=0.5, max_batch=4)
    yield g
    g.shutdown()


@pytest.fixture(params=["final", "ramp"])
def which(request, group, grown):
    """Each test runs on both checkpoints, swapped into the same two actors."""
    group.load(str(grown[request.param]))
    return request.param


def test_tp2_logits_equal_the_single_process_model(group, grown, which):
    model, _ = load_model(grown[which])
    assert model.growing == (which == "ramp")  # the mid-ramp checkpoint carries its masks
    idx = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model(idx)
    got = group.logits(idx.tolist())
    assert (got - want).abs().max().item() <= 1e-5


def test_tp2_incremental_decoding_with_rows_joining(group, grown, which):
    """Prefill, KV-cached decode steps and a second row joining mid-way, on both ranks: each row's logits equal the
    single-process full forward of its sequence."""
    model, _ = load_model(grown[which])
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.cfg.vocab_size, (20,), generator=g).tolist() for _ in range(2)]
    worst = 0.0
    rows = []  # (sequence, tokens so far)
    for step in range(10):
        tokens = [seqs[i][n] for i, n in rows]
        new = [1] if step == 4 else [0] if step == 0 else []
        logits = group.step([], tokens, [seqs[i][:8] for i in new])
        rows = [(i, n + 1) for i, n in rows] + [(i, 8) for i in new]
        for b, (i, n) in enumerate(rows):
            with torch.no_grad():
                alone, _ = model(torch.tensor([seqs[i][:n]]))
            worst = max(worst, (logits[b] - alone[0, -1]).abs().max().item())
    assert worst <= 1e-5


def test_tp2_greedy_generations_equal_flm_generate(group, grown, which):
    model, tok = load_model(grown[which])
    engine = Engine(group, tok, model.cfg.seq_len)
    prompts = ["To be, or not", "The king", "O Romeo", "Enter"]
    params = SamplingParams(max_tokens=16)

    async def all_at_once():
        return await asyncio.gather(*(engine.complete(tok.encode(p), params) for p in prompts))

    try:
        got = asyncio.run(all_at_once())
    finally:
        engine.close()
    want = generate(model, tok, prompts, params)
    assert [(r.text, r.finish_reason) for r in got] == [(w.text, w.finish_reason) for w in want]
    assert all(r.completion_tokens == len(w.tokens) for r, w in zip(got, want, strict=True))


def test_each_rank_reads_only_its_slices(group, grown):
    ck = grown["ramp"]
    group.load(str(ck))
    cfg = read_config(ck)
    full = load_file(ck / "model.safetensors")
    sharded = sum(t.numel() for k, t in full.items() if k.endswith(SHARDED))
    replicated = sum(t.numel() for k, t in full.items() if not k.endswith(SHARDED))
    info = group.info()
    assert [i["loaded_numel"] for i in info] == [replicated + sharded // 2] * 2
    # rank 1's rows of q, k and v are those of heads 2 and 3
    rank1 = read_shard_state(ck, cfg, 1, 2)
    for part in "qkv":
        rows = full[f"blocks.0.attn.{part}.weight"][2 * cfg.head_dim:]
        assert torch.equal(rank1[f"blocks.0.attn.{part}.weight"], rows)
    assert torch.equal(rank1["blocks.0.mlp.proj.weight"], full["blocks.0.mlp.proj.weight"][:, cfg.d_ffn // 2:])
    assert torch.equal(rank1["blocks.0.attn.head_mask"], full["blocks.0.attn.head_mask"][2:])


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    cfg = ModelConfig(n_layer=1, d_model=64, n_head=4, vocab_size=50)
    assert shard_config(cfg, 4).n_head == 1
    with pytest.raises(FLMConfigError, match="--tp: 3 must divide"):
        shard_config(cfg, 3)


def test_a_dead_rank_fails_fast(group):
    """Rank 1 killed: the next step raises within seconds (rank 0 is stuck in an all-reduce), the check fails."""
    ray.kill(group.actors[1])
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        group.step([], [], [[1, 2, 3]])
    assert time.monotonic() - start < 30
    with pytest.raises(ray.exceptions.RayActorError):
        group.check()


@pytest.mark.parametrize("which", ["final", "ramp"])
def test_ranks_read_their_slices_of_a_sharded_checkpoint(grown, tmp_path, which):
    """A sharded (DCP) checkpoint of the same weights, written by backend fsdp's code: each rank's slices (masks
    included, mid-ramp) equal those read from the single-file checkpoint."""
    import torch.distributed as td

    from flm import mup
    from flm.checkpoint import load_checkpoint
    from flm.fsdp import FSDPDist
    from flm.parallelize import gather_masks
    from flm.sharded import save_sharded

    src = grown[which]
    ck = load_checkpoint(src, tensors=False)
    td.init_process_group("gloo", rank=0, world_size=1, store=td.HashStore())
    try:
        dist = FSDPDist()
        model = dist.build_model(ck.config, 0, ck)
        optimizer = torch.optim.AdamW(mup.param_groups(model, ck.config, 1e-3, 0.0))
        save_sharded(tmp_path / "sharded", ck.config, model, optimizer, gather_masks(model, dist.mesh),
                     {"step": 0}, None, None, True)
    finally:
        td.destroy_process_group()
    assert read_config(tmp_path / "sharded") == ck.config
    for rank in range(2):
        want = read_shard_state(src, ck.config, rank, 2)
        got = read_shard_state(tmp_path / "sharded", ck.config, rank, 2)
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
