"""The decode engine: continuous batching over a model that steps a batch of rows (`ModelShard` in-process, or the
`ShardGroup` of tensor-parallel Ray actors).

One asyncio task loops: finished rows leave, waiting requests join (up to `max_batch` rows and
`max_batch_tokens` reserved KV positions, first come first served), every running row decodes one token, and each
request's sampler (its own temperature, top-k/top-p and seeded generator, flm/generate.py's `next_tokens`) picks
its next token. New text goes to the request's asyncio queue as it is produced, so callers can stream it.

A request may ask for `logprobs`: each token it is given comes with its log-probability and the k most likely
tokens' (`TokenLogprob`). `score` runs whole sequences through the model between two decode steps (OpenAI's
`echo` with `logprobs`: every prompt token's log-probability), so that the model only ever sees one call at a time
(tensor-parallel ranks must run their collectives in the same order).

A row ends on the end-of-text token (not returned), on a stop string (the text ends before it) or after
`max_tokens` tokens, exactly as `flm.generate.generate` ends it; text that could be the start of a stop string, or
an incomplete UTF-8 character, is held back until it is decided.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, Field

from flm.generate import SamplingParams, TextCodec, next_tokens
from service.slots import apply_release


class SteppableModel(Protocol):
    """ModelShard or ShardGroup (which also has `async step_async`, same arguments)."""

    def step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor: ...

    def reset(self) -> None: ...


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
class TokenLogprob:
    """A token, its log-probability (nats) and the `top` most likely tokens at its position (id, log-prob)."""

    token: int
    logprob: float | None  # None: the first token of a prompt, which nothing predicts
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """TokenLogprob of `tokens[i]` under `logits[i]` (rows of next-token logits), with the top `k`."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, torch.tensor(tokens).view(-1, 1))[:, 0].tolist()
    top = logp.topk(k, -1) if k else None
    return [TokenLogprob(t, lp, list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)) if k else [])
            for i, (t, lp) in enumerate(zip(tokens, chosen, strict=True))]


@dataclass
class Delta:
    """New text of one request: `tokens` new tokens produced it (0 or 1); `finish_reason` on the last one;
    `logprob` of the new token when the request asked for logprobs."""

    text: str
    tokens: int
    finish_reason: Literal["stop", "length"] | None = None
    logprob: TokenLogprob | None = None


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
    logprobs: int | None = None  # top-k log-probs wanted with each token (None: none)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: bool = False
    cancelled: bool = False
    logprob: TokenLogprob | None = None  # of the token being accepted

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def emit(self, item: Delta | BaseException, threadsafe: bool = False) -> None:
        if not threadsafe:  # from the engine's task, on the request's own loop
            self.queue.put_nowait(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody listens any more
            self.cancelled = True

    def accept(self, token: int, codec: TextCodec, logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token: emit the text it decided, and finish the request if it ends here."""
        self.logprob = logprob
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
            hold = max((held_back(text, end, s) for s in stops), default=0)
            end = max(self.sent, end - hold)
            self.emit(Delta(text[self.sent:end], 1, logprob=self.logprob))
            self.sent = end

    def _finish(self, text: str, reason: Literal["stop", "length"], tokens: int) -> None:
        self.done = True
        self.emit(Delta(text[self.sent:], tokens, reason, self.logprob if tokens else None))


def held_back(text: str, end: int, stop: str) -> int:
    """The longest k < len(stop) such that text[:end] ends with stop[:k]: characters that may be the start of
    `stop`, held back until the next token decides. Only the prefixes ending in text's last character are tried,
    without copying text: per token, at most len(stop) comparisons of at most len(stop) characters, whatever the
    length of the text."""
    if end == 0:
        return 0
    k = stop.rfind(text[end - 1], 0, len(stop) - 1)  # stop[k] == the last character: a prefix of length k + 1
    while k >= 0:
        if text.endswith(stop[:k + 1], 0, end):
            return k + 1
        k = stop.rfind(text[end - 1], 0, k)
    return 0


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
    model's context length (a request's prompt + max_tokens must fit in it).

    The loop is a task on the event loop of its callers (Serve's replica loop, a test's `asyncio.run`), started
    by the first `submit`: an in-process model steps inside the loop (a step is milliseconds; callers' handlers
    run between steps), a ShardGroup's step is awaited. No second thread: on a busy CPU, handing the GIL back and
    forth with a decoding thread cost a quarter of the single-request speed. If that event loop ends (one
    `asyncio.run` after another), the next `submit` empties the model's batch and starts over on the new loop."""

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
        self._sampled: list[int] = []  # the token each row sampled last, to decode next
        self._scoring: deque[tuple[list[list[int]], asyncio.Future]] = deque()  # (sequences, their logits)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    # --- public -------------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closed

    def load(self) -> dict:
        """Requests running (in the batch) and waiting (queued), model steps so far and the largest batch."""
        return {"running": sum(not r.done for r in self._running), "waiting": len(self._waiting),
                "steps": self.steps, "peak_batch": self.peak_batch}

    def submit(self, prompt: list[int], params: SamplingParams, logprobs: int | None = None) -> RequestStream:
        """Queue a request (from inside an event loop); raises now if it cannot run (ValueError: bad input,
        EngineError: overloaded or down). Iterate the result for the text as it is produced; the last Delta has a
        finish_reason; with `logprobs` = k each new token comes with its TokenLogprob and the top k. `cancel()` it
        when the caller stops listening (a client that disconnects): its row leaves the batch at the next step."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) + params.max_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceed the context "
                             f"of {self.context} tokens")
        if self.error is not None or self._closed:
            raise EngineError(f"the model is unavailable ({self.error or 'engine closed'})")
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineError(f"{len(self._waiting)} requests are waiting; retry later", overloaded=True)
        loop = self._loop_of_caller()
        gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        req = _Request(list(prompt), params, loop, asyncio.Queue(), gen, logprobs)
        self._waiting.append(req)
        self._wake.set()
        return RequestStream(req)

    async def score(self, sequences: list[list[int]], k: int = 0) -> list[list[TokenLogprob]]:
        """Per sequence of n tokens (2 <= n <= context + 1), the TokenLogprob of its tokens 1 .. n-1 given the
        ones before (top `k` each): one forward pass over the batch, run between two decode steps."""
        if any(not 2 <= len(s) <= self.context + 1 for s in sequences):
            raise ValueError(f"a scored sequence needs 2 to {self.context + 1} tokens")
        if self.error is not None or self._closed:
            raise EngineError(f"the model is unavailable ({self.error or 'engine closed'})")
        loop = self._loop_of_caller()
        width = max(len(s) for s in sequences) - 1
        rows = [s[:-1] + [0] * (width + 1 - len(s)) for s in sequences]  # right padding: causal, never attended
        done = loop.create_future()
        self._scoring.append((rows, done))
        self._wake.set()
        logits = await done
        return [token_logprobs(logits[i, :len(s) - 1], s[1:], k) for i, s in enumerate(sequences)]

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
        """Stop the loop (from any thread), fail what has not finished, and empty the model's batch."""
        self._closed = True
        task = self._task
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)
        for req in [r for r in self._running if not r.done] + list(self._waiting):
            req.emit(EngineError("the engine was closed"), threadsafe=True)
        self._waiting.clear()
        while self._scoring:
            _, done = self._scoring.popleft()
            if not done.get_loop().is_closed():
                done.get_loop().call_soon_threadsafe(_fail_future, done, EngineError("the engine was closed"))
        if self.error is None:  # the model's row count may be ahead of ours if a step was interrupted
            self.model.reset()

    # --- the loop -----------------------------------------------------------------------------------------------
    def _loop_of_caller(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._restart(loop)
        elif self._task.get_loop() is not loop:
            raise RuntimeError("the engine is running on another event loop")
        return loop

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the loop task on `loop`; requests of an event loop that has ended are dropped."""
        if self._running or self._waiting:
            self.model.reset()
            self._running, self._sampled = [], []
            self._waiting.clear()
        self._scoring.clear()  # futures of an event loop that has ended
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._loop())

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

    async def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        logits_async = getattr(self.model, "logits_async", None)
        if logits_async is not None:
            return await logits_async(rows)
        return self.model.logits(rows)

    async def _score_waiting(self) -> None:
        """Run the queued scoring passes (between decode steps); a failure goes to its caller."""
        while self._scoring:
            rows, done = self._scoring.popleft()
            if done.done():  # the caller went away
                continue
            try:
                logits = await self._logits(rows)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a dead rank: the health check reports it, the caller gets the error
                if not done.done():
                    done.set_exception(EngineError(f"the model failed: {e!r}"))
            else:
                if not done.done():
                    done.set_result(logits)

    async def _step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor:
        step_async = getattr(self.model, "step_async", None)
        if step_async is not None:  # remote ranks: the event loop stays free while they compute
            return await step_async(release, tokens, prompts)
        return self.model.step(release, tokens, prompts)

    async def _loop(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug, not a request's fault: fail loudly rather than leave streams waiting
            self._fail(e, [r for r in self._running if not r.done])
            raise

    async def _run(self) -> None:
        while True:
            while not self._waiting and not self._scoring and all(r.done or r.cancelled for r in self._running):
                self._wake.clear()
                await self._wake.wait()
            await self._score_waiting()
            if not self._waiting and all(r.done or r.cancelled for r in self._running):
                continue
            release = [b for b, r in enumerate(self._running) if r.done or r.cancelled]
            kept = apply_release(list(range(len(self._running))), release)
            live = [self._running[b] for b in kept]
            admitted = self._admit(len(live), sum(r.reserve for r in live))
            try:
                logits = await self._step(release, [self._sampled[b] for b in kept], [r.prompt for r in admitted])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a dead rank: fail everything, the health check reports it
                self._fail(e, live + admitted)
                return
            self._running = live + admitted
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(self._running))
            self._sampled = logits.argmax(-1).tolist()  # greedy rows: one argmax for the batch
            for b, req in enumerate(self._running):
                if req.params.temperature > 0:
                    self._sampled[b] = int(next_tokens(logits[b:b + 1], req.params, req.generator)[0])
                if not req.cancelled:
                    lp = None if req.logprobs is None else token_logprobs(logits[b:b + 1], [self._sampled[b]],
                                                                          req.logprobs)[0]
                    req.accept(self._sampled[b], self.codec, lp)
            await asyncio.sleep(0)  # the streams' readers and new requests run between steps

    def _fail(self, error: BaseException, requests: list[_Request]) -> None:
        self.error = error
        for req in requests + list(self._waiting):
            req.emit(EngineError(f"the model failed: {error!r}"))
        self._waiting.clear()
        while self._scoring:
            _, done = self._scoring.popleft()
            if not done.done():
                done.set_exception(EngineError(f"the model failed: {error!r}"))


def _fail_future(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
