"""The gateway's service: `Gateway` holds the store, the Ray runner and the readers of job files, and does what the
routes (api/routes.py) ask: jobs created, viewed, cancelled; deployments created and deleted; model requests
proxied; paths in requests checked to lie among the caller's own files. It raises `ApiError` (api/errors.py) for
what a caller can get wrong; it knows nothing of HTTP routing.

`POST /v1/jobs` validates the request (a plan by `flm.config.GrowthPlan`), writes the job's files and its store
row, and answers 201 at once: the reconciler (api/jobs.py) submits it to Ray within `poll_s`. Model requests are
streamed to the deployment's Serve application (`<deployment url>/v1/...`) and its answer back unchanged. Each key's
quotas (api/quotas.py) are checked with the row that adds to their count, as one step.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import func, select
from starlette.background import BackgroundTask

from api.errors import ApiError
from api.jobs import JobRunner, relative, write_json
from api.quotas import RateLimiter, StreamSlots, check_deployments, check_running_jobs, replicas
from api.runs import RunReader, checkpoints, plan_totals, read_json
from api.schemas import (
    NAME,
    TERMINAL,
    DeploymentList,
    DeploymentView,
    EvalJob,
    JobList,
    JobView,
    ModelRequest,
    NewDeployment,
    PipelineJob,
    PipelineStep,
    PlanRequest,
    PlanView,
    Progress,
    TrainJob,
    TuneJob,
    searched_plan,
)
from api.settings import GatewaySettings, Limits
from api.store import Deployment, Job, get_job, open_store, owner_lock, utcnow
from flm.config import GrowthPlan
from flm.plan import plan_cost

log = logging.getLogger("flm.gateway")
JOB_ID = re.compile(r"^job-[0-9a-f]{10}$")
DEPLOYMENT_NAME = re.compile(NAME)
DATA_SOURCES = ("shakespeare",)  # besides hf:NAME; anything else is a path inside the storage root
MAX_PATH_CHARS = 1024  # a path in a request; its parts at most NAME_MAX (255) bytes


def dump_yaml(data: dict) -> str:
    """libyaml's dumper where PyYAML has it (4x faster). Not JSON: PyYAML reads 3e-05 (no dot) as a string."""
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


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

    def list_jobs(self, owner: str, state: str | None, kind: str | None, limit: int, offset: int) -> JobList:
        """The owner's jobs, newest first."""
        q = select(Job).where(Job.owner == owner)
        if state:
            q = q.where(Job.state == state)
        if kind:
            q = q.where(Job.kind == kind)
        with self.sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            jobs = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)))
        return JobList(jobs=[self.view(j) for j in jobs], total=total, limit=limit, offset=offset)

    def cancel_job(self, owner: str, job_id: str) -> Job:
        """A queued or held job stops at once; a submitted one is stopped by Ray (STOPPING, then STOPPED)."""
        job = self.owned_job(owner, job_id)
        if job.state in TERMINAL:
            raise ApiError(409, f"job {job_id} is already {job.state}", "job_id")
        if job.state in ("HELD", "QUEUED") and self.runner.set_state(job, job.state, state="STOPPED"):
            return self.owned_job(owner, job_id)
        job = self.owned_job(owner, job_id)  # the reconciler may have submitted it meanwhile
        if job.state in ("PENDING", "RUNNING", "STOPPING"):
            self.runner.stop(job)
            self.runner.set_state(job, job.state, state="STOPPING")
        return self.owned_job(owner, job_id)

    def resume_job(self, owner: str, job_id: str, limits: Limits) -> Job:
        """A HELD, STOPPED or FAILED job QUEUED again, within the owner's quotas."""
        job = self.owned_job(owner, job_id)
        if job.kind == "pipeline" and job.spec.get("deploy") and job.state in ("HELD", "STOPPED", "FAILED"):
            self.check_deployment_name(owner, job.spec["deploy"].get("name") or job.id, "deploy.name")
        if job.state not in ("HELD", "STOPPED", "FAILED"):
            raise ApiError(409, f"job {job_id} is {job.state}; only HELD, STOPPED or FAILED jobs can be resumed",
                           "job_id")
        with self.quota_lock(owner):
            check_running_jobs(self.sessions, owner, limits)
            if job.kind == "pipeline" and job.spec.get("deploy") and job.state != "HELD":  # HELD ones are counted
                check_deployments(self.sessions, owner, limits, replicas(job.spec["deploy"]))
            if not self.runner.set_state(job, job.state, state="QUEUED", error=None):
                raise ApiError(409, f"job {job_id} changed state meanwhile; see GET /v1/jobs/{job_id}", "job_id")
        self.runner.wake()
        return self.owned_job(owner, job_id)

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

    def list_deployments(self, owner: str) -> DeploymentList:
        """The owner's deployments (deleted ones left out), newest first."""
        with self.sessions() as s:
            deps = s.scalars(select(Deployment).where(Deployment.owner == owner, Deployment.state != "DELETED")
                             .order_by(Deployment.created_at.desc()))
            return DeploymentList(deployments=[self.deployment_view(d) for d in deps])

    def models(self, owner: str) -> dict:
        """The owner's RUNNING deployments as OpenAI models, with their context in tokens (`max_model_len`)."""
        with self.sessions() as s:
            deps = list(s.scalars(select(Deployment).where(Deployment.owner == owner, Deployment.state == "RUNNING")))
        return {"object": "list", "data": [{"id": d.id, "object": "model", "owned_by": d.owner,
                                            "created": int(d.created_at.timestamp()),
                                            "max_model_len": self.context(d)} for d in deps]}

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

    def create_deployment(self, owner: str, req: NewDeployment, limits: Limits) -> Deployment:
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
        home = self.settings.deployment_dir(name)
        spec = {"request": req.request(str(checkpoint), name).model_dump(mode="json", exclude_defaults=True),
                "serve_url": self.settings.serve_url, "result": str(home / "result.json")}
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
