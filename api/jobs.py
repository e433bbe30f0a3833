"""Jobs run as Ray Jobs: what each kind's entrypoint is, submitting, cancelling, and the reconciler that keeps
the store's states equal to Ray's.

The job id is the Ray Train run name (the run directory `$FLM_HOME/runs/<id>`), so every attempt of a job trains
into the same checkpoints and a resubmission resumes. Ray never reuses a submission id, so attempt 1 is submitted
as `<id>` and attempt n as `<id>.r<n>`; `Job.ray_submission_id` is the current one.

The reconciler is one thread: every `poll_s` it submits QUEUED jobs and copies Ray's state into the store for the
others (one `list_jobs` call per tick). It is also what makes a gateway restart lose nothing: the store holds
every job, Ray holds the truth about the ones it runs, and the first tick after start brings them together; a
job submitted by a gateway that died before recording it is recognised by its submission id. A job Ray no
longer knows (the cluster was restarted) becomes FAILED with a message saying that a resume continues it. Every
`serve_check_s` it also asks Serve (the dashboard's REST API) which applications it runs: a RUNNING deployment that
Serve no longer has (the head was lost and started again) becomes FAILED, saying so.

Why a job failed comes from its error file (flm/error_file.py): every submission runs with $FLM_ERROR_FILE set to
`errors/<submission id>.json` in its job's (or deployment's) directory, which the gateway reads when Ray says FAILED.
Jobs run on the head node, where the gateway runs, under the same $FLM_HOME; a job that left no file (killed, or
run where the gateway cannot read its files) gets Ray's message and the last lines of its log, saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.runs import read_json
from api.schemas import TERMINAL
from api.settings import GatewaySettings
from api.store import Deployment, Job, utcnow
from flm.error_file import ERROR_FILE_ENV, read_error

log = logging.getLogger("flm.gateway")
RAY_STATES = {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"}


class RayUnavailable(RuntimeError):
    """The Ray job server does not answer."""


def submission_id(job_id: str, attempt: int) -> str:
    return job_id if attempt <= 1 else f"{job_id}.r{attempt}"


def train_args(plan_file: Path, name: str, home: Path, max_failures: int, backend: str | None) -> list[str]:
    """`flm cluster train` of a job's plan; the run name is the job id, so every attempt resumes the same run."""
    args = ["cluster", "train", str(plan_file), "--name", name, "--storage", str(home / "runs"), "--address", "auto",
            "--max-failures", str(max_failures)]
    return args + (["--backend", backend] if backend else [])


def eval_args(checkpoint: str | Path, settings: dict, out: Path) -> list[str]:
    """`flm eval` (the IQ suite) of a checkpoint with an EvalSettings' subtasks, seed and n_items."""
    args = ["eval", str(checkpoint), "--subtasks", settings["subtasks"], "--seed", str(settings["seed"]),
            "--out", str(out)]
    return args + (["--n-items", str(settings["n_items"])] if settings.get("n_items") else [])


def tune_args(search_file: Path, out: Path) -> list[str]:
    """`flm tune` of a search on the cluster."""
    return ["tune", str(search_file), "--out", str(out), "--address", "auto"]


def entrypoint(settings: GatewaySettings, job: Job) -> list[str]:
    """The command Ray runs for `job` as an argv (on the head node, with $FLM_HOME = the storage root); the
    pipeline's steps run the same `flm` arguments (api/pipeline.py)."""
    spec, jd = job.spec, settings.job_dir(job.id)
    flm = [settings.job_python, "-m", "flm.cli"]
    if job.kind == "train":
        return [*flm, *train_args(jd / "plan.yaml", job.id, settings.home, spec["max_failures"], spec.get("backend"))]
    if job.kind == "eval":
        return [*flm, *eval_args(spec["checkpoint_path"], spec, jd / "eval")]
    if job.kind == "tune":
        return [*flm, *tune_args(jd / "search.yaml", jd / "tune")]
    if job.kind == "pipeline":
        return [settings.job_python, "-m", "api.pipeline", str(jd / "spec.json")]
    raise ValueError(f"unknown job kind {job.kind!r}")


def deployment_entrypoint(settings: GatewaySettings, dep: Deployment) -> list[str]:
    """The command of a deployment's operation: `api.deploy up` its spec.json (DEPLOYING) or `down` its name."""
    if dep.state == "DEPLOYING":
        return [settings.job_python, "-m", "api.deploy", "up", str(settings.deployment_dir(dep.id) / "spec.json")]
    return [settings.job_python, "-m", "api.deploy", "down", dep.id]


def error_file(directory: Path, sid: str) -> Path:
    """Where submission `sid` of the job or deployment whose files are in `directory` reports its error."""
    return directory / "errors" / f"{sid}.json"


def job_env(settings: GatewaySettings, error_path: Path) -> dict[str, str]:
    """The environment of every job the gateway submits."""
    return {"FLM_HOME": str(settings.home), "RAY_USAGE_STATS_ENABLED": "0", ERROR_FILE_ENV: str(error_path)}


def failure_message(error_path: Path, logs: str, ray_message: str | None) -> str:
    """Why a job failed: its error file's message (after the pipeline step that failed); without one, Ray's message
    and the last lines of the log, saying so."""
    report = read_error(error_path)
    if report is not None:
        return f"pipeline step {report.step}: {report.message}" if report.step else report.message
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    first = (ray_message or "the job failed").splitlines()[0].split(", last available logs")[0]  # we quote them
    tail = f"; its log ends: {' | '.join(lines[-3:])}" if lines else ""
    return f"{first} (it left no error file{tail})"


class JobRunner:
    """The gateway's side of Ray Jobs. `client()` connects lazily, so a gateway starts (and accepts jobs, which
    stay QUEUED) while the Ray cluster is down."""

    def __init__(self, settings: GatewaySettings, sessions: sessionmaker[Session]):
        self.settings, self.sessions = settings, sessions
        self._clients: dict[str, object] = {}  # "jobs", "serve": made on first use, dropped when Ray is gone
        self._client_lock = threading.Lock()
        self._next_serve_check = 0.0  # time.monotonic() of the next check of RUNNING deployments
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # --- Ray ------------------------------------------------------------------------------------------------------
    def client(self, kind: str = "jobs"):
        """The dashboard's REST client of `kind`: "jobs" (Ray Jobs) or "serve" (Serve's applications); the gateway
        stays a plain HTTP client of Ray."""
        with self._client_lock:
            if kind not in self._clients:
                if kind == "jobs":
                    from ray.job_submission import JobSubmissionClient as make
                else:
                    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient as make
                try:
                    self._clients[kind] = make(self.settings.ray_address)
                except Exception as e:  # ConnectionError, requests' errors, a version check failing
                    raise RayUnavailable(f"the Ray job server at {self.settings.ray_address} does not answer "
                                         f"({type(e).__name__}); start it (flm up) or set FLM_RAY_ADDRESS") from None
            return self._clients[kind]

    def _call(self, method: str, *args, kind: str = "jobs", **kwargs):
        """A call of the `kind` client; a connection failure drops every client (reconnect next time)."""
        client = self.client(kind)
        try:
            return getattr(client, method)(*args, **kwargs)
        except RuntimeError:
            raise  # the job server answered with an error (unknown id, ...)
        except Exception as e:
            with self._client_lock:
                self._clients.clear()
            raise RayUnavailable(f"the Ray job server at {self.settings.ray_address} does not answer "
                                 f"({type(e).__name__})") from None

    def stop(self, job: Job) -> None:
        self.stop_submission(job.ray_submission_id)

    def stop_submission(self, sid: str) -> None:
        self._call("stop_job", sid)

    def logs(self, job: Job) -> str:
        """The logs of every attempt, oldest first."""
        parts = []
        for n in range(1, job.attempt + 1):
            sid = submission_id(job.id, n)
            try:
                text = self._call("get_job_logs", sid)
            except RuntimeError:
                text = "(Ray has no logs of this attempt: the cluster was restarted)\n"
            parts.append(text if job.attempt == 1 else f"=== attempt {n} ({sid}) ===\n{text}")
        return "".join(parts)

    # --- the reconciler ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flm-reconciler", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        try:  # connect now (importing Ray's client takes seconds): the first submission does not wait for it
            self.client()
        except RayUnavailable as e:
            self.last_error = str(e)
        while not self._stopping.is_set():
            try:
                if self.tick():
                    self.last_error = None
            except RayUnavailable as e:
                if self.last_error != str(e):
                    log.warning("%s", e)
                self.last_error = str(e)
            except Exception:  # never let the reconciler die; the next tick retries
                log.exception("reconciler tick failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def tick(self) -> bool:
        """One reconciliation: submit what is queued, copy Ray's state into the store for what runs. True if it
        talked to Ray (there was something to do)."""
        with self.sessions() as s:
            jobs = list(s.scalars(select(Job).where(Job.state.in_(("QUEUED", "PENDING", "RUNNING", "STOPPING")))))
            deps = list(s.scalars(select(Deployment).where(Deployment.state.in_(("DEPLOYING", "DELETING")))))
            running = list(s.scalars(select(Deployment).where(Deployment.state == "RUNNING")))
        checked = self._check_serving(running)
        if not jobs and not deps:
            return checked
        ray_jobs = {d.submission_id: d for d in self._call("list_jobs")}
        for job in jobs:
            if job.state == "QUEUED":
                self._submit(job, ray_jobs)
            else:
                self._sync(job, ray_jobs.get(job.ray_submission_id))
        for dep in deps:
            self._sync_deployment(dep, ray_jobs)
        return True

    def set_state(self, job: Job, expected: str, **values) -> bool:
        """Update `job` only if its state is still `expected` (a cancel may have raced us); True if done."""
        with self.sessions.begin() as s:
            done = s.execute(update(Job).where(Job.id == job.id, Job.state == expected)
                             .values(updated_at=utcnow(), **values)).rowcount == 1
        return done

    def _submit_ray(self, sid: str, argv: list[str], directory: Path, ray_jobs: dict, **metadata: str) -> None:
        """Submit `argv` as Ray job `sid` unless Ray has it already (a gateway that died before recording
        it submitted it); its error file goes to `directory`. RuntimeError if Ray refuses it. Ray takes one shell
        string: quoted here, once."""
        if sid in ray_jobs:
            return
        try:
            self._call("submit_job", entrypoint=shlex.join(argv), submission_id=sid,
                       runtime_env={"env_vars": job_env(self.settings, error_file(directory, sid))},
                       metadata=metadata)
        except RuntimeError as refused:
            try:  # submitted meanwhile (by a second gateway on the same store): not an error
                self._call("get_job_info", sid)
            except RuntimeError:
                raise refused from None

    def _submit(self, job: Job, ray_jobs: dict) -> None:
        attempt = job.attempt + 1
        sid = submission_id(job.id, attempt)
        try:
            self._submit_ray(sid, entrypoint(self.settings, job), self.settings.job_dir(job.id), ray_jobs,
                             flm_job=job.id, owner=job.owner, kind=job.kind)
        except RuntimeError as e:
            self.set_state(job, "QUEUED", state="FAILED", error=f"Ray refused the submission: {e}")
            return
        if not self.set_state(job, "QUEUED", state="PENDING", attempt=attempt, ray_submission_id=sid, error=None):
            self._call("stop_job", sid)  # cancelled while we submitted
        log.info("submitted %s as Ray job %s", job.id, sid)

    def _sync(self, job: Job, details) -> None:
        if details is None:
            self.set_state(job, job.state, state="FAILED",
                      error=f"Ray has no record of submission {job.ray_submission_id} (the cluster was restarted?); "
                            f"POST /v1/jobs/{job.id}/resume continues from the last checkpoint")
            return
        self._register_deployment(job)
        status = str(details.status)
        if status == job.state or (job.state == "STOPPING" and status not in TERMINAL):
            return
        error = None
        if status == "FAILED":
            error = self._failure(self.settings.job_dir(job.id), job.ray_submission_id, details)
        self.set_state(job, job.state, state=status, error=error)

    def _failure(self, directory: Path, sid: str, details) -> str:
        path = error_file(directory, sid)
        logs = ""
        if not path.is_file():  # the log is the fallback only: fetching it costs a call to Ray
            with contextlib.suppress(RuntimeError, RayUnavailable):
                logs = self._call("get_job_logs", sid)
        return failure_message(path, logs, details.message)

    # --- deployments ------------------------------------------------------------------------------------------------
    def set_deployment(self, dep: Deployment, expected: str, **values) -> bool:
        with self.sessions.begin() as s:
            done = s.execute(update(Deployment).where(Deployment.id == dep.id, Deployment.state == expected)
                             .values(updated_at=utcnow(), **values)).rowcount == 1
        return done

    def _sync_deployment(self, dep: Deployment, ray_jobs: dict) -> None:
        """DEPLOYING / DELETING: submit the operation's Ray job, or read its outcome."""
        if dep.ray_submission_id is None:
            attempt = dep.attempt + 1
            sid = f"{dep.id}.op{attempt}"
            try:
                self._submit_ray(sid, deployment_entrypoint(self.settings, dep), self.settings.deployment_dir(dep.id),
                                 ray_jobs, flm_deployment=dep.id, owner=dep.owner)
            except RuntimeError as e:
                self.set_deployment(dep, dep.state, state="FAILED", error=f"Ray refused the submission: {e}")
                return
            self.set_deployment(dep, dep.state, ray_submission_id=sid, attempt=attempt)
            return
        details = ray_jobs.get(dep.ray_submission_id)
        if details is None:
            self.set_deployment(dep, dep.state, state="FAILED",
                                error=f"Ray has no record of {dep.ray_submission_id} (the cluster was restarted?)")
            return
        status = str(details.status)
        if status == "SUCCEEDED" and dep.state == "DEPLOYING":
            result = read_json(self.settings.deployment_dir(dep.id) / "result.json") or {}
            self.set_deployment(dep, "DEPLOYING", state="RUNNING", url=result.get("url"), error=None)
        elif status == "SUCCEEDED":
            self.set_deployment(dep, "DELETING", state="DELETED", url=None)
        elif status in ("FAILED", "STOPPED"):
            error = self._failure(self.settings.deployment_dir(dep.id), dep.ray_submission_id, details)
            self.set_deployment(dep, dep.state, state="FAILED", error=error)

    def _check_serving(self, running: list[Deployment]) -> bool:
        """Every serve_check_s: a RUNNING deployment whose Serve application is gone becomes FAILED (compare-and-
        set: a DELETE meanwhile wins). True if it asked Serve."""
        if not running or time.monotonic() < self._next_serve_check:
            return False
        self._next_serve_check = time.monotonic() + self.settings.serve_check_s
        apps = (self._call("get_serve_details", kind="serve") or {}).get("applications") or {}
        for dep in running:
            if dep.id not in apps:
                self.set_deployment(dep, "RUNNING", state="FAILED", url=None,
                                    error=f"Serve has no application {dep.id} (the Ray cluster was restarted?); "
                                          f"POST /v1/deployments deploys the checkpoint again")
                log.warning("deployment %s: Serve no longer has it", dep.id)
        return True

    def _register_deployment(self, job: Job) -> None:
        """A pipeline's deploy step (run inside its Ray job) becomes a deployment of the job's owner; a FAILED or
        DELETED one of the same name and owner (a Ray cluster since restarted, an earlier `flm demo`) is replaced, as
        POST /v1/deployments replaces it."""
        if job.kind != "pipeline" or not job.spec.get("deploy"):
            return
        steps = (read_json(self.settings.job_dir(job.id) / "pipeline.json") or {}).get("steps", [])
        result = next((st.get("result") for st in steps if st["name"] == "deploy" and st["state"] == "SUCCEEDED"),
                      None)
        if not result:
            return
        values = dict(owner=job.owner, job_id=job.id, checkpoint=result["checkpoint"],
                      spec={**job.spec["deploy"], "name": result["name"]}, state="RUNNING", url=result["url"],
                      error=None, ray_submission_id=None)
        with self.sessions.begin() as s:
            dep = s.get(Deployment, result["name"])
            if dep is None:
                s.add(Deployment(id=result["name"], attempt=0, **values))
            elif dep.state in ("FAILED", "DELETED") and dep.owner == job.owner and dep.job_id != job.id:
                for k, v in {**values, "updated_at": utcnow()}.items():
                    setattr(dep, k, v)


def relative(settings: GatewaySettings, path: Path) -> str:
    try:
        return str(path.relative_to(settings.home))
    except ValueError:
        return str(path)


def write_json(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
