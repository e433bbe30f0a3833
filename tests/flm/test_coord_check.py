"""μP keeps activation scales flat in width; standard parametrisation does not (flm/coord_check.py)."""

from flm.config import ModelConfig
from flm.coord_check import coord_check, logit_growth


def test_mup_logits_are_flat_in_width_and_sp_logits_are_not():
    base = ModelConfig(n_layer=2, d_model=32, n_head=1, head_dim=32, vocab_size=64, seq_len=16)
    result = coord_check(base, widths=[32, 128, 512], steps=4, lr=1e-2)
    mup, sp = logit_growth(result, "mup"), logit_growth(result, "sp")
    assert 0.5 < mup < 2.0, mup  # 16x the width, about the same logits
    assert sp > 3 * mup, (sp, mup)
