"""flm/config.py: plans resolve deltas, and every invalid plan is refused with the field named."""

import copy

import pytest

from flm.config import FLMConfigError, GrowthPlan, ModelConfig, parse

BASE = {
    "name": "t",
    "stages": [
        {"model": {"n_layer": 2, "d_model": 64, "n_head": 2, "vocab_size": 100, "seq_len": 32},
         "tokens": 32768, "lr": 1e-3, "batch_size": 8},
        {"grow": {"n_layer": 4, "d_model": 128, "n_head": 4}, "tokens": 32768, "lr": 1e-3, "batch_size": 8,
         "ramp_steps": 16},
    ],
}


def with_change(path: str, value):
    data = copy.deepcopy(BASE)
    *keys, last = path.split(".")
    node = data
    for k in keys:
        node = node[int(k)] if k.isdigit() else node[k]
    node[last] = value
    return data


def test_delta_resolves_to_full_config():
    plan = GrowthPlan.model_validate(BASE)
    first, second = plan.model_configs()
    assert (second.n_layer, second.d_model, second.n_head, second.head_dim) == (4, 128, 4, 32)
    assert second.d_ffn == 4 * 128  # the 4·d ratio follows the width
    assert second.vocab_size == first.vocab_size
    assert plan.steps(1) == 32768 // (8 * 32)


def test_derived_fields():
    cfg = ModelConfig(n_layer=1, d_model=96, n_head=3, vocab_size=10)
    assert (cfg.head_dim, cfg.d_ffn, cfg.attn_dim, cfg.width_mult) == (32, 384, 96, 96 / 256)


# Each invalid case of the foundation issue, with the field its message must name.
BAD = [
    ("shrink", "stages.1.grow.n_layer", 1, "stages.1.n_layer"),
    ("heads do not divide", "stages.0.model.n_head", 3, "n_head"),
    ("head_dim changes", "stages.1.grow", None, "stages.1.head_dim"),
    ("ramp longer than stage", "stages.1.ramp_steps", 10_000, "stages.1.ramp_steps"),
    ("unknown key", "stages.0.model.n_layers", 3, "n_layers"),
    ("unknown top-level key", "learning_rate", 1e-3, "learning_rate"),
    ("negative lr", "stages.0.lr", -1.0, "stages.0.lr"),
]


@pytest.mark.parametrize("case,path,value,field", BAD, ids=[b[0] for b in BAD])
def test_invalid_plans_name_the_field(case, path, value, field):
    data = with_change(path, value)
    if case == "head_dim changes":
        data["stages"][1] = {**data["stages"][1], "grow": None,
                             "model": {**data["stages"][0]["model"], "n_head": 4}}  # head_dim 32 -> 16
    with pytest.raises(FLMConfigError) as err:
        parse(GrowthPlan, data, "plan.yaml")
    message = str(err.value)
    assert field in message and "\n" not in message
