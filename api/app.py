"""The FastAPI gateway: jobs, deployments and model routes behind API keys.

Model routes are proxied: `/v1/models` lists the key owner's running deployments (with their context,
`max_model_len`, as vLLM and our Serve routes report it), and `/v1/completions` and `/v1/chat/completions` check the
key and that the `model` (a deployment name) is the owner's, then stream the request to that Serve application
(`<deployment url>/v1/...`, Serve's HTTP proxy on the head node) and its answer back unchanged (OpenAI bodies and
errors, server-sent events for `stream: true`). Serve's own port answers too, without keys: keep it on 127.0.0.1
(the default) or behind a firewall.

Every error, 4xx or 5xx, is an `ErrorResponse` JSON body (`{"error": "...", "field": "..."}`), or on the OpenAI
model routes OpenAI's `{"error": {"message", "type", "param", "code"}}` (`OpenAIErrorResponse`, what OpenAI clients
read), whose message names the problem and what to change; every route documents the errors it can return, so
`/openapi.json` is complete.
`POST /v1/jobs` validates the request (a plan by `flm.config.GrowthPlan`), writes the job's files and its store
row, and answers 201 at once: the reconciler (api/jobs.py) submits it to Ray within `poll_s`.
Each key's quotas (api/quotas.py: running jobs, deployments, replicas, open streams, request rates) answer 429 with
`Retry-After` when reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import threading
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import yaml
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.console import mount_console
from api.deploy import service_request
from api.jobs import JobRunner, RayUnavailable, relative, write_json
from api.quotas import QuotaExceeded, RateLimiter, StreamSlots, check_deployments, check_running_jobs, replicas
from api.runs import RunReader, checkpoints, plan_totals, read_json
from api.schemas import (
    CONFIGS,
    NAME,
    TERMINAL,
    DeploymentList,
    DeploymentRequest,
    DeploymentView,
    ErrorResponse,
    EvalJob,
    JobKind,
    JobList,
    JobRequest,
    JobState,
    JobView,
    LogsView,
    MetricsPage,
    ModelRequest,
    OpenAIErrorResponse,
    PipelineJob,
    PipelineStep,
    PlanRequest,
    PlanView,
    Preset,
    PresetList,
    Progress,
    TrainJob,
    TuneJob,
    preset_names,
    searched_plan,
)
from api.settings import GatewaySettings, Limits
from api.store import Deployment, Job, get_job, key_row, open_store, owner_lock, utcnow
from flm.config import GrowthPlan
from flm.plan import plan_cost

log = logging.getLogger("flm.gateway")
KINDS = ("train", "tune", "eval", "pipeline")
JOB_ID = re.compile(r"^job-[0-9a-f]{10}$")
DEPLOYMENT_NAME = re.compile(NAME)
DATA_SOURCES = ("shakespeare",)  # besides hf:NAME; anything else is a path inside the storage root
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


def dump_yaml(data: dict) -> str:
    """libyaml's dumper where PyYAML has it (4x faster). Not JSON: PyYAML reads 3e-05 (no dot) as a string."""
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


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
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.field = field


# --- request checks ---------------------------------------------------------------------------------------------
MAX_PATH_CHARS = 1024  # a path in a request; its parts at most NAME_MAX (255) bytes
MAX_OFFSET = 10**9  # of GET /v1/jobs: a database takes 64-bit integers, and no owner has a billion jobs


def resolve_path(root: Path, text: str, field: str) -> Path:
    """`text` (relative to the storage root, or absolute) as a path inside the root; '..' and anything resolving
    outside (absolute paths elsewhere, symlinks out) are refused, naming the field. So is what the file system
    cannot take (a NUL byte, a part over 255 bytes) and `~`, which would name the gateway's home, not the caller's."""
    if "\x00" in text:
        raise ApiError(400, f"{field}: contains a NUL byte; give a path inside the storage root", field)
    if len(text) > MAX_PATH_CHARS or any(len(part.encode("utf-8", "surrogateescape")) > 255
                                         for part in text.split("/")):
        raise ApiError(400, f"{field}: longer than {MAX_PATH_CHARS} characters, or a part of it longer than 255 "
                            f"bytes; give a shorter path inside the storage root", field)
    if text.startswith("~"):
        raise ApiError(400, f"{field}: {text!r} starts with '~', which the gateway does not expand; give a path "
                            f"relative to the storage root, or an absolute one inside it", field)
    path = Path(text)
    if ".." in path.parts:
        raise ApiError(400, f"{field}: {text!r} contains '..'; give a path inside the storage root {root}", field)
    try:
        full = (path if path.is_absolute() else root / path).resolve()
        full.exists()  # what the kernel refuses to look up (ENAMETOOLONG after symlinks, EACCES) fails here
    except (OSError, ValueError) as e:
        raise ApiError(400, f"{field}: {text!r} cannot be looked up ({type(e).__name__}); give a path inside the "
                            f"storage root", field) from None
    if not full.is_relative_to(root.resolve()):
        raise ApiError(403, f"{field}: {text!r} is outside the storage root {root}; paths must lie inside it", field)
    return full


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


# --- the gateway's state ----------------------------------------------------------------------------------------
class Gateway:
    """The store, the Ray runner and the readers of job files, shared by all requests."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.root = settings.home
        self.root.mkdir(parents=True, exist_ok=True)
        self.sessions = open_store(settings.db_url)
        self.runner = JobRunner(settings, self.sessions)
        self.reader = RunReader()
        self.http: httpx.AsyncClient | None = None
        self._totals: dict[str, tuple[int, int, int]] = {}
        self.rates, self.streams = RateLimiter(), StreamSlots()
        self._quota_lock = threading.Lock()  # a cap's count and the row that adds to it, as one step

    @contextmanager
    def quota_lock(self, owner: str):
        """A cap's count and the row that adds to it, as one step: among this process's threads and among every
        gateway on the store (api.store.owner_lock)."""
        with self._quota_lock, owner_lock(self.sessions, owner):
            yield

    # jobs ---------------------------------------------------------------------------------------------------------
    def owned_job(self, owner: str, job_id: str) -> Job:
        job = get_job(self.sessions, job_id) if JOB_ID.match(job_id) else None  # never a NUL byte to the database
        if job is None:
            raise ApiError(404, f"job {job_id!r}: no such job; see GET /v1/jobs", "job_id")
        if job.owner != owner:
            raise ApiError(403, f"job {job_id!r} belongs to another owner", "job_id")
        return job

    def owned_path(self, owner: str, text: str, field: str) -> Path:
        """`text` resolved (see resolve_path) inside the owner's own directory or a directory of one of the owner's
        jobs (symlinks followed first): a path into another owner's files is a 403, whether or not it exists."""
        path = resolve_path(self.root, text, field)
        home = self.settings.owner_dir(owner)
        if home is not None and path.is_relative_to(home.resolve()):
            return path
        parts = path.relative_to(self.root.resolve()).parts
        if len(parts) >= 2 and JOB_ID.match(parts[1]) and any(
                path.is_relative_to(d.resolve()) for d in (self.settings.run_dir(parts[1]),
                                                            self.settings.job_dir(parts[1]))):
            job = get_job(self.sessions, parts[1])
            if job is not None and job.owner == owner:
                return path
        mine = f"{relative(self.settings, home)}/ or " if home is not None else ""
        raise ApiError(403, f"{field}: {text!r} is not among your files; give a path in {mine}the runs/<job id> or "
                            f"jobs/<job id> directory of one of your jobs", field)

    def check_outputs(self, owner: str, out: str, data: str, field: str) -> str:
        """The dataset made an absolute path among the owner's files (or a built-in source); where results go is
        the gateway's to choose (`out` must be empty)."""
        if out:
            raise ApiError(422, f"{field}.out: the gateway chooses where results go (runs/<job id>, jobs/<job id>); "
                                f"leave it empty", f"{field}.out")
        if data in DATA_SOURCES or data.startswith("hf:"):
            return data
        path = self.owned_path(owner, data, f"{field}.data")
        if not path.exists():
            raise ApiError(400, f"{field}.data: {data!r} does not exist in the storage root; give a prepared "
                                f"dataset or corpus there, 'shakespeare' or hf:NAME", f"{field}.data")
        return str(path)

    def check_plan_paths(self, owner: str, plan: GrowthPlan, field: str = "plan") -> GrowthPlan:
        """The plan's dataset and `hparams_from` (a best.yaml) as absolute paths among the owner's files."""
        update = {"train": plan.train.model_copy(update={
            "data": self.check_outputs(owner, plan.train.out, plan.train.data, f"{field}.train")})}
        if plan.hparams_from is not None:
            path = self.owned_path(owner, plan.hparams_from, f"{field}.hparams_from")
            if not path.is_file():
                raise ApiError(400, f"{field}.hparams_from: {plan.hparams_from!r} is not a file; give the best.yaml "
                                    f"of one of your tune jobs (jobs/<job id>/tune/best.yaml)", f"{field}.hparams_from")
            update["hparams_from"] = str(path)
        return plan.model_copy(update=update)

    def check_search_paths(self, owner: str, search: dict, field: str) -> dict:
        return {**search, "data": self.check_outputs(owner, search.get("out", ""), search.get("data", "shakespeare"),
                                                     field)}

    def resolve_checkpoint(self, owner: str, text: str, field: str = "checkpoint") -> Path:
        """A checkpoint directory among the owner's files, or a job id of `owner` (its newest complete
        checkpoint)."""
        if JOB_ID.match(text):
            job = self.owned_job(owner, text)
            found = checkpoints(self.settings.run_dir(job.id))
            if not found:
                raise ApiError(409, f"{field}: job {text} has no checkpoint yet (state {job.state})", field)
            return found[-1]
        path = self.owned_path(owner, text, field)
        if not (path / "config.json").is_file():
            raise ApiError(400, f"{field}: {text!r} is not a checkpoint directory (no config.json in it)", field)
        return path

    def create_job(self, owner: str, req, limits: Limits) -> Job:
        job_id = f"job-{secrets.token_hex(5)}"
        jd = self.settings.job_dir(job_id)
        spec = req.model_dump(mode="json", exclude={"hold"})
        files: dict[str, str] = {}
        if isinstance(req, TrainJob):
            plan = self.check_plan_paths(owner, req.plan)
            spec["plan"] = plan.model_dump(mode="json")
            files["plan.yaml"] = dump_yaml(spec["plan"])
        if isinstance(req, PipelineJob):  # the plan stays as written: a tune step may fill in its hparams
            plan = self.check_plan_paths(owner, req.growth_plan())
            spec["plan"] = {**req.plan, "train": {**req.plan.get("train", {}), "data": plan.train.data}}
            if plan.hparams_from is not None:
                spec["plan"]["hparams_from"] = plan.hparams_from
        if isinstance(req, EvalJob):
            spec["checkpoint_path"] = str(self.resolve_checkpoint(owner, req.checkpoint))
        if isinstance(req, TuneJob):
            spec["search"] = self.check_search_paths(owner, req.search, "search")
            files["search.yaml"] = dump_yaml(spec["search"])
        if isinstance(req, PipelineJob) and req.tune is not None:
            spec["tune"] = self.check_search_paths(owner, req.tune, "tune")
        if isinstance(req, PipelineJob) and req.deploy is not None:
            self.check_deployment_name(owner, req.deploy.name or job_id, "deploy.name")
        if isinstance(req, PipelineJob):
            pipeline = {**spec, "id": job_id, "home": str(self.root), "python": self.settings.job_python,
                        "serve_url": self.settings.serve_url}
            files["spec.json"] = json.dumps(pipeline, indent=2)
        jd.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (jd / name).write_text(text)
        job = Job(id=job_id, owner=owner, kind=req.kind, spec=spec, state="HELD" if req.hold else "QUEUED",
                  attempt=0, created_at=utcnow(), updated_at=utcnow())
        with self.quota_lock(owner):
            if not req.hold:
                check_running_jobs(self.sessions, owner, limits)
            if isinstance(req, PipelineJob) and req.deploy is not None:
                check_deployments(self.sessions, owner, limits, replicas(spec["deploy"]))
            with self.sessions.begin() as s:
                s.add(job)
        if isinstance(req, TrainJob | PipelineJob):
            self._totals[job_id] = (len(plan.stages), *plan_totals(plan))
        if not req.hold:
            self.runner.wake()
        return job

    def totals(self, job: Job) -> tuple[int, int, int] | None:
        """(stages, steps, tokens) of a training job's plan, computed once per job."""
        if "plan" not in job.spec:
            return None
        if job.id not in self._totals:
            plan = searched_plan(job.spec["plan"])
            self._totals[job.id] = (len(plan.stages), *plan_totals(plan))
        return self._totals[job.id]

    def view(self, job: Job) -> JobView:
        """The job's row, with what its files say (progress, metrics, results). A job whose files or stored spec
        cannot be read (a plan an older gateway accepted, a torn results file) still has a view: its `error` says
        so, and a list of jobs never fails because of one of them."""
        v = JobView(id=job.id, kind=job.kind, owner=job.owner, state=job.state, attempt=job.attempt,
                    ray_submission_id=job.ray_submission_id, created_at=job.created_at, updated_at=job.updated_at,
                    error=job.error, spec=job.spec)
        try:
            self._add_progress(v, job)
        except Exception as e:
            log.exception("job %s: its progress and results cannot be computed", job.id)
            problem = (f"the gateway cannot compute this job's progress and results ({type(e).__name__}; its log "
                       f"has the details under job {job.id})")
            return v.model_copy(update={"error": f"{job.error}; {problem}" if job.error else problem})
        return v

    def _add_progress(self, v: JobView, job: Job) -> None:
        totals = self.totals(job)
        if totals is not None:
            run_dir = self.settings.run_dir(job.id)
            run = self.reader.summary(run_dir, self.root)
            latest = run.latest
            v.stages = totals[0]
            v.run_dir = relative(self.settings, run_dir)
            step, tokens = (latest["step"], latest["tokens"]) if latest else (0, 0)
            v.progress = Progress(step=step, total_steps=totals[1], tokens=tokens, total_tokens=totals[2],
                                  percent=round(100 * tokens / totals[2], 2) if totals[2] else None)
            if latest:
                v.stage, v.metrics = latest["stage"], latest
            v.val_loss, v.checkpoints = run.val_loss, run.checkpoints
        jd = self.settings.job_dir(job.id)
        if job.kind == "pipeline":
            steps = (read_json(jd / "pipeline.json") or {}).get("steps")
            if steps:
                v.steps = [PipelineStep(**s) for s in steps]
                v.results = {s["name"]: s["result"] for s in steps if s.get("result")}
        elif job.kind == "eval":
            result = read_json(jd / "eval" / "iq.json")
            v.results = {"categories": result["categories"], "path": relative(self.settings, jd / "eval")} \
                if result else None
        elif job.kind == "tune":
            best = jd / "tune" / "best.yaml"
            v.results = {"best": yaml.safe_load(best.read_text()), "path": relative(self.settings, best)} \
                if best.is_file() else None

    # deployments ------------------------------------------------------------------------------------------------
    def owned_deployment(self, owner: str, name: str, field: str = "name") -> Deployment:
        dep = None
        if DEPLOYMENT_NAME.match(name):  # never a NUL byte to the database
            with self.sessions() as s:
                dep = s.get(Deployment, name)
        if dep is None or dep.state == "DELETED":
            raise ApiError(404, f"deployment {name!r}: no such deployment; see GET /v1/deployments", field)
        if dep.owner != owner:
            raise ApiError(403, f"deployment {name!r} belongs to another owner", field)
        return dep

    def context(self, dep: Deployment) -> int | None:
        """The deployed checkpoint's context in tokens (its config's seq_len); None if it cannot be read."""
        try:
            return int(json.loads((self.root / dep.checkpoint / "config.json").read_text())["seq_len"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check_deployment_name(self, owner: str, name: str, field: str) -> None:
        """409 if `name` is another owner's: one of their deployments (any state: names are never handed over), or
        what the deploy step of one of their pipelines that has not ended will create (its Serve application)."""
        with self.sessions() as s:
            dep = s.get(Deployment, name)
            pipelines = s.execute(select(Job.id, Job.spec).where(Job.kind == "pipeline", Job.owner != owner,
                                                                 Job.state.not_in(TERMINAL))).all()
        if (dep is not None and dep.owner != owner) or any(
                spec.get("deploy") and (spec["deploy"].get("name") or job_id) == name for job_id, spec in pipelines):
            raise ApiError(409, f"{field}: {name!r} is another owner's deployment name; choose another", field)

    def create_deployment(self, owner: str, req: DeploymentRequest, limits: Limits) -> Deployment:
        if req.job_id is not None:
            job = self.owned_job(owner, req.job_id)
            if job.state != "SUCCEEDED":
                raise ApiError(409, f"job_id: job {job.id} is {job.state}; deploy a SUCCEEDED job, or give one of "
                                    f"its checkpoints as checkpoint", "job_id")
            checkpoint = self.resolve_checkpoint(owner, job.id, "job_id")
        else:
            checkpoint = self.resolve_checkpoint(owner, req.checkpoint)
        if not (checkpoint / "tokenizer").is_dir():
            raise ApiError(400, f"checkpoint: {relative(self.settings, checkpoint)} has no tokenizer/; serving "
                                f"needs the tokenizer the model was trained with", "checkpoint")
        name = req.name or req.job_id or f"model-{secrets.token_hex(4)}"
        self.check_deployment_name(owner, name, "name")
        settings = {**req.model_dump(mode="json", exclude={"checkpoint", "job_id"}), "name": name}
        home = self.root / "deployments" / name
        spec = {"request": service_request(str(checkpoint), settings), "serve_url": self.settings.serve_url,
                "result": str(home / "result.json")}
        with self.quota_lock(owner), self.sessions.begin() as s:
            check_deployments(self.sessions, owner, limits, replicas(settings))
            dep = s.get(Deployment, name)
            if dep is not None and dep.owner != owner:
                raise ApiError(409, f"name: {name!r} is another owner's deployment name; choose another", "name")
            if dep is not None and dep.state not in ("DELETED", "FAILED"):
                raise ApiError(409, f"name: a deployment named {name!r} is {dep.state}; choose another name or "
                                    f"DELETE /v1/deployments/{name} first", "name")
            (home / "result.json").unlink(missing_ok=True)
            write_json(home / "spec.json", spec)
            values = dict(owner=owner, job_id=req.job_id, checkpoint=relative(self.settings, checkpoint),
                          spec=settings, state="DEPLOYING", url=None, error=None, ray_submission_id=None,
                          updated_at=utcnow())
            if dep is None:
                dep = Deployment(id=name, attempt=0, created_at=utcnow(), **values)
                s.add(dep)
            else:
                for k, v in values.items():
                    setattr(dep, k, v)
        self.runner.wake()
        return dep

    def delete_deployment(self, owner: str, name: str) -> Deployment:
        dep = self.owned_deployment(owner, name)
        if dep.state == "DELETING":
            raise ApiError(409, f"deployment {name!r} is already DELETING", "name")
        if dep.state == "DEPLOYING" and dep.ray_submission_id:
            self.runner.stop_submission(dep.ray_submission_id)
        self.runner.set_deployment(dep, dep.state, state="DELETING", ray_submission_id=None)
        self.runner.wake()
        return self.owned_deployment(owner, name)

    def deployment_view(self, dep: Deployment) -> DeploymentView:
        return DeploymentView(id=dep.id, owner=dep.owner, job_id=dep.job_id, checkpoint=dep.checkpoint,
                              state=dep.state, url=dep.url, error=dep.error, spec=dep.spec,
                              created_at=dep.created_at, updated_at=dep.updated_at)

    async def proxy(self, owner: str, body: ModelRequest, path: str, limits: Limits) -> Response:
        """Stream `body` to the deployment named by its `model` and the answer back, unchanged (with `stream:
        true`, in one of the owner's stream slots)."""
        dep = await run_in_threadpool(self.owned_deployment, owner, body.model, "model")
        if dep.state != "RUNNING" or not dep.url:
            raise ApiError(409, f"model: {body.model!r} is {dep.state}, not RUNNING", "model")
        release = self.streams.take(owner, limits.max_streams) if getattr(body, "stream", False) is True else None
        try:
            return await self._forward(dep, body, path, release)
        except BaseException:
            if release is not None:
                release()
            raise

    async def _forward(self, dep: Deployment, body: ModelRequest, path: str, release) -> Response:
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
        upstream = self.http.build_request("POST", f"{dep.url}{path}", json=body.model_dump(),
                                           headers={"Accept": "application/json, text/event-stream"})
        try:
            resp = await self.http.send(upstream, stream=True)
        except httpx.TransportError as e:
            raise ApiError(503, f"model: Serve does not answer at {dep.url} ({type(e).__name__}); see GET "
                                f"/v1/deployments/{dep.id}", "model") from None
        if resp.status_code == 429 and "json" not in resp.headers.get("content-type", ""):
            # Serve's own refusal (its queue for the deployment is full): OpenAI's body, which clients retry on
            await resp.aread()
            await resp.aclose()
            raise ApiError(429, f"model: {dep.id} is overloaded, its queue is full ({resp.text.strip()[:200]}); "
                                f"retry after Retry-After seconds, or ask its owner for more replicas", "model",
                           {"Retry-After": resp.headers.get("retry-after", "1")})
        chunks = resp.aiter_raw() if release is None else self.streams.guard(resp.aiter_raw(), release)
        return StreamingResponse(chunks, status_code=resp.status_code,
                                 media_type=resp.headers.get("content-type"), background=BackgroundTask(resp.aclose))


# --- the app ----------------------------------------------------------------------------------------------------
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


def create_app(settings: GatewaySettings | None = None, reconcile: bool = True) -> FastAPI:
    """The gateway app. `reconcile=False` leaves jobs QUEUED (no Ray): in-process tests of the HTTP surface."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = Gateway(settings)
        app.state.gateway = gw
        if reconcile:
            gw.runner.start()
        yield
        gw.runner.shutdown()
        if gw.http is not None:
            await gw.http.aclose()

    app = FastAPI(title="FLM gateway", version="0.1.0", lifespan=lifespan,
                  description="Submit, watch and cancel growth-training jobs (Ray Jobs), deploy checkpoints (Ray "
                              "Serve) and query them. Every route but /health needs `Authorization: Bearer KEY`.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

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

    # --- routes -------------------------------------------------------------------------------------------------
    @app.get("/health", tags=["health"])
    async def health(gw: GW) -> dict[str, Any]:
        """Liveness, and whether the Ray job server answered the reconciler's last call (no key needed)."""
        return {"status": "ok", "ray": gw.runner.last_error or "ok", "ray_address": gw.settings.ray_address}

    @app.post("/v1/jobs", status_code=201, tags=["jobs"], responses=errors(400, 403, 404, 409, 413, 422, 429),
              dependencies=[WriteRate])
    def submit_job(gw: GW, who: Owner, limits: KeyLimits, body: Annotated[JobRequest, Body()]) -> JobView:
        """Validate and store a job; it is submitted to Ray at once (or held, with `hold: true`). Sync: a plan's
        totals are computed in the thread pool, not on the event loop."""
        return gw.view(gw.create_job(who, body, limits))

    @app.get("/v1/jobs", tags=["jobs"], responses=errors(422))
    async def list_jobs(gw: GW, who: Owner, state: JobState | None = None, kind: JobKind | None = None,
                  limit: Annotated[int, Query(ge=1, le=200)] = 20,
                  offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> JobList:
        """The owner's jobs, newest first."""
        q = select(Job).where(Job.owner == who)
        if state:
            q = q.where(Job.state == state)
        if kind:
            q = q.where(Job.kind == kind)
        with gw.sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            jobs = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)))
        return JobList(jobs=[gw.view(j) for j in jobs], total=total, limit=limit, offset=offset)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobView, responses=errors(403, 404, 422))
    async def get_job(gw: GW, who: Owner, job_id: str) -> Response:
        """State, stage, progress in tokens and %, newest metrics, checkpoints, error."""
        # serialized here: the view is built by this code, FastAPI's second validation of it would only cost time
        return Response(gw.view(gw.owned_job(who, job_id)).model_dump_json(), media_type="application/json")

    @app.get("/v1/jobs/{job_id}/metrics", tags=["jobs"], responses={
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

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], responses=errors(403, 404, 422, 503))
    def job_logs(gw: GW, who: Owner, job_id: str,
                 tail: Annotated[int | None, Query(ge=1, description="only the last lines")] = None) -> LogsView:
        """The job's driver output from Ray (every attempt's)."""
        job = gw.owned_job(who, job_id)
        text = gw.runner.logs(job) if job.attempt else ""
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return LogsView(id=job.id, ray_submission_id=job.ray_submission_id, logs=text)

    @app.delete("/v1/jobs/{job_id}", status_code=202, tags=["jobs"], responses=errors(403, 404, 409, 422, 429, 503),
                dependencies=[WriteRate])
    def cancel_job(gw: GW, who: Owner, job_id: str) -> JobView:
        """Cancel: Ray stops the job's driver, and with it its Ray Train workers (state STOPPING, then STOPPED)."""
        job = gw.owned_job(who, job_id)
        if job.state in TERMINAL:
            raise ApiError(409, f"job {job_id} is already {job.state}", "job_id")
        if job.state in ("HELD", "QUEUED") and gw.runner.set_state(job, job.state, state="STOPPED"):
            return gw.view(gw.owned_job(who, job_id))
        job = gw.owned_job(who, job_id)  # the reconciler may have submitted it meanwhile
        if job.state in ("PENDING", "RUNNING", "STOPPING"):
            gw.runner.stop(job)
            gw.runner.set_state(job, job.state, state="STOPPING")
        return gw.view(gw.owned_job(who, job_id))

    @app.post("/v1/jobs/{job_id}/resume", status_code=202, tags=["jobs"],
              responses=errors(403, 404, 409, 422, 429), dependencies=[WriteRate])
    def resume_job(gw: GW, who: Owner, limits: KeyLimits, job_id: str) -> JobView:
        """Start a held job, or submit a stopped or failed one again: training continues from its newest
        checkpoint (same run name), finished pipeline steps are skipped."""
        job = gw.owned_job(who, job_id)
        if job.kind == "pipeline" and job.spec.get("deploy") and job.state in ("HELD", "STOPPED", "FAILED"):
            gw.check_deployment_name(who, job.spec["deploy"].get("name") or job.id, "deploy.name")
        if job.state not in ("HELD", "STOPPED", "FAILED"):
            raise ApiError(409, f"job {job_id} is {job.state}; only HELD, STOPPED or FAILED jobs can be resumed",
                           "job_id")
        with gw.quota_lock(who):
            check_running_jobs(gw.sessions, who, limits)
            if job.kind == "pipeline" and job.spec.get("deploy") and job.state != "HELD":  # HELD ones are counted
                check_deployments(gw.sessions, who, limits, replicas(job.spec["deploy"]))
            if not gw.runner.set_state(job, job.state, state="QUEUED", error=None):
                raise ApiError(409, f"job {job_id} changed state meanwhile; see GET /v1/jobs/{job_id}", "job_id")
        gw.runner.wake()
        return gw.view(gw.owned_job(who, job_id))

    @app.post("/v1/deployments", status_code=201, tags=["deployments"],
              responses=errors(400, 403, 404, 409, 413, 422, 429), dependencies=[WriteRate])
    def create_deployment(gw: GW, who: Owner, limits: KeyLimits, body: DeploymentRequest) -> DeploymentView:
        """Serve a checkpoint (DEPLOYING, then RUNNING with its url, or FAILED with the reason)."""
        return gw.deployment_view(gw.create_deployment(who, body, limits))

    @app.get("/v1/deployments", tags=["deployments"], responses=errors())
    async def list_deployments(gw: GW, who: Owner) -> DeploymentList:
        """The owner's deployments (deleted ones left out)."""
        with gw.sessions() as s:
            deps = s.scalars(select(Deployment).where(Deployment.owner == who, Deployment.state != "DELETED")
                             .order_by(Deployment.created_at.desc()))
            return DeploymentList(deployments=[gw.deployment_view(d) for d in deps])

    @app.get("/v1/deployments/{name}", tags=["deployments"], responses=errors(403, 404, 422))
    async def get_deployment(gw: GW, who: Owner, name: str) -> DeploymentView:
        return gw.deployment_view(gw.owned_deployment(who, name))

    @app.delete("/v1/deployments/{name}", status_code=202, tags=["deployments"],
                responses=errors(403, 404, 409, 422, 429), dependencies=[WriteRate])
    def delete_deployment(gw: GW, who: Owner, name: str) -> DeploymentView:
        """Delete the Serve application (DELETING, then DELETED)."""
        return gw.deployment_view(gw.delete_deployment(who, name))

    @app.get("/v1/models", tags=["models"], responses=errors(model=OpenAIErrorResponse))
    async def list_models(gw: GW, who: Owner) -> dict[str, Any]:
        """The owner's RUNNING deployments as OpenAI models, with their context in tokens (`max_model_len`)."""
        with gw.sessions() as s:
            deps = list(s.scalars(select(Deployment).where(Deployment.owner == who, Deployment.state == "RUNNING")))
        return {"object": "list", "data": [{"id": d.id, "object": "model", "owned_by": d.owner,
                                            "created": int(d.created_at.timestamp()),
                                            "max_model_len": gw.context(d)} for d in deps]}

    model_errors = {**errors(403, 404, 409, 413, 422, 429, 503, model=OpenAIErrorResponse),
                    200: {"description": "the model's OpenAI response (server-sent events with stream: true)",
                          "content": {"application/json": {}, "text/event-stream": {}}}}

    @app.post("/v1/completions", tags=["models"], responses=model_errors, dependencies=[ModelRate])
    async def completions(gw: GW, who: Owner, limits: KeyLimits, body: ModelRequest) -> Response:
        """OpenAI completions, proxied to the deployment named by `model`."""
        return await gw.proxy(who, body, "/v1/completions", limits)

    @app.post("/v1/chat/completions", tags=["models"], responses=model_errors, dependencies=[ModelRate])
    async def chat_completions(gw: GW, who: Owner, limits: KeyLimits, body: ModelRequest) -> Response:
        """OpenAI chat completions, proxied to the deployment named by `model`."""
        return await gw.proxy(who, body, "/v1/chat/completions", limits)

    @app.post("/v1/plan", tags=["plans"], responses=errors(413, 422))
    async def cost_of_plan(who: Owner, body: PlanRequest) -> PlanView:
        """`flm plan`'s cost table: FLOPs, days, GPU-days and $ per stage vs the final size trained from scratch."""
        return cost_view(body)

    @app.get("/v1/presets", tags=["plans"], responses=errors())
    async def list_presets(who: Owner) -> PresetList:
        """The growth plans in configs/ by name, with their YAML (a job's `plan` may be given as the name)."""
        return PresetList(plans=[Preset(name=n, text=(CONFIGS / f"{n}.yaml").read_text()) for n in preset_names()])

    mount_console(app)
    return app


def cost_view(body: PlanRequest) -> PlanView:
    """The plan's cost; 422 for assumptions that give no finite answer (a TFLOP/s list of the wrong length, a
    throughput so small that days overflow)."""
    plan = searched_plan(body.plan)
    no_answer = ("hardware: these assumptions give no finite cost (a throughput or a price too small or too "
                 "large); give values nearer to a real GPU's")
    try:
        cost = plan_cost(plan, body.hardware)
    except (ZeroDivisionError, OverflowError):
        raise ApiError(422, no_answer, "hardware") from None
    except ValueError as e:
        raise ApiError(422, f"hardware: {e}", "hardware") from None
    numbers = [v for v in cost.model_dump().values() if isinstance(v, float)]
    numbers += [v for s in cost.stages for v in s.model_dump().values() if isinstance(v, float)]
    if not all(math.isfinite(v) for v in numbers):
        raise ApiError(422, no_answer, "hardware")
    return PlanView(name=plan.name, **cost.model_dump())


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
