"""Every error the gateway answers, in one shape: an `ErrorResponse` JSON body (`{"error": "...", "field": "..."}`),
or on the OpenAI model routes OpenAI's `{"error": {"message", "type", "param", "code"}}` (`OpenAIErrorResponse`, what
OpenAI clients read), whose message names the problem and what to change; never a traceback.

`ApiError` is what the gateway's code raises; `add_error_handlers` turns it, request validation errors, quota
refusals (429 with `Retry-After`), an unreachable Ray (503) and anything unexpected (500 with a request id, the
details in the log) into those bodies; `errors(...)` documents a route's errors in `/openapi.json`; `BodyLimit`
answers 413 for bodies over FLM_MAX_BODY_BYTES before a route reads them.
"""

from __future__ import annotations

import json
import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.jobs import RayUnavailable
from api.quotas import QuotaExceeded
from api.schemas import KINDS, ErrorResponse

log = logging.getLogger("flm.gateway")

ERROR_TEXT = {
    400: "Bad request: a path or a value the gateway cannot use",
    401: "Missing, unknown or revoked API key",
    403: "Another owner's resource, or a path outside the caller's files (owners/<owner>/, their jobs' directories)",
    404: "No such job or deployment",
    409: "The job's state does not allow this",
    413: "Request body larger than the gateway's limit",
    422: "A field is missing, of the wrong type, or invalid (a shrinking growth stage, ...)",
    429: "A quota of the key is reached (running jobs, deployments, replicas, open streams, requests per minute): "
         "the message names it and how to raise it; retry after `Retry-After` seconds",
    503: "The Ray cluster (or Serve) does not answer",
}
MODEL_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")  # errors in OpenAI's shape
OPENAI_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "model_not_found", 409: "model_not_ready",
                413: "request_too_large", 422: "invalid_request", 429: "rate_limit_exceeded", 500: "internal_error",
                503: "unavailable"}


def errors(*codes: int, model: type = ErrorResponse) -> dict:
    """OpenAPI `responses` for these error codes (401 always: every route but /health needs a key)."""
    return {c: {"model": model, "description": ERROR_TEXT[c]} for c in sorted({401, *codes})}


def error_body(path: str, status: int, message: str, field: str | None = None) -> dict:
    """The error body of a route: OpenAI's on the model routes, ErrorResponse elsewhere."""
    if path in MODEL_ROUTES:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        code = OPENAI_CODES.get(status) if status != 404 or field == "model" else "not_found"
        return {"error": {"message": message, "type": kind, "param": field, "code": code}}
    return ErrorResponse(error=message, field=field).model_dump()


class ApiError(StarletteHTTPException):
    """An error a caller can cause: its HTTP status, a message that says what to change, and the request field at
    fault (if one is)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.field = field


def format_validation(request: Request, exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's first error as one line 'field: what is wrong' (the body's kind tag left out of the name)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    if request.url.path == "/v1/jobs" and loc and loc[0] in KINDS:
        loc = loc[1:]  # the discriminated union's tag
    kind, msg = err.get("type", ""), err.get("msg", "").removeprefix("Value error, ")
    if kind == "union_tag_not_found":
        loc, msg = ["kind"], f"required; one of {', '.join(KINDS)}"
    elif kind == "union_tag_invalid":
        loc, msg = ["kind"], f"{err.get('input', {}).get('kind')!r} is not one of {', '.join(KINDS)}"
    elif kind == "json_invalid":
        loc, msg = [], f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    elif kind == "missing":
        msg = "required"
    field = ".".join(loc) or None
    return (f"{field}: {msg}" if field else msg), field


class BodyLimit:
    """413 for bodies above `limit` bytes: at once by Content-Length, else (a chunked body) after reading at most
    `limit` + 1 bytes. An accepted body is replayed to the app (bodies here are small JSON documents)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, send, f"{int(length)} bytes")
        if length is not None:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, send, "more than that")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope, send, size: str):
        body = json.dumps(error_body(scope["path"], 413, f"request body: {size} is over the limit of {self.limit} "
                                                         f"bytes (the gateway's FLM_MAX_BODY_BYTES)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a request can end in, answered as an error body of its route."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if isinstance(exc, ApiError):
            body = error_body(path, exc.status_code, exc.detail, exc.field)
        elif exc.status_code == 404:
            body = error_body(path, 404, f"no route {request.method} {path}; see /docs")
        else:
            body = error_body(path, exc.status_code, str(exc.detail))
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, field = format_validation(request, exc)
        return JSONResponse(error_body(request.url.path, 422, message, field), 422)

    @app.exception_handler(QuotaExceeded)
    async def over_quota(request: Request, exc: QuotaExceeded):
        return JSONResponse(error_body(request.url.path, 429, str(exc), exc.cap), 429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RayUnavailable)
    async def ray_down(request: Request, exc: RayUnavailable):
        return JSONResponse(error_body(request.url.path, 503, str(exc)), 503)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # the exception's text may quote a file or a path of the server: it goes to the log, the caller gets the id
        request_id = secrets.token_hex(8)
        log.error("request %s: unhandled error on %s %s", request_id, request.method, request.url.path,
                  exc_info=exc)
        body = error_body(request.url.path, 500, f"internal error; the gateway's log has the details under request id "
                                                 f"{request_id}")
        return JSONResponse(body, 500, headers={"X-Request-ID": request_id})
