"""service/engine.py: continuous batching gives every request exactly what flm/generate.py gives it alone; stop
strings, cancellation and admission limits."""

import asyncio

import pytest

from flm.checkpoint import load_model
from flm.generate import SamplingParams, generate
from service.engine import Engine, EngineConfig
from service.tp import ModelShard

PROMPTS = ["To be, or not", "The king", "O Romeo, Romeo", "What", "My lord,", "Enter", "Good", "I"]


@pytest.fixture(scope="module")
def reference(grown):
    return load_model(grown["final"])


def make_engine(grown, reference, **config) -> Engine:
    model, tokenizer = reference
    # capacity = context + 1: the batch's columns fill up and get shifted left many times
    shard = ModelShard(str(grown["final"]), max_batch=config.get("max_batch", 16), capacity=model.cfg.seq_len + 1,
                       threads=1)
    return Engine(shard, tokenizer, model.cfg.seq_len, EngineConfig(**config))


async def run(engine, tokenizer, jobs):
    """(text, finish_reason, tokens) per (prompt, params, delay in s), submitted concurrently."""
    async def one(prompt, params, delay):
        await asyncio.sleep(delay)
        text, reason, n = "", None, 0
        async for d in engine.submit(tokenizer.encode(prompt), params):
            text, reason, n = text + d.text, d.finish_reason, n + d.tokens
        return text, reason, n

    return await asyncio.gather(*(one(*job) for job in jobs))


def test_requests_joining_a_running_batch_equal_generating_alone(grown, reference):
    model, tok = reference
    engine = make_engine(grown, reference, max_batch=3)  # 8 requests: some wait for a free row
    # three at once fill the batch whatever the machine's speed; the others arrive while it runs
    jobs = [(p, SamplingParams(max_tokens=24 - 2 * i, temperature=0.0 if i % 2 else 0.9, top_k=(i % 3) * 10,
                               top_p=0.95 if i % 4 == 2 else 1.0, seed=i), 0.02 * max(0, i - 2))
            for i, p in enumerate(PROMPTS)]
    try:
        got = asyncio.run(run(engine, tok, jobs))
        assert engine.load()["peak_batch"] == 3
    finally:
        engine.close()
    for (prompt, params, _), (text, reason, n) in zip(jobs, got, strict=True):
        want = generate(model, tok, [prompt], params)[0]
        assert (text, reason, n) == (want.text, want.finish_reason, len(want.tokens)), prompt


def test_stop_string_ends_the_text_and_is_never_streamed(grown, reference):
    model, tok = reference
    free = generate(model, tok, ["The king"], SamplingParams(max_tokens=20))[0].text
    stop = free[6:9]  # a stop string the greedy continuation reaches mid-way
    params = SamplingParams(max_tokens=20, stop=[stop])
    engine = make_engine(grown, reference)
    try:
        async def deltas():
            return [d async for d in engine.submit(tok.encode("The king"), params)]

        parts = asyncio.run(deltas())
    finally:
        engine.close()
    text = "".join(d.text for d in parts)
    assert text == free[:free.find(stop)] == generate(model, tok, ["The king"], params)[0].text
    assert parts[-1].finish_reason == "stop"
    assert all(stop not in "".join(d.text for d in parts[:k]) for k in range(len(parts) + 1))


def test_held_back_is_the_longest_stop_prefix_at_the_end_and_does_not_scan_the_text():
    """held_back equals the definition (every prefix tried on a copy of the text) on random cases, and its cost per
    token does not grow with the text: 4 stops of 256 characters against 10 MB of text, 100 times, in well under a
    second (the definition copied the text once per prefix: 1,020 copies of 10 MB per token)."""
    import random
    import time

    from service.engine import held_back

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 12)))
        stop = "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 6)))
        end = rng.randint(0, len(text))
        want = max((k for k in range(1, len(stop)) if text[:end].endswith(stop[:k])), default=0)
        assert held_back(text, end, stop) == want, (text, end, stop)
    text = "ab" * 5_000_000
    stops = ["b" + "ab" * 127 + "c", "a" * 255 + "c", "ba" * 128, "x" * 256]
    t0 = time.perf_counter()
    holds = [max(held_back(text, len(text), s) for s in stops) for _ in range(100)]
    assert holds[0] == 255 and time.perf_counter() - t0 < 1.0


def test_cancelled_request_leaves_the_batch(grown, reference):
    _, tok = reference
    engine = make_engine(grown, reference)
    try:
        async def cancel_after_two():
            stream = engine.submit(tok.encode("To be"), SamplingParams(max_tokens=25))
            got = [await stream.__anext__(), await stream.__anext__()]
            stream.cancel()
            other = await engine.complete(tok.encode("The"), SamplingParams(max_tokens=3))  # a step frees the row
            return got, other

        got, other = asyncio.run(cancel_after_two())
        assert len(got) == 2 and other.completion_tokens == 3
        assert engine.load()["running"] == 0
    finally:
        engine.close()


def test_admission_keeps_reserved_tokens_within_the_budget(grown, reference):
    model, tok = reference
    engine = make_engine(grown, reference, max_batch_tokens=model.cfg.seq_len)  # room for one full request
    jobs = [(p, SamplingParams(max_tokens=20), 0.0) for p in PROMPTS[:3]]
    try:
        got = asyncio.run(run(engine, tok, jobs))
        assert engine.load()["peak_batch"] == 1
    finally:
        engine.close()
    assert [g[0] for g in got] == [generate(model, tok, [p], SamplingParams(max_tokens=20))[0].text
                                   for p, _, _ in jobs]


def test_requests_that_cannot_fit_are_refused(grown, reference):
    model, tok = reference
    engine = make_engine(grown, reference)
    try:
        async def submit(ids, n):
            engine.submit(ids, SamplingParams(max_tokens=n))

        for ids, n in (([], 4), ([1] * (model.cfg.seq_len - 3), 4)):
            with pytest.raises(ValueError):
                asyncio.run(submit(ids, n))
    finally:
        engine.close()
