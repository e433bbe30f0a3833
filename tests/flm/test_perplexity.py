"""Held-out perplexity: the windows score every token once, the batched scorer matches direct computations, a
trained checkpoint beats its step-0 init, and bad input is one line with exit code 2."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flm.checkpoint import load_model, save_checkpoint
from flm.cli import main
from flm.data import Manifest, Tokenizer
from flm.model import GPT
from flm.perplexity import split_nll, windows
from flm.train import Trainer
from tests.conftest import micro_plan


@pytest.fixture(scope="module")
def run(micro_data, tmp_path_factory):
    """Stage 0 of the micro plan trained (12 steps), and its step-0 init saved as a checkpoint beside it."""
    out = tmp_path_factory.mktemp("ppl-run")
    plan = micro_plan(micro_data, out)
    Trainer(plan).fit(stages=[0])
    init = GPT(plan.model_configs()[0], generator=torch.Generator().manual_seed(plan.seed))  # the Trainer's init
    save_checkpoint(out / "init", init.cfg, init.state_dict(), tokenizer_dir=micro_data / "tokenizer")
    return out / "checkpoints" / "step_00000012", out / "init"


def val_tokens(data, n):
    m = Manifest.load(data)
    return np.memmap(data / m.splits["val"].shards[0].file, dtype=m.dtype, mode="r")[:n].astype(np.int64)


@pytest.mark.parametrize("n,seq_len,stride", [(2, 4, 4), (9, 4, 4), (10, 4, 4), (23, 8, 3), (23, 8, 1), (5, 8, 8)])
def test_windows_score_every_token_once_with_enough_context(n, seq_len, stride):
    scored = []
    for k, (start, first, end) in enumerate(windows(n, seq_len, stride)):
        assert 0 <= start < first < end <= n and end - 1 - start <= seq_len  # fits the context
        if k:  # past the first window, every scored token sees at least seq_len - stride + 1 tokens
            assert first - start >= seq_len - stride + 1
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_non_overlapping_windows_are_the_training_loss(run, micro_data):
    """stride = seq_len: the mean NLL over 5 windows of 33 tokens equals the model's own loss on them."""
    model, _ = load_model(run[0])
    L = model.cfg.seq_len
    tokens = torch.from_numpy(val_tokens(micro_data, 5 * L + 1))
    x = torch.stack([tokens[i * L:(i + 1) * L] for i in range(5)])
    y = torch.stack([tokens[i * L + 1:(i + 1) * L + 1] for i in range(5)])
    with torch.no_grad():
        _, loss = model(x, y)
    total, count, n_windows = split_nll(model, micro_data, max_tokens=5 * L + 1, batch_size=2)
    assert (count, n_windows) == (5 * L, 5)
    assert total / count == pytest.approx(loss.item(), abs=1e-5)


def test_strided_windows_match_token_by_token_computation(run, micro_data):
    """stride 1: token j is predicted from exactly the min(j, seq_len) tokens before it, one forward pass each."""
    model, _ = load_model(run[0])
    L, n = model.cfg.seq_len, 40
    tokens = val_tokens(micro_data, n)
    direct = 0.0
    with torch.no_grad():
        for j in range(1, n):
            logits, _ = model(torch.from_numpy(tokens[max(0, j - L):j])[None])
            direct -= F.log_softmax(logits[0, -1].double(), -1)[tokens[j]].item()
    total, count, _ = split_nll(model, micro_data, stride=1, max_tokens=n, batch_size=8)
    assert count == n - 1
    assert total == pytest.approx(direct, rel=1e-5)


def test_trained_checkpoint_beats_its_init_through_the_cli(run, micro_data, tmp_path, capsys):
    """On the split's first 2049 tokens (the whole split takes 10x longer and tells nothing more here)."""
    ppl = {}
    for name, ck in zip(("trained", "init"), run, strict=True):
        assert main(["eval", str(ck), "--suite", "perplexity", "--data", str(micro_data), "--max-tokens", "2049",
                     "--out", str(tmp_path / name)]) == 0
        result = json.loads((tmp_path / name / "perplexity.json").read_text())
        assert (result["tokens"], result["windows"], result["stride"]) == (2048, 64, 32)
        assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
        ppl[name] = result["ppl"]
    assert ppl["trained"] < 0.8 * ppl["init"], ppl
    assert "val perplexity" in capsys.readouterr().out


def exits_with_one_line(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("flm: error:") and all(w in err for w in words), err


def test_bad_input(run, micro_data, tmp_path, capsys):
    trained = str(run[0])
    exits_with_one_line(capsys, ["eval", trained, "--suite", "perplexity", "--data", str(micro_data),
                                 "--stride", "0"], "stride", "between 1 and the context length 32")
    exits_with_one_line(capsys, ["eval", trained, "--suite", "perplexity", "--data", str(micro_data),
                                 "--split", "test"], "no test tokens", "train, val")
    exits_with_one_line(capsys, ["eval", trained, "--suite", "perplexity", "--data", str(tmp_path)],
                        "not a prepared dataset")
    exits_with_one_line(capsys, ["eval", str(tmp_path), "--suite", "perplexity", "--data", str(micro_data)],
                        "not a checkpoint")
    other = tmp_path / "other-ck"  # the same weights with another tokenizer: a perplexity is per token
    ck = load_model(trained)[0]
    Tokenizer.train(["a few words of another corpus"] * 4, vocab_size=300).save(tmp_path / "tok")
    save_checkpoint(other, ck.cfg, ck.state_dict(), tokenizer_dir=tmp_path / "tok")
    exits_with_one_line(capsys, ["eval", str(other), "--suite", "perplexity", "--data", str(micro_data)],
                        "tokenized differently")
    exits_with_one_line(capsys, ["eval", str(run[1]), "--suite", "perplexity"], "not inside a run directory",
                        "--data")
