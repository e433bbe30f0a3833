"""The decode engine: continuous batching over a model that steps a batch of rows (`ModelShard` in-process, or the
`ShardGroup` of tensor-parallel Ray actors).

One background thread loops: finished rows leave, waiting requests join (up to `max_batch` rows and
`max_batch_tokens` reserved KV positions, first come first served), every running row decodes one token, and each
request's sampler (its own temperature, top-k/top-p and seeded generator, flm/generate.py's `next_tokens`) picks
its next token. New text goes to the request's asyncio queue as it is produced, so callers can stream it.

A row ends on the end-of-text token (not returned), on a stop string (the text ends before it) or after
`max_tokens` tokens, exactly as `flm.generate.generate` ends it; text that could be the start of a stop string, or
an incomplete UTF-8 character, is held back until it is decided.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, Field

from flm.generate import SamplingParams, TextCodec, next_tokens
from service.slots import apply_release


class SteppableModel(Protocol):
    def step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor: ...


class EngineConfig(BaseModel):
    max_batch: int = Field(default=16, ge=1, description="rows decoded together")
    max_batch_tokens: int = Field(default=0, ge=0, description="KV positions the running requests may reserve "
                                                               "(prompt + max_tokens each); 0: max_batch x context")
    max_waiting: int = Field(default=1024, ge=0, description="queued requests beyond which new ones are refused")


class EngineError(RuntimeError):
    """The engine cannot take the request now (overloaded: retry later) or at all (a model rank died)."""

    def __init__(self, message: str, overloaded: bool = False):
        super().__init__(message)
        self.overloaded = overloaded


@dataclass
class Delta:
    """New text of one request: `tokens` new tokens produced it (0 or 1); `finish_reason` on the last one."""

    text: str
    tokens: int
    finish_reason: Literal["stop", "length"] | None = None


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: bool = False
    cancelled: bool = False

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def emit(self, item: Delta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody listens any more
            self.cancelled = True

    def accept(self, token: int, codec: TextCodec) -> None:
        """Take one sampled token: emit the text it decided, and finish the request if it ends here."""
        if token == codec.eot_id:
            self._finish(codec.decode(self.tokens), "stop", 0)
            return
        self.tokens.append(token)
        text = codec.decode(self.tokens)
        stops = [s for s in self.params.stop if s]  # an empty stop string would end every request at once
        # text up to `sent` held no start of a stop string (it was held back), so a stop can only start after it
        cut = min((i for i in (text.find(s, self.sent) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._finish(text[:cut], "stop", 1)
        elif len(self.tokens) >= self.params.max_tokens:
            self._finish(text, "length", 1)
        else:
            end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD for now
            hold = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
            end = max(self.sent, end - hold)
            self.emit(Delta(text[self.sent:end], 1))
            self.sent = end

    def _finish(self, text: str, reason: Literal["stop", "length"], tokens: int) -> None:
        self.done = True
        self.emit(Delta(text[self.sent:], tokens, reason))


class RequestStream:
    """A request's Deltas as they are produced (async iteration); `cancel()` frees its row at the next step."""

    def __init__(self, req: _Request):
        self._req, self._ended = req, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self._ended:
            raise StopAsyncIteration
        item = await self._req.queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = item.finish_reason is not None
        return item

    def cancel(self) -> None:
        self._req.cancelled = True


class Engine:
    """Continuous batching decode loop over `model`; `codec` turns text into tokens and back, `context` is the
    model's context length (a request's prompt + max_tokens must fit in it)."""

    def __init__(self, model: SteppableModel, codec: TextCodec, context: int, config: EngineConfig | None = None):
        self.model, self.codec, self.context = model, codec, context
        self.config = config or EngineConfig()
        self.max_batch_tokens = self.config.max_batch_tokens or self.config.max_batch * context
        if self.max_batch_tokens < context:
            raise ValueError(f"max_batch_tokens {self.max_batch_tokens} < the context ({context}): a full-context "
                             f"request could never run")
        self.error: BaseException | None = None
        self.steps = 0  # model steps taken
        self.peak_batch = 0  # most rows decoded in one step
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # one per row of the model's batch, in row order
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="flm-engine", daemon=True)
        self._thread.start()

    # --- public -------------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def load(self) -> dict:
        """Requests running (in the batch) and waiting (queued), model steps so far and the largest batch."""
        with self._cv:
            return {"running": sum(not r.done for r in self._running), "waiting": len(self._waiting),
                    "steps": self.steps, "peak_batch": self.peak_batch}

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request (from inside an event loop); raises now if it cannot run (ValueError: bad input,
        EngineError: overloaded or down). Iterate the result for the text as it is produced; the last Delta has a
        finish_reason. `cancel()` it when the caller stops listening (a client that disconnects): its row leaves
        the batch at the next step."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) + params.max_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceed the context "
                             f"of {self.context} tokens")
        gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        req = _Request(list(prompt), params, asyncio.get_running_loop(), asyncio.Queue(), gen)
        with self._cv:
            if self.error is not None or self._closed:
                raise EngineError(f"the model is unavailable ({self.error or 'engine closed'})")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineError(f"{len(self._waiting)} requests are waiting; retry later", overloaded=True)
            self._waiting.append(req)
            self._cv.notify()
        return RequestStream(req)

    async def complete(self, prompt: list[int], params: SamplingParams) -> Result:
        parts, n, reason = [], 0, "length"
        stream = self.submit(prompt, params)
        try:
            async for d in stream:
                parts.append(d.text)
                n += d.tokens
                reason = d.finish_reason or reason
        finally:
            stream.cancel()
        return Result("".join(parts), len(prompt), n, reason)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- the loop -----------------------------------------------------------------------------------------------
    def _admit(self, rows: int, reserved: int) -> list[_Request]:
        """Waiting requests that fit beside `rows` running rows holding `reserved` KV positions (FIFO)."""
        admitted = []
        while self._waiting and rows + len(admitted) < self.config.max_batch:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            if reserved + req.reserve > self.max_batch_tokens:
                break
            admitted.append(self._waiting.popleft())
            reserved += req.reserve
        return admitted

    def _loop(self) -> None:
        sampled: list[int] = []  # the token each row sampled last, to decode next
        while True:
            with self._cv:
                while not self._closed and not self._waiting and all(r.done or r.cancelled for r in self._running):
                    self._cv.wait()
                if self._closed:
                    rows = list(range(len(self._running)))
                    unfinished = [r for r in self._running if not r.done] + list(self._waiting)
                    self._waiting.clear()
                    break
                release = [b for b, r in enumerate(self._running) if r.done or r.cancelled]
                kept = apply_release(list(range(len(self._running))), release)
                live = [self._running[b] for b in kept]
                admitted = self._admit(len(live), sum(r.reserve for r in live))
            try:
                logits = self.model.step(release, [sampled[b] for b in kept], [r.prompt for r in admitted])
            except BaseException as e:  # a dead rank: fail everything, the health check reports it
                self._fail(e, live + admitted)
                return
            with self._cv:
                self._running = live + admitted
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(self._running))
            sampled = logits.argmax(-1).tolist()  # greedy rows: one argmax for the batch
            for b, req in enumerate(self._running):
                if req.params.temperature > 0:
                    sampled[b] = int(next_tokens(logits[b:b + 1], req.params, req.generator)[0])
                token = sampled[b]
                if not req.cancelled:
                    req.accept(token, self.codec)

        for req in unfinished:
            req.emit(EngineError("the engine was closed"))
        if rows:  # leave the model's batch empty for whoever steps it next
            self.model.step(rows, [], [])

    def _fail(self, error: BaseException, requests: list[_Request]) -> None:
        with self._cv:
            self.error = error
            requests = requests + list(self._waiting)
            self._waiting.clear()
        for req in requests:
            req.emit(EngineError(f"the model failed: {error!r}"))
