"""benchmarks/fsdp_memory.py: backend fsdp really shards the model states (issue 13)."""


def test_memory_really_shards():
    """A ~100M-parameter model on 4 ranks after one AdamW step. tp 2 x dp 2 and dp 4: the worst rank holds <= 1/3 of
    the single process's parameter + gradient + optimizer bytes. dp 4: its peak RSS also grew <= 1/3 as much
    (measured 0.28; tp 2 x dp 2 measured 0.30, too near the bound to assert on a shared machine: README)."""
    from benchmarks.fsdp_memory import CONFIG, run

    result = run(CONFIG, layouts=((4, 2), (4, 1)))
    assert result["params"] > 90e6
    for layout in result["layouts"].values():
        assert layout["max_states_ratio"] <= 1 / 3, layout
    assert result["layouts"]["tp1xdp4"]["max_rss_ratio"] <= 1 / 3, result["layouts"]["tp1xdp4"]
