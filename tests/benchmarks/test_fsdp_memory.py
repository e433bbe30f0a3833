"""benchmarks/fsdp_memory.py: backend fsdp really shards the model states (issue 13)."""


def test_memory_really_shards():
    """A ~100M-parameter model on 4 ranks (tp 2 x dp 2) after one AdamW step: the worst rank holds <= 1/3 of the
    single process's parameter + gradient + optimizer bytes, and its peak RSS grew <= 1/3 as much."""
    from benchmarks.fsdp_memory import CONFIG, run

    result = run(CONFIG, layouts=((4, 2),))
    layout = result["layouts"]["tp2xdp2"]
    assert result["params"] > 90e6
    assert layout["max_states_ratio"] <= 1 / 3, layout
    assert layout["max_rss_ratio"] <= 1 / 3, layout
