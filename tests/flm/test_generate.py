"""flm/generate.py: batched decoding equals one-by-one decoding, sampling is seeded, stop strings end the text."""

import pytest
import torch

from flm.config import ModelConfig
from flm.generate import SamplingParams, generate, generate_tokens
from flm.model import GPT


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=50, seq_len=32, base_width=32, output_mult=4.0)
    m = GPT(cfg, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    return m


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


def test_padded_forward_equals_forward_alone(model):
    longest = max(map(len, PROMPTS))
    idx = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    pad = torch.tensor([longest - len(p) for p in PROMPTS])
    batched, _ = model(idx, pad=pad)
    for b, p in enumerate(PROMPTS):
        alone, _ = model(torch.tensor([p]))
        assert torch.allclose(batched[b, pad[b]:], alone[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12),
                                    SamplingParams(max_tokens=12, temperature=0.8, top_k=10, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_batched_generation_equals_one_by_one(model, params):
    batched = generate_tokens(model, PROMPTS, params)
    if params.temperature:  # sampling draws from one generator for the batch: compare greedy-equivalent per row
        assert generate_tokens(model, PROMPTS, params) == batched  # seeded: reproducible
        assert generate_tokens(model, PROMPTS, params.model_copy(update={"seed": 4})) != batched
        return
    assert batched == [generate_tokens(model, [p], params)[0] for p in PROMPTS]
    assert all(len(row) == 12 for row in batched)


def test_greedy_is_the_argmax_continuation(model):
    seq = list(PROMPTS[0])
    for _ in range(5):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert generate_tokens(model, [PROMPTS[0]], SamplingParams(max_tokens=5))[0] == seq[len(PROMPTS[0]):]


def test_top_k_one_is_greedy(model):
    greedy = generate_tokens(model, PROMPTS, SamplingParams(max_tokens=8))
    assert generate_tokens(model, PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=0)) == greedy


class Letters:
    """A codec mapping token t to one character, so stop strings are easy to place."""

    def __init__(self, eot_id=999):
        self.eot_id = eot_id

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i) if 0 < i < 27 else "#" for i in ids)


def test_stop_strings_and_eot(model):
    full = generate(model, Letters(), ["abc"], SamplingParams(max_tokens=10))[0]
    assert full.finish_reason == "length" and len(full.tokens) == 10 and full.prompt_tokens == 3
    stop = full.text[3:5]
    cut = generate(model, Letters(), ["abc"], SamplingParams(max_tokens=10, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert len(cut.tokens) < 10  # decoding stopped early, not only the text
    first = full.tokens[0]
    ended = generate(model, Letters(eot_id=first), ["abc"], SamplingParams(max_tokens=10))[0]
    assert ended.finish_reason == "stop" and ended.tokens == [] and ended.text == ""
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]], SamplingParams())
