"""Incremental decoding with the KV cache: greedy, temperature, top-k / top-p sampling, stop strings, a token
budget and a seed, for a batch of prompts of different lengths (left-padded; each row sees exactly what it would
see alone). Used by the CLI, the IQ evaluation and the serving layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from flm.model import GPT, KVCache


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0: greedy")
    top_k: int = Field(default=0, ge=0, description="0: no top-k filter")
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class TextCodec(Protocol):
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Completion(BaseModel):
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (rows independent)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits."""
    if params.temperature == 0.0:
        return logits.argmax(-1)
    logits = _filter(logits.float() / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, prompts: list[list[int]], params: SamplingParams, eot_id: int | None = None,
                    stop_fn: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """New tokens per prompt. The EOT token ends a row (and is not returned); so does `stop_fn(row) -> True`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.wte.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    cache = KVCache.empty(model.cfg, B, longest + params.max_tokens, device, model.wte.weight.dtype)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    was = model.training
    model.eval()
    logits, _ = model(idx, cache=cache, pad=pad)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(params.max_tokens):
        tok = next_tokens(logits[:, -1], params, gen)
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            if t == eot_id:
                done[b] = True
                continue
            out[b].append(t)
            if stop_fn is not None and stop_fn(out[b]):
                done[b] = True
        if done.all() or step == params.max_tokens - 1:
            break
        logits, _ = model(tok.unsqueeze(-1), cache=cache, pad=pad)
    model.train(was)
    return out


def generate(model: GPT, codec: TextCodec, prompts: list[str], params: SamplingParams) -> list[Completion]:
    """Text in, text out; a stop string ends the text before it (finish_reason "stop")."""
    encoded = [codec.encode(p) for p in prompts]

    def stopped(row: list[int]) -> bool:  # only the tail can hold a stop string that just completed
        tail = codec.decode(row[-32:])
        return any(s in tail for s in params.stop)

    results = []
    new_tokens = generate_tokens(model, encoded, params, codec.eot_id, stopped if params.stop else None)
    for ids, new in zip(encoded, new_tokens, strict=True):
        text = codec.decode(new)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        finish = "stop" if cut >= 0 or len(new) < params.max_tokens else "length"
        results.append(Completion(text=text[:cut] if cut >= 0 else text, tokens=new, prompt_tokens=len(ids),
                                  finish_reason=finish))
    return results
