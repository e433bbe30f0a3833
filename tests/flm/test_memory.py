"""flm/memory.py: the memory planner's estimates against the real FSDP2 x TP sharding of the 101B plan (built on the
meta device over a fake process group of 192 ranks), and what `flm plan` prints."""

import json
from pathlib import Path

import pytest

from flm.config import GrowthPlan, load_plan
from flm.memory import GIB, plan_memory, stage_memory

PLAN = Path(__file__).parents[2] / "configs" / "flm-101b.yaml"


def test_dry_run_of_the_101b_plan_agrees_with_the_estimates():
    """All three stages sharded by flm/parallelize.py over 192 fake ranks: each rank's fp32 params + grads + AdamW
    from the shard shapes within 5% of the planner's estimate, and every stage fits an 80 GiB GPU."""
    plan = load_plan(PLAN)
    stages = plan_memory(plan, dry_run=True)
    assert [(m.name, m.tp, m.dp) for m in stages] == [("16B", 2, 96), ("51B", 4, 48), ("101B", 8, 24)]
    for m in stages:
        assert m.states_error <= 0.05, m
        assert m.fits and m.total <= 80 * GIB
    # 101.7B parameters x 16 bytes / 192 GPUs = 8.5 GB if everything split 192 ways; the 1.03B-value embedding is
    # replicated over tp 8 (sharded 24 ways only), which adds 0.6 GB
    assert 8.4e9 < stages[-1].measured_states < 9.2e9


def test_activation_checkpointing_and_a_small_gpu():
    plan = load_plan(PLAN)
    m = stage_memory(plan, 2)
    assert m.activation_checkpointing and m.activations == m.activations_with_ac < m.activations_without_ac
    assert not stage_memory(plan, 2, gpu_mem=16 * GIB).fits


def test_pipeline_parallelism_is_refused_with_a_one_line_fix():
    data = load_plan(PLAN).model_dump()
    data["stages"][2]["layout"]["pp"] = 4
    with pytest.raises(ValueError, match="pipeline parallelism is not implemented"):
        GrowthPlan.model_validate(data)
    data["stages"][2]["layout"] = {"workers": 192, "tp": 8}  # tp without fsdp
    with pytest.raises(ValueError, match="needs backend: fsdp"):
        GrowthPlan.model_validate(data)


def test_cli_prints_the_memory_table_and_json(capsys):
    from flm.cli import main

    assert main(["plan", str(PLAN), "--json", "--gpu-mem", "16"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert [m["fits"] for m in memory] == [True, False, False]
    assert main(["plan", str(PLAN), "--gpu-mem", "0"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-mem" in err and len(err.strip().splitlines()) == 1


def test_serving_the_101b_model_at_tp8():
    """Weights per rank and the KV tokens that fit: 101B at TP 8 in bf16 on 80 GiB (what `flm plan` prints)."""
    from flm.memory import serve_memory

    cfg = load_plan(PLAN).model_configs()[-1]
    m = serve_memory(cfg, 8)
    assert m.kv_bytes_per_token == 2 * 80 * 10240 // 8 * 2  # K and V, 80 layers, 10 heads of 128, bf16
    assert 25 * GIB < m.weight_bytes < 26 * GIB  # 100.7B split 8 ways + the replicated 1.03B embedding, 2 B each
    assert m.fits and m.kv_tokens == (80 * GIB - m.weight_bytes - 8 * GIB) // m.kv_bytes_per_token
    assert not serve_memory(cfg, 1).fits  # 203 GB of bf16 weights on one GPU
