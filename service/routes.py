"""The OpenAI-compatible routes of a served model: `OpenAIServer` turns OpenAI requests into requests of a
continuously batching `Engine` and its output into OpenAI responses; `build_api` puts them behind FastAPI.

Routes (under the application's route prefix):
    GET  /v1/models             the served model (its id is the deployment's name) and its context length
                                (`max_model_len`, as vLLM reports it)
    POST /v1/completions        OpenAI completions; `stream: true` sends server-sent events ending `data: [DONE]`;
                                `logprobs: k` and `echo` (with `max_tokens: 0`: score the prompt only), so that
                                lm-evaluation-harness's `local-completions` model runs loglikelihood tasks
    POST /v1/chat/completions   OpenAI chat completions (the template is `service.protocol.render_chat`)
    GET  /tokenizer_info        vLLM's tokenizer routes, which lm-evaluation-harness finds and uses: the
    POST /tokenize              end-of-text token, text to token ids and back (the text of a special token is
    POST /detokenize            that token here, as in Hugging Face tokenizers; in prompts text is always text)
    GET  /health                200 while the engine and every shard answer, else 503 (liveness)
    GET  /ready                 200 with the running / waiting request counts once the model is loaded

Errors: 400 bad value (empty prompt, max_tokens <= 0 or above the limit, n above the limit, malformed JSON,
an unsupported field), 404 unknown model or route, 413 prompt longer than the context (unless the request sets
`truncate_prompt_tokens`), 422 a request that does not match the schema, 429 queue full, 503 model down; every body
is OpenAI's {"error": {...}}.

Ray Serve runs them in service/app.py (`FLMDeployment`); tests and benchmarks in process (`OpenAIServer.in_process`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from flm.data import EOT, Tokenizer
from flm.generate import SamplingParams
from service.engine import Delta, Engine, EngineConfig, EngineError, RequestStream, TokenLogprob
from service.protocol import (
    CHAT_STOP,
    MAX_STOP_CHARS,
    MAX_STOPS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    render_chat,
)
from service.spec import DeploymentRequest, check_request
from service.tp import ModelShard, read_config


class OpenAIServer:
    """Turns OpenAI requests into engine requests and engine output into OpenAI responses."""

    def __init__(self, engine: Engine, codec: Tokenizer, name: str, context: int, vocab_size: int, max_n: int):
        self.engine, self.codec, self.name = engine, codec, name
        self.context, self.vocab_size, self.max_n = context, vocab_size, max_n
        self.created = int(time.time())

    @classmethod
    def in_process(cls, request: DeploymentRequest, threads: int = 1) -> OpenAIServer:
        """A tp = 1 server running the model in this process (no Ray): tests and benchmarks."""
        check_request(request)
        cfg = read_config(request.checkpoint)
        shard = ModelShard(request.checkpoint, max_batch=request.max_batch, dtype=request.dtype, threads=threads)
        return cls.with_model(shard, request, cfg.seq_len, cfg.vocab_size)

    @classmethod
    def with_model(cls, model, request: DeploymentRequest, context: int, vocab_size: int) -> OpenAIServer:
        codec = Tokenizer.load(Path(request.checkpoint) / "tokenizer")
        engine = Engine(model, codec, context, EngineConfig(max_batch=request.max_batch,
                                                            max_batch_tokens=request.max_batch_tokens))
        return cls(engine, codec, request.name, context, vocab_size, request.max_n)

    def tokenize(self, text: str) -> list[int]:
        """`text` as token ids, the text of a special token as that token (Hugging Face tokenizers do so, and
        lm-evaluation-harness finds the end-of-text token's id by tokenizing its text)."""
        parts = text.split(EOT)
        ids = self.codec.encode(parts[0])
        for part in parts[1:]:
            ids += [self.codec.eot_id, *self.codec.encode(part)]
        return ids

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "flm", "max_model_len": self.context}]}

    # --- validation ---------------------------------------------------------------------------------------------
    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model != self.name:
            raise OpenAIError(404, f"model {req.model!r} does not exist; this server serves {self.name!r}",
                              "model", "model_not_found")
        bad = req.unsupported()
        if bad:
            raise OpenAIError(400, f"{bad} is not supported by this server; leave it unset", bad,
                              "unsupported_parameter")
        if not 1 <= req.n <= self.max_n:
            raise OpenAIError(400, f"n must be between 1 and {self.max_n}, got {req.n}", "n", "invalid_value")
        stops = req.stops()
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise OpenAIError(400, f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each "
                                   f"(OpenAI's limit), got {len(stops)} of up to {max(map(len, stops))}", "stop",
                              "invalid_value")

    def _truncate(self, req, ids: list[int]) -> list[int]:
        return ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids

    def _prompt_ids(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise OpenAIError(400, "prompt must not be empty", "prompt", "empty_prompt")
        ids = [self.codec.encode(x) if isinstance(x, str) else list(x) for x in prompts]
        if any(t < 0 or t >= self.vocab_size for x in ids for t in x):
            raise OpenAIError(400, f"prompt token ids must be in [0, {self.vocab_size})", "prompt", "invalid_value")
        if any(len(x) == 0 for x in ids):  # a non-empty string can encode to nothing only in odd tokenizers
            raise OpenAIError(400, "prompt encodes to no tokens", "prompt", "empty_prompt")
        most = self.engine.config.max_waiting
        if len(ids) * req.n > most:  # more than the engine ever queues: refused, not "retry later"
            raise OpenAIError(400, f"{len(ids)} prompts x n={req.n} exceed the {most} requests this server queues; "
                                   f"send fewer prompts per request", "prompt", "invalid_value")
        return [self._truncate(req, x) for x in ids]

    def _params(self, req, prompt: list[int], max_tokens: int | None, default: int, extra_stop: list[str],
                least: int = 1):
        """SamplingParams for one prompt; max_tokens (at least `least`) checked against the context."""
        limit = self.context - least
        if max_tokens is not None and not least <= max_tokens <= limit:
            raise OpenAIError(400, f"max_tokens must be between {least} and {limit}, got {max_tokens}",
                              "max_tokens", "invalid_value")
        room = self.context - len(prompt)
        if room < least:
            raise OpenAIError(413, f"the prompt has {len(prompt)} tokens; the context is {self.context} tokens, so "
                                   f"a prompt may have at most {limit} (or set truncate_prompt_tokens to keep only "
                                   f"its end)", "prompt", "context_length_exceeded")
        if max_tokens == 0:
            return None
        if max_tokens is not None and max_tokens > room:
            raise OpenAIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the context of "
                                   f"{self.context} tokens; lower max_tokens to {room}", "max_tokens",
                              "context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens or min(default, room), temperature=req.temperature,
                              top_k=req.top_k, top_p=req.top_p, stop=req.stops() + extra_stop, seed=req.seed)

    # --- running ------------------------------------------------------------------------------------------------
    def _submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
                logprobs: int | None = None) -> list[RequestStream]:
        """One engine request per choice (choice index = prompt index * n + j); seeded choices get seed + j."""
        streams = []
        for ids, p in zip(prompts, params, strict=True):
            for j in range(n):
                q = p if p.seed is None or j == 0 else p.model_copy(update={"seed": p.seed + j})
                try:
                    streams.append(self.engine.submit(ids, q, logprobs))
                except EngineError as e:
                    for s in streams:  # the request fails whole: free what was queued
                        s.cancel()
                    raise OpenAIError(429 if e.overloaded else 503, str(e), None,
                                      "overloaded" if e.overloaded else "unavailable",
                                      "rate_limit_error" if e.overloaded else "server_error") from None
        return streams

    async def completions(self, req: CompletionRequest):
        self._check_common(req)
        if req.stream and (req.echo or req.logprobs is not None):
            bad = "echo" if req.echo else "logprobs"
            raise OpenAIError(400, f"{bad} is not supported with stream: true; leave stream unset", bad,
                              "unsupported_parameter")
        prompts = self._prompt_ids(req)
        params = [self._params(req, p, req.max_tokens, 16, [], least=0 if req.echo else 1) for p in prompts]
        if req.max_tokens == 0:  # echo: the prompts scored, nothing generated
            return await self._echo_only(req, prompts)
        return await self._respond("text_completion", req, prompts, params)

    async def chat(self, req: ChatCompletionRequest):
        self._check_common(req)
        if req.logprobs:
            raise OpenAIError(400, "logprobs is not supported by chat completions on this server; use "
                                   "/v1/completions with logprobs", "logprobs", "unsupported_parameter")
        if not req.messages or not any(m.text() for m in req.messages):
            raise OpenAIError(400, "messages must hold at least one non-empty message", "messages", "empty_prompt")
        ids = self._truncate(req, self.codec.encode(render_chat(req.messages)))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = [self._params(req, ids, max_tokens, self.context, [CHAT_STOP])]
        return await self._respond("chat.completion", req, [ids], params)

    async def _prompt_logprobs(self, req, prompts: list[list[int]]) -> list[list[TokenLogprob]] | None:
        """With echo and logprobs: each prompt's tokens scored (the first has no log-probability: None)."""
        if not (req.echo and req.logprobs is not None):
            return None
        long = [p for p in prompts if len(p) > 1]
        try:
            scored = iter(await self.engine.score(long, req.logprobs) if long else [])
        except EngineError as e:
            raise OpenAIError(503, str(e), None, "unavailable", "server_error") from None
        first = [TokenLogprob(p[0], None, []) for p in prompts]  # logprob None: nothing predicts the first token
        return [[first[i], *(next(scored) if len(p) > 1 else [])] for i, p in enumerate(prompts)]

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict:
        """OpenAI's completions `logprobs` object of `tokens` (the choice's text is theirs, so offsets start at 0)."""
        texts = [self.codec.decode([t.token]) for t in tokens]
        starts = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {self.codec.decode([i]): lp for i, lp in t.top}
                                 for t in tokens], "text_offset": starts}

    async def _echo_only(self, req: CompletionRequest, prompts: list[list[int]]) -> dict:
        scored = await self._prompt_logprobs(req, prompts)
        choices = []
        for i in range(len(prompts) * req.n):
            p = i // req.n
            choices.append({"index": i, "text": self.codec.decode(prompts[p]), "finish_reason": "length",
                            "logprobs": None if scored is None else self._logprobs(scored[p])})
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name,
                "object": "text_completion", "choices": choices, "usage": _usage(prompt_tokens, 0)}

    async def _respond(self, kind: str, req, prompts: list[list[int]], params: list[SamplingParams]):
        logprobs = getattr(req, "logprobs", None) if kind == "text_completion" else None
        echoed = await self._prompt_logprobs(req, prompts) if kind == "text_completion" else None
        streams = self._submit(prompts, params, req.n, logprobs)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": self.name}
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._sse(kind, head, streams, prompt_tokens, usage),
                                     media_type="text/event-stream")
        texts, counts, reasons = [""] * len(streams), [0] * len(streams), ["length"] * len(streams)
        generated: list[list[TokenLogprob]] = [[] for _ in streams]
        async for i, d in _merged(streams):
            texts[i] += d.text
            counts[i] += d.tokens
            reasons[i] = d.finish_reason or reasons[i]
            if d.logprob is not None:
                generated[i].append(d.logprob)
        if kind == "chat.completion":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        else:
            choices = []
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True)):
                p = i // req.n
                echo = self.codec.decode(prompts[p]) if req.echo else ""
                lp = None
                if logprobs is not None:
                    lp = self._logprobs((echoed[p] if echoed else []) + generated[i])
                choices.append({"index": i, "text": echo + t, "logprobs": lp, "finish_reason": r})
        return {**head, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, sum(counts))}

    async def _sse(self, kind: str, head: dict, streams, prompt_tokens: int, usage: bool) -> AsyncIterator[str]:
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict | None, **extra) -> str:
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice] if choice else [], **extra})}\n\n"

        completion_tokens = 0
        try:
            if chat:
                for i in range(len(streams)):
                    yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            async for i, d in _merged(streams):
                completion_tokens += d.tokens
                if not d.text and d.finish_reason is None:
                    continue  # held back (a possible stop string or a partial character)
                if chat:
                    delta = {"content": d.text} if d.text else {}
                    yield event({"index": i, "delta": delta, "logprobs": None, "finish_reason": d.finish_reason})
                else:
                    yield event({"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason})
            if usage:
                yield event(None, usage=_usage(prompt_tokens, completion_tokens))
        except EngineError as e:  # the headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps(OpenAIError(503, str(e), None, 'unavailable', 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from several engine streams as they come; leaving early cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for d in stream:
                await queue.put((i, d))
        except Exception as e:
            await queue.put((i, e))
        finally:
            stream.cancel()
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, d = await queue.get()
            if d is None:
                remaining -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()


def build_api(server: OpenAIServer, health=None) -> FastAPI:
    """The FastAPI app over `server`; `health()` raises when a model rank is down (default: engine health)."""
    api = FastAPI(title="FLM", description=__doc__)

    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            err = OpenAIError(400, f"the request body is not valid JSON ({first.get('msg')})", None, "invalid_json")
        else:
            where = ".".join(loc) or "body"
            err = OpenAIError(422, f"{where}: {first.get('msg')}", where if loc else None, "invalid_request")
        return JSONResponse(err.body(), status_code=err.status)

    @api.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):
        err = OpenAIError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @api.get("/v1/models")
    async def models():
        return server.models()

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await server.completions(req)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await server.chat(req)

    @api.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": EOT, "bos_token": None, "pad_token": None,
                "model_max_length": server.context, "tokenizer_class": "flm"}

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model is not None and req.model != server.name:
            raise OpenAIError(404, f"model {req.model!r} does not exist; this server serves {server.name!r}",
                              "model", "model_not_found")
        tokens = server.tokenize(req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.context}

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if any(not 0 <= t < server.vocab_size for t in req.tokens):
            raise OpenAIError(400, f"token ids must be in [0, {server.vocab_size})", "tokens", "invalid_value")
        return {"prompt": server.codec.decode(req.tokens)}

    @api.get("/health")
    async def healthy():
        try:
            if health is not None:
                await health()
            elif not server.engine.healthy:
                raise RuntimeError(f"engine failed: {server.engine.error!r}")
        except Exception as e:
            raise OpenAIError(503, f"unhealthy: {e}", None, "unavailable", "server_error") from None
        return {"status": "ok"}

    @api.get("/ready")
    async def ready():
        return {"ready": server.engine.healthy, "model": server.name, **server.engine.load()}

    return api
