"""Perplexity on a held-out split: the honest metric for small models, whose IQ-test exact-match scores stay near
zero long after their held-out loss has started to fall.

Windows. Each shard of the split (a stream of documents, each followed by `<|endoftext|>`) is scored on its own,
and every token of it but the first is predicted exactly once. A window feeds at most `seq_len` tokens (the
model's context) and scores the predictions of the tokens it adds: the first window scores `seq_len` tokens, each
next one the `stride` tokens after them, conditioned on the `seq_len` tokens before the last of them, so every token
past the first window sees at least `seq_len - stride + 1` tokens of context. The default, stride = seq_len, gives
non-overlapping windows (the training's validation windows: a token sees 1..seq_len tokens of context); a smaller
stride costs seq_len / stride times more forward passes and gives a lower, longer-context perplexity.

The metric is the token-weighted mean negative log-likelihood (nats per token) over the whole split, and its exp.
The split must be tokenized by the checkpoint's own tokenizer (checked): a perplexity is per token.
"""

from __future__ import annotations

import filecmp
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from rich.progress import Progress

from flm.config import FLMConfigError, GrowthPlan
from flm.data import Manifest
from flm.model import GPT


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, first, end) per window over a stream of `n_tokens`: feed tokens[start:end - 1], score the
    predictions of tokens[first:end]. Together the windows score tokens 1..n_tokens - 1 once each."""
    if not 1 <= stride <= seq_len:
        raise FLMConfigError(f"stride must be between 1 and the context length {seq_len}, got {stride}")
    first = 1
    while first < n_tokens:
        end = min(first + (seq_len if first == 1 else stride), n_tokens)
        yield max(0, end - 1 - seq_len), first, end
        first = end


@torch.no_grad()
def continuation_logprobs(model: GPT, sequences: Sequence[Sequence[int]], n_scored: Sequence[int],
                          batch_size: int = 16) -> list[tuple[float, bool]]:
    """Per token sequence: the log-probability (nats) of its last `n` tokens given the ones before them, and
    whether greedy decoding would produce exactly those tokens. Sequences hold at most seq_len + 1 tokens; batches
    are right-padded (causal attention keeps the padding out of every scored position)."""
    limit = model.cfg.seq_len + 1
    for seq, n in zip(sequences, n_scored, strict=True):
        if not 1 <= n < len(seq) <= limit:
            raise ValueError(f"cannot score the last {n} of {len(seq)} tokens with a context of {limit - 1}")
    device = model.wte.weight.device
    was = model.training
    model.eval()
    out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        width = len(sequences[rows[0]]) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(sequences[i]) - 1] = torch.as_tensor(sequences[i][:-1])
        logits, _ = model(x.to(device))
        for r, i in enumerate(rows):
            seq, n = sequences[i], n_scored[i]
            target = torch.as_tensor(seq[-n:], device=device)
            step = logits[r, len(seq) - 1 - n:len(seq) - 1].float()
            logp = F.log_softmax(step, -1).gather(-1, target[:, None]).double().sum().item()
            out[i] = (logp, bool((step.argmax(-1) == target).all()))
    model.train(was)
    return out


class PerplexityResult(BaseModel):
    """Held-out perplexity of one checkpoint on one split of a prepared dataset."""

    checkpoint: str
    data: str
    split: str
    seq_len: int
    stride: int
    windows: int
    tokens: int  # tokens scored: the split's tokens (or --max-tokens of them) minus one per shard
    nll: float  # token-weighted mean negative log-likelihood, nats per token
    ppl: float  # exp(nll)
    seconds: float


def split_nll(model: GPT, data: str | Path, split: str = "val", stride: int | None = None,
              max_tokens: int | None = None, batch_size: int = 16, progress: bool = False) -> tuple[float, int, int]:
    """(summed NLL in nats, tokens scored, windows) of `model` over a split; `max_tokens`: only the split's first
    that many tokens (shards in order), for a quick estimate."""
    manifest = Manifest.load(data)
    if split not in manifest.splits or not manifest.splits[split].tokens:
        raise FLMConfigError(f"{data} has no {split} tokens; splits: {', '.join(manifest.splits)}")
    if max_tokens is not None and max_tokens < 2:
        raise FLMConfigError(f"max_tokens must be at least 2, got {max_tokens}")
    seq_len = model.cfg.seq_len
    stride = seq_len if stride is None else stride
    streams, left = [], max_tokens if max_tokens is not None else math.inf
    for shard in manifest.splits[split].shards:
        if left < 2:
            break
        stream = np.memmap(Path(data) / shard.file, dtype=manifest.dtype, mode="r")
        streams.append(stream[:int(min(len(stream), left))])
        left -= len(streams[-1])
    spans = [(stream, w) for stream in streams for w in windows(len(stream), seq_len, stride)]
    total, count = 0.0, 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"perplexity ({split})", total=len(spans))
        for b in range(0, len(spans), batch_size):
            chunk = spans[b:b + batch_size]
            seqs = [stream[start:end].astype(np.int64).tolist() for stream, (start, _, end) in chunk]
            scored = [end - first for _, (_, first, end) in chunk]
            total -= sum(lp for lp, _ in continuation_logprobs(model, seqs, scored, batch_size))
            count += sum(scored)
            bar.advance(task, len(chunk))
    return total, count, len(spans)


def run_dataset(checkpoint: str | Path) -> Path:
    """The dataset a run trained on when `flm train PLAN` was given no --data: the plan's default, prepared under
    $FLM_HOME/data (plan.json, two levels above the checkpoint, records the stages but not the data)."""
    from flm.train import resolve_dataset

    plan_path = Path(checkpoint).resolve().parent.parent / "plan.json"
    if not plan_path.is_file():
        raise FLMConfigError(f"{checkpoint}: not inside a run directory (no {plan_path}); pass --data DIR")
    try:
        plan = GrowthPlan.model_validate(json.loads(plan_path.read_text()))
    except (ValidationError, ValueError) as e:
        raise FLMConfigError(f"{plan_path}: unreadable plan ({str(e).splitlines()[0]}); pass --data DIR") from None
    return resolve_dataset(plan)


def _check_tokenizer(checkpoint: Path, data: Path, model: GPT) -> None:
    manifest = Manifest.load(data)
    ours, theirs = checkpoint / "tokenizer", data / "tokenizer"
    if ours.is_dir() and theirs.is_dir():
        names = sorted(p.name for p in ours.iterdir())
        _, differ, missing = filecmp.cmpfiles(ours, theirs, names, shallow=False)
        if differ or missing or names != sorted(p.name for p in theirs.iterdir()):
            raise FLMConfigError(f"{data} is tokenized differently from {checkpoint}: pass --data with a dataset "
                                 "prepared with the checkpoint's tokenizer")
    if manifest.vocab_size > model.cfg.vocab_size:
        raise FLMConfigError(f"{data}: {manifest.vocab_size} tokens do not fit the model's vocabulary of "
                             f"{model.cfg.vocab_size}")


def checkpoint_perplexity(checkpoint: str | Path, data: str | Path | None = None, split: str = "val",
                          stride: int | None = None, max_tokens: int | None = None, batch_size: int = 16,
                          device: str = "cpu", progress: bool = False) -> PerplexityResult:
    """Perplexity of a checkpoint of ours on a split of a prepared dataset (default: the run's own dataset)."""
    from flm.checkpoint import CheckpointError, load_model

    checkpoint = Path(checkpoint)
    try:
        model, _ = load_model(checkpoint, device)
    except (CheckpointError, OSError) as e:
        raise FLMConfigError(str(e)) from None
    data = Path(data) if data is not None else run_dataset(checkpoint)
    _check_tokenizer(checkpoint, data, model)
    stride = model.cfg.seq_len if stride is None else stride
    began = time.perf_counter()
    total, count, n_windows = split_nll(model, data, split, stride, max_tokens, batch_size, progress)
    if count == 0:
        raise FLMConfigError(f"{data}: the {split} split has no token to predict")
    return PerplexityResult(checkpoint=str(checkpoint), data=str(data), split=split, seq_len=model.cfg.seq_len,
                            stride=stride, windows=n_windows, tokens=count, nll=total / count,
                            ppl=math.exp(total / count), seconds=time.perf_counter() - began)
