"""`flm lm-eval --model flm` end to end on three local tasks (a task YAML + a JSONL each, no download), one per
request type, checked number by number against direct computations with our model."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from flm.checkpoint import save_checkpoint
from flm.cli import main
from flm.config import ModelConfig
from flm.data import Tokenizer
from flm.model import GPT

pytest.importorskip("lm_eval")

TASKS = {
    "flm_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "flm_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
    "flm_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
LONG = ("Now is the winter of our discontent made glorious summer by this sun of York, and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried.")


@pytest.fixture(scope="module")
def checkpoint(micro_data, tmp_path_factory):
    """A random model whose predictions are peaked (init_std 0.1, output temperature 8), so that a log-likelihood
    read one position off would not pass for the right one; seq_len 32 makes the long inputs need windows."""
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=32, output_mult=8.0, base_width=32,
                      init_std=0.1)
    model = GPT(cfg, generator=torch.Generator().manual_seed(0)).eval()
    path = tmp_path_factory.mktemp("lm-eval") / "ck"
    save_checkpoint(path, cfg, model.state_dict(), tokenizer_dir=micro_data / "tokenizer")
    return path, model, Tokenizer.load(micro_data / "tokenizer")


def logprob(model, ids, n):
    """log p(last n tokens | the ones before), one unbatched forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = F.log_softmax(logits[0].double(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids))), all(
        logp[i - 1].argmax().item() == ids[i] for i in range(len(ids) - n, len(ids)))


def greedy(model, tok, prompt, max_tokens, keep):
    """Greedy decoding without the KV cache, the prompt cut to its last `keep` tokens, cut at the first newline."""
    ids, new = tok.encode(prompt)[-keep:], []
    with torch.no_grad():
        for _ in range(max_tokens):
            t = model(torch.tensor([ids + new]))[0][0, -1].argmax().item()
            if t == tok.eot_id:
                break
            new.append(t)
            if "\n" in tok.decode(new):
                break
    return tok.decode(new).split("\n")[0]


def write_tasks(path, docs: dict, monkeypatch) -> None:
    """The tasks of `docs` (name -> documents) as YAML and JSONL files in `path`, and lm-eval set to find only them."""
    import lm_eval.tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # lm-eval indexes its ~13,000 built-in task YAMLs on every run (most of a run's time here): index only ours
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    for name, documents in docs.items():
        (path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
        (path / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {path / name}.jsonl\ntest_split: test\n{TASKS[name]}")


@pytest.fixture
def local_tasks(checkpoint, tmp_path, monkeypatch):
    """The three tasks' YAML and JSONL files in tmp_path; their documents; the greedy generations of their prompts."""
    _, model, tok = checkpoint
    prompts = ["Enter the king.", "First Citizen: Before we proceed", LONG]
    generations = [greedy(model, tok, p, 6, keep=model.cfg.seq_len - 6) for p in prompts]
    docs = {
        "flm_mc": [{"question": q, "choices": c, "answer": a} for q, c, a in [
            ("To be, or not to", ["be", "go home", "sleep"], 0),
            ("My lord, I", ["will", "cannot tell", "am here"], 1),
            (LONG + " And thus", ["I clothe", "we go", "the end"], 2),
            ("The king is", ["dead", "in his counting house", "gone"], 0),
        ]],
        "flm_rolling": [{"text": "A horse!"}, {"text": LONG + " " + LONG}],
        "flm_gen": [{"prompt": p, "target": g if i != 1 else "not this"} for i, (p, g) in
                    enumerate(zip(prompts, generations, strict=True))],
    }
    write_tasks(tmp_path, docs, monkeypatch)
    return docs, generations


def test_lm_eval_runs_our_checkpoint_on_local_tasks(checkpoint, local_tasks, tmp_path):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    path, model, tok = checkpoint
    L = model.cfg.seq_len
    docs, generations = local_tasks
    assert main(["lm-eval", "--model", "flm", "--model_args", f"checkpoint={path}", "--tasks", ",".join(TASKS),
                 "--include_path", str(tmp_path), "--batch_size", "2", "--device", "cpu",
                 "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0

    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {name: sorted((json.loads(line) for f in (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
                             for line in f.read_text().splitlines()), key=lambda s: s["doc_id"]) for name in TASKS}

    # loglikelihood: every choice's (log p, greedy?) and the accuracy they give
    correct = []
    for doc, sample in zip(docs["flm_mc"], samples["flm_mc"], strict=True):
        direct = []
        for choice in doc["choices"]:
            ctx, whole = tok.encode(doc["question"]), tok.encode(doc["question"] + " " + choice)
            direct.append(logprob(model, whole[-(L + 1):], len(whole) - len(ctx)))
        for (lp, is_greedy), ((their_lp, their_greedy),) in zip(direct, sample["resps"], strict=True):
            assert float(their_lp) == pytest.approx(lp, abs=1e-4) and their_greedy == str(is_greedy)
        correct.append(max(range(len(direct)), key=lambda i: direct[i][0]) == doc["answer"])
    assert results["flm_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    # loglikelihood_rolling: lm-eval's reference windows, <|endoftext|> before the first token, one pass each
    for doc, sample in zip(docs["flm_rolling"], samples["flm_rolling"], strict=True):
        ids = tok.encode(doc["text"])
        spans = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.eot_id, L, 1)]
        assert len(spans) == 1 if len(ids) < L else len(spans) > 2
        direct = sum(logprob(model, ctx + pred, len(pred))[0] for ctx, pred in spans)
        ((their,),) = sample["resps"]
        assert float(their) == pytest.approx(direct, rel=1e-5)

    # generate_until: greedy text up to the newline, the long prompt cut to the context the generation leaves
    assert [s["resps"][0][0] for s in samples["flm_gen"]] == generations
    assert results["flm_gen"]["exact_match,none"] == pytest.approx(2 / 3)


def test_bad_checkpoint_is_one_line(local_tasks, tmp_path, capsys):
    assert main(["lm-eval", "--model", "flm", "--model_args", f"checkpoint={tmp_path / 'nope'}", "--tasks",
                 "flm_rolling", "--include_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flm: error:") and "not a checkpoint" in err[-1], err
