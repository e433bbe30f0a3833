"""flm/offline_growth.py: a checkpoint grown on disk tensor by tensor, shared over ranks in any order, equals growth
in memory bit for bit; the streaming safetensors writer writes what safetensors reads."""

import pytest
import torch
from safetensors.torch import load_file

from flm import mup
from flm.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from flm.config import ModelConfig
from flm.growth import grow_model, growth_steps, transfer_adamw_state
from flm.model import GPT
from flm.offline_growth import SafetensorsWriter, finish_growth, grow_checkpoint, grow_share, prepare_growth

OLD = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, seq_len=16, base_width=32, output_mult=2.0)
NEW = ModelConfig(**{**OLD.model_dump(), "n_layer": 3, "d_model": 64, "n_head": 4, "d_ffn": 256})


def test_streaming_writer_round_trips(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float32), "c": torch.tensor(0.5),
               "d": torch.randn(4, 2).to(torch.bfloat16)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()])
    with pytest.raises(ValueError, match="expected \\('a'"):
        w.write("b", tensors["b"])  # out of order
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.fixture
def trained(tmp_path):
    """A checkpoint of OLD after two AdamW steps (moments and a step count of 2), as the trainer writes it."""
    torch.manual_seed(0)
    model = GPT(OLD, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(mup.param_groups(model, OLD, 1e-3, 0.1))
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    return save_checkpoint(tmp_path / "old", OLD, model.state_dict(), opt.state_dict(), {"step": 2}), model, opt


@pytest.mark.parametrize("world", [1, 3])
def test_grown_on_disk_equals_grown_in_memory(trained, tmp_path, world):
    path, model, opt = trained
    order, placement = ("depth", "width", "heads", "ffn"), "interleave"
    gen = torch.Generator().manual_seed(7)
    new = grow_model(model, NEW, order, placement, gen)
    new_opt = torch.optim.AdamW(mup.param_groups(new, NEW, 1e-3, 0.1))
    transfer_adamw_state(opt, model, new_opt, new, placement)

    dst = tmp_path / "grown"
    if world == 1:
        grow_checkpoint(path, dst, NEW, order, placement, seed=7)
    else:
        tmp = prepare_growth(dst)
        for rank in reversed(range(world)):  # any order: each tensor has its own generator
            grow_share(path, tmp, NEW, order, placement, seed=7, rank=rank, world=world)
        finish_growth(path, tmp, dst, NEW, order, placement)
    verify_checkpoint(dst)
    ck = load_checkpoint(dst)
    assert ck.config == NEW and len(list(dst.glob("model-0*.safetensors"))) == world
    want = new.state_dict()
    assert ck.model.keys() == want.keys() and all(torch.equal(ck.model[k], v) for k, v in want.items())
    got_opt = ck.optimizer["state"]
    for i, s in new_opt.state_dict()["state"].items():
        assert all(torch.equal(got_opt[i][key], s[key]) for key in s)
    assert len(growth_steps(OLD, NEW, order, placement)) == 4
    # the grown checkpoint trains on: loaded whole into a model and an optimizer of the new shape
    loaded = GPT.from_state(NEW, ck.model)
    o = torch.optim.AdamW(mup.param_groups(loaded, NEW, 1e-3, 0.1))
    o.load_state_dict({"param_groups": o.state_dict()["param_groups"], **ck.optimizer})
    idx = torch.randint(0, 64, (2, 16))
    loaded(idx, idx)[1].backward()
    o.step()
