"""The gateway's REST routes: jobs, deployments, the OpenAI model routes, plans; each a thin layer over
`Gateway` (api/gateway.py) that checks the caller's key and quotas and documents its errors (api/errors.py).

Model routes are proxied: `/v1/models` lists the key owner's running deployments (with their context,
`max_model_len`, as vLLM and our Serve routes report it), and `/v1/completions` and `/v1/chat/completions` check the
key and that the `model` (a deployment name) is the owner's, then stream the request to that Serve application and
its answer back unchanged (OpenAI bodies and errors, server-sent events for `stream: true`). Serve's own port
answers too, without keys: keep it on 127.0.0.1 (the default) or behind a firewall.

A job's metric stream is also served as server-sent events (`events`): its records as they are written, its state
changes, then `end`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError, errors
from api.gateway import Gateway, cost_view
from api.schemas import (
    CONFIGS,
    TERMINAL,
    DeploymentList,
    DeploymentView,
    JobKind,
    JobList,
    JobRequest,
    JobState,
    JobView,
    LogsView,
    MetricsPage,
    ModelRequest,
    NewDeployment,
    OpenAIErrorResponse,
    PlanRequest,
    PlanView,
    Preset,
    PresetList,
    preset_names,
)
from api.settings import Limits
from api.store import Job, key_row

MAX_OFFSET = 10**9  # of GET /v1/jobs: a database takes 64-bit integers, and no owner has a billion jobs
bearer = HTTPBearer(auto_error=False, description="an API key from `flm keys create --name NAME`")
# The read routes and the key check are `async def` and do their store reads and file stats inline: each is an
# indexed lookup or a stat of well under a millisecond, far cheaper than the two thread hops a sync route costs
# (what limits GET throughput). Routes that write files or call Ray are sync (run in the thread pool).


async def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def owner(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    gw: Gateway = request.app.state.gateway
    if cred is None:
        raise ApiError(401, "Authorization: missing; send 'Authorization: Bearer <key>' (create a key with "
                            "`flm keys create --name NAME`)", "Authorization", {"WWW-Authenticate": "Bearer"})
    row = key_row(gw.sessions, cred.credentials)
    if row is None or row.revoked_at is not None:
        why = "is not a key of this gateway" if row is None else "was revoked"
        raise ApiError(401, f"Authorization: the API key {why}", "Authorization", {"WWW-Authenticate": "Bearer"})
    request.state.limits = gw.settings.limits.over(row.limits)
    return row.owner


Owner = Annotated[str, Depends(owner)]
GW = Annotated[Gateway, Depends(gateway)]


async def key_limits(request: Request, who: Owner) -> Limits:
    """The caller's caps: the gateway's with its key's own over them (see api/quotas.py)."""
    return request.state.limits


KeyLimits = Annotated[Limits, Depends(key_limits)]


async def write_rate(request: Request, who: Owner, limits: KeyLimits) -> None:
    """Job and deployment writes: `requests_per_minute` per owner."""
    request.app.state.gateway.rates.take(who, "requests_per_minute", limits.requests_per_minute)


async def model_rate(request: Request, who: Owner, limits: KeyLimits) -> None:
    """Model queries: `model_requests_per_minute` per owner."""
    request.app.state.gateway.rates.take(who, "model_requests_per_minute", limits.model_requests_per_minute)


WriteRate, ModelRate = Depends(write_rate), Depends(model_rate)

router = APIRouter()


@router.get("/health", tags=["health"])
async def health(gw: GW) -> dict[str, Any]:
    """Liveness, and whether the Ray job server answered the reconciler's last call (no key needed)."""
    return {"status": "ok", "ray": gw.runner.last_error or "ok", "ray_address": gw.settings.ray_address}


@router.post("/v1/jobs", status_code=201, tags=["jobs"], responses=errors(400, 403, 404, 409, 413, 422, 429),
             dependencies=[WriteRate])
def submit_job(gw: GW, who: Owner, limits: KeyLimits, body: Annotated[JobRequest, Body()]) -> JobView:
    """Validate and store a job; it is submitted to Ray at once (or held, with `hold: true`). Sync: a plan's
    totals are computed in the thread pool, not on the event loop."""
    return gw.view(gw.create_job(who, body, limits))


@router.get("/v1/jobs", tags=["jobs"], responses=errors(422))
async def list_jobs(gw: GW, who: Owner, state: JobState | None = None, kind: JobKind | None = None,
                    limit: Annotated[int, Query(ge=1, le=200)] = 20,
                    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> JobList:
    """The owner's jobs, newest first."""
    return gw.list_jobs(who, state, kind, limit, offset)


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobView, responses=errors(403, 404, 422))
async def get_job(gw: GW, who: Owner, job_id: str) -> Response:
    """State, stage, progress in tokens and %, newest metrics, checkpoints, error."""
    # serialized here: the view is built by this code, FastAPI's second validation of it would only cost time
    return Response(gw.view(gw.owned_job(who, job_id)).model_dump_json(), media_type="application/json")


@router.get("/v1/jobs/{job_id}/metrics", tags=["jobs"], responses={
    **errors(403, 404, 422, 429),
    200: {"description": "JSON page of records, or with `stream=true` (or `Accept: text/event-stream`) "
                         "server-sent events: `metric` per record, `state` on each change, `end` last",
          "content": {"text/event-stream": {}}}})
async def job_metrics(request: Request, gw: GW, who: Owner, limits: KeyLimits, job_id: str,
                      after: Annotated[int, Query(ge=0, description="skip the first `after` records")] = 0,
                      stream: bool = False) -> MetricsPage:
    """The training metric stream (`metrics.jsonl`): one record per logged step, plus growth events."""
    job = gw.owned_job(who, job_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        release = gw.streams.take(who, limits.max_streams)
        return StreamingResponse(gw.streams.guard(events(gw, job, after), release),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    records = gw.reader.metrics(gw.settings.run_dir(job.id))
    return MetricsPage(records=records[after:], next=max(len(records), after), state=job.state)


@router.get("/v1/jobs/{job_id}/logs", tags=["jobs"], responses=errors(403, 404, 422, 503))
def job_logs(gw: GW, who: Owner, job_id: str,
             tail: Annotated[int | None, Query(ge=1, description="only the last lines")] = None) -> LogsView:
    """The job's driver output from Ray (every attempt's)."""
    job = gw.owned_job(who, job_id)
    text = gw.runner.logs(job) if job.attempt else ""
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    return LogsView(id=job.id, ray_submission_id=job.ray_submission_id, logs=text)


@router.delete("/v1/jobs/{job_id}", status_code=202, tags=["jobs"], responses=errors(403, 404, 409, 422, 429, 503),
               dependencies=[WriteRate])
def cancel_job(gw: GW, who: Owner, job_id: str) -> JobView:
    """Cancel: Ray stops the job's driver, and with it its Ray Train workers (state STOPPING, then STOPPED)."""
    return gw.view(gw.cancel_job(who, job_id))


@router.post("/v1/jobs/{job_id}/resume", status_code=202, tags=["jobs"],
             responses=errors(403, 404, 409, 422, 429), dependencies=[WriteRate])
def resume_job(gw: GW, who: Owner, limits: KeyLimits, job_id: str) -> JobView:
    """Start a held job, or submit a stopped or failed one again: training continues from its newest
    checkpoint (same run name), finished pipeline steps are skipped."""
    return gw.view(gw.resume_job(who, job_id, limits))


@router.post("/v1/deployments", status_code=201, tags=["deployments"],
             responses=errors(400, 403, 404, 409, 413, 422, 429), dependencies=[WriteRate])
def create_deployment(gw: GW, who: Owner, limits: KeyLimits, body: NewDeployment) -> DeploymentView:
    """Serve a checkpoint (DEPLOYING, then RUNNING with its url, or FAILED with the reason)."""
    return gw.deployment_view(gw.create_deployment(who, body, limits))


@router.get("/v1/deployments", tags=["deployments"], responses=errors())
async def list_deployments(gw: GW, who: Owner) -> DeploymentList:
    """The owner's deployments (deleted ones left out)."""
    return gw.list_deployments(who)


@router.get("/v1/deployments/{name}", tags=["deployments"], responses=errors(403, 404, 422))
async def get_deployment(gw: GW, who: Owner, name: str) -> DeploymentView:
    return gw.deployment_view(gw.owned_deployment(who, name))


@router.delete("/v1/deployments/{name}", status_code=202, tags=["deployments"],
               responses=errors(403, 404, 409, 422, 429), dependencies=[WriteRate])
def delete_deployment(gw: GW, who: Owner, name: str) -> DeploymentView:
    """Delete the Serve application (DELETING, then DELETED)."""
    return gw.deployment_view(gw.delete_deployment(who, name))


@router.get("/v1/models", tags=["models"], responses=errors(model=OpenAIErrorResponse))
async def list_models(gw: GW, who: Owner) -> dict[str, Any]:
    """The owner's RUNNING deployments as OpenAI models, with their context in tokens (`max_model_len`)."""
    return gw.models(who)


model_errors = {**errors(403, 404, 409, 413, 422, 429, 503, model=OpenAIErrorResponse),
                200: {"description": "the model's OpenAI response (server-sent events with stream: true)",
                      "content": {"application/json": {}, "text/event-stream": {}}}}


@router.post("/v1/completions", tags=["models"], responses=model_errors, dependencies=[ModelRate])
async def completions(gw: GW, who: Owner, limits: KeyLimits, body: ModelRequest) -> Response:
    """OpenAI completions, proxied to the deployment named by `model`."""
    return await gw.proxy(who, body, "/v1/completions", limits)


@router.post("/v1/chat/completions", tags=["models"], responses=model_errors, dependencies=[ModelRate])
async def chat_completions(gw: GW, who: Owner, limits: KeyLimits, body: ModelRequest) -> Response:
    """OpenAI chat completions, proxied to the deployment named by `model`."""
    return await gw.proxy(who, body, "/v1/chat/completions", limits)


@router.post("/v1/plan", tags=["plans"], responses=errors(413, 422))
async def cost_of_plan(who: Owner, body: PlanRequest) -> PlanView:
    """`flm plan`'s cost table: FLOPs, days, GPU-days and $ per stage vs the final size trained from scratch."""
    return cost_view(body)


@router.get("/v1/presets", tags=["plans"], responses=errors())
async def list_presets(who: Owner) -> PresetList:
    """The growth plans in configs/ by name, with their YAML (a job's `plan` may be given as the name)."""
    return PresetList(plans=[Preset(name=n, text=(CONFIGS / f"{n}.yaml").read_text()) for n in preset_names()])


async def events(gw: Gateway, job: Job, after: int):
    """Server-sent events of a job: its metric records as they are written, its state changes, then `end`."""
    sent, state, seen, idle = after, None, None, 0.0
    run_dir = gw.settings.run_dir(job.id)
    while True:
        records = await run_in_threadpool(gw.reader.metrics, run_dir)
        sent = min(sent, len(records))  # a resumed trainer truncated the stream to its checkpoint
        for record in records[sent:]:
            yield f"event: metric\ndata: {json.dumps(record)}\n\n"
        if len(records) > sent:
            idle = 0.0
        sent = len(records)
        with gw.sessions() as s:
            job = s.get(Job, job.id)
        view = await run_in_threadpool(gw.view, job)
        now = (job.state, [(st.name, st.state) for st in view.steps or []])
        if now != seen:
            seen, state = now, job.state
            yield f"event: state\ndata: {view.model_dump_json(exclude={'spec', 'metrics'})}\n\n"
            idle = 0.0
        if state in TERMINAL:
            records = await run_in_threadpool(gw.reader.metrics, run_dir)  # written before the job ended
            for record in records[sent:]:
                yield f"event: metric\ndata: {json.dumps(record)}\n\n"
            yield f"event: end\ndata: {json.dumps({'state': state, 'error': job.error})}\n\n"
            return
        if idle >= 15:
            yield ": keep-alive\n\n"
            idle = 0.0
        await asyncio.sleep(0.5)
        idle += 0.5
