"""IQ backends end to end: a trained checkpoint of ours, and an OpenAI-compatible endpoint (a real HTTP server)."""


import pytest

from flm.config import FLMConfigError
from flm.iq.backends import FLMBackend, OpenAIBackend
from flm.iq.suite import build_items, run_suite
from flm.train import Trainer
from tests.conftest import micro_plan


@pytest.fixture(scope="module")
def checkpoint(micro_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("iq-run")
    Trainer(micro_plan(micro_data, out)).fit(stages=[0])
    return out / "checkpoints" / "step_00000012"


def test_checkpoint_backend_runs_the_suite(checkpoint):
    result = run_suite(FLMBackend(checkpoint), ["counting", "head_tail"], n_items=3, progress=False)
    assert [r.n_items for r in result.subtasks] == [3, 3]
    assert all(0.0 <= r.accuracy <= 100.0 and len(r.predictions) == 3 for r in result.subtasks)


def test_hf_export_of_our_checkpoint_answers_like_our_model(micro_data, tmp_path):
    """The GPT-NeoX export of a RoPE checkpoint, run by transformers, makes our model's greedy predictions."""
    pytest.importorskip("transformers")
    import torch

    from flm.checkpoint import save_checkpoint
    from flm.config import ModelConfig
    from flm.export import export_hf
    from flm.iq.backends import HFBackend
    from flm.model import GPT

    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=64, pos="rope", output_mult=8.0,
                      base_width=32)
    model = GPT(cfg, generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ck", cfg, model.state_dict(), trainer_state={}, tokenizer_dir=micro_data / "tokenizer")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    ours = run_suite(FLMBackend(tmp_path / "ck"), ["head_tail"], n_items=4, progress=False)
    theirs = run_suite(HFBackend(tmp_path / "hf"), ["head_tail"], n_items=4, progress=False)
    assert ours.subtasks[0].predictions == theirs.subtasks[0].predictions
    assert any(p for p in ours.subtasks[0].predictions)  # non-trivial text was compared


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FLMConfigError, match="not a checkpoint"):
        FLMBackend(tmp_path)


@pytest.fixture()
def oracle_server(completions_server):
    answers = {it.prompt: it.answer for its in build_items(["counting"], n_items=5).values() for it in its}
    return completions_server(answers, suffix="\nmore", api_key="k")  # the suite cuts at the newline


def test_endpoint_backend(oracle_server):
    result = run_suite(OpenAIBackend(oracle_server, "m", "k"), ["counting"], n_items=5, progress=False)
    assert result.subtasks[0].accuracy == 100.0


def test_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(FLMConfigError, match="unreachable"):
        OpenAIBackend("http://127.0.0.1:9/v1", timeout=5).generate(["x"], 4, [])
