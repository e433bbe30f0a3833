"""flm/export.py: an exported RoPE checkpoint gives our logits in `transformers`; xPos and mid-ramp are refused."""

import pytest
import torch

from flm.checkpoint import save_checkpoint
from flm.config import FLMConfigError, ModelConfig
from flm.export import export_hf
from flm.growth import grow_model
from flm.model import GPT

transformers = pytest.importorskip("transformers", reason="the [hf] extra is installed by `make setup`")


def trained_like(cfg):
    g = torch.Generator().manual_seed(0)
    model = GPT(cfg, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("tied,bias", [(True, True), (False, False)])
def test_transformers_reproduces_our_logits(tmp_path, tied, bias):
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=97, seq_len=32, pos="rope", base_width=16,
                      input_mult=1.7, output_mult=2.0, tie_embeddings=tied, bias=bias)
    model = trained_like(cfg).eval()
    save_checkpoint(tmp_path / "ck", cfg, model.state_dict())
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_xpos_and_ramping_checkpoints_are_refused(tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=50, seq_len=16)
    save_checkpoint(tmp_path / "xpos", cfg, GPT(cfg).state_dict())
    with pytest.raises(FLMConfigError, match="xPos"):
        export_hf(tmp_path / "xpos", tmp_path / "out")
    rope = ModelConfig(**{**cfg.model_dump(), "pos": "rope"})
    grown = grow_model(GPT(rope), ModelConfig(**{**rope.model_dump(), "n_layer": 2}))
    save_checkpoint(tmp_path / "ramp", grown.cfg, grown.state_dict())
    with pytest.raises(FLMConfigError, match="ramp is in progress"):
        export_hf(tmp_path / "ramp", tmp_path / "out")
