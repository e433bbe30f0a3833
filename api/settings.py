"""Where the gateway keeps things and which clusters it talks to; every field has an environment variable.

    $FLM_HOME/                the storage root: every path in a request is resolved inside it
      gateway.db              the SQLite store (FLM_DATABASE_URL selects another database)
      jobs/<id>/              a job's own files: spec.json, plan.yaml, eval/, pipeline.json
      runs/<id>/              its training run directory (metrics.jsonl, checkpoints/), Ray Train's runs beside it
      owners/<owner>/         a key owner's own files (datasets, checkpoints trained elsewhere)

A path in a request must lie in the caller's `owners/<owner>/` or in the `runs/<id>/` or `jobs/<id>/` of one of the
caller's jobs: no key reads another owner's files.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flm.config import FLMConfigError, flm_home

DEFAULT_PORT = 8080  # Ray Serve's HTTP proxy takes 8000 on the head node
OWNER_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")  # an owner that can name a directory as is


def env_int(name: str, default: int, least: int) -> int:
    """A whole number of at least `least` from the environment variable `name` (its absence: `default`); anything
    else is an FLMConfigError naming the variable, not a traceback at the gateway's start."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise FLMConfigError(f"{name}: {text!r} is not a whole number >= {least}")
    return value


class Limits(BaseModel):
    """What one API key may use; `None` is no cap. The gateway's defaults (below) are overridden by `FLM_<FIELD>`
    (FLM_MAX_RUNNING_JOBS=16, or `unlimited`); a key's own limits (`flm keys limits KEY --max-running-jobs N`)
    override them field by field. Counts are of the key's owner: every key of an owner shares its jobs,
    deployments and streams; rates and streams are counted by each gateway process."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # built at first use: `flm` starts sooner

    max_running_jobs: int | None = Field(default=8, ge=0, description="jobs QUEUED, PENDING, RUNNING or STOPPING "
                                                                      "(HELD, finished ones are free)")
    max_deployments: int | None = Field(default=4, ge=0, description="deployments DEPLOYING, RUNNING or DELETING, "
                                                                     "and pipelines that will deploy")
    max_replicas: int | None = Field(default=8, ge=0, description="Serve replicas of those deployments together "
                                                                  "(an autoscaled one counts its max_replicas)")
    max_streams: int | None = Field(default=16, ge=0, description="server-sent event streams open at once "
                                                                  "(job metrics, model answers with stream: true)")
    requests_per_minute: int | None = Field(default=120, ge=1, description="job and deployment writes (submit, "
                                                                           "resume, cancel, deploy, delete)")
    model_requests_per_minute: int | None = Field(default=1200, ge=1, description="/v1/completions and "
                                                                                  "/v1/chat/completions requests")

    @classmethod
    def from_env(cls, env: dict | None = None) -> Limits:
        """The defaults, each overridden by its `FLM_<FIELD>` variable (a number, or `unlimited`)."""
        env = os.environ if env is None else env
        values = {}
        for name in cls.model_fields:
            text = env.get(f"FLM_{name.upper()}")
            if text is not None:
                values[name] = None if text.strip().lower() in ("unlimited", "none") else text
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            raise FLMConfigError(f"FLM_{str(err['loc'][0]).upper()}: {err['msg']} (a whole number, or "
                                 f"'unlimited')") from None

    @staticmethod
    def option(name: str) -> str:
        """The command-line option that sets field `name` for one key: `--max-running-jobs`."""
        return "--" + name.replace("_", "-")

    def over(self, key_limits: dict | None) -> Limits:
        """These limits with a key's own ones (a dict of fields, None for no cap) put over them."""
        return type(self).model_validate({**self.model_dump(), **key_limits}) if key_limits else self


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    home: Path = Field(default_factory=flm_home, description="storage root ($FLM_HOME)")
    database_url: str = Field(default="", description="SQLAlchemy URL ($FLM_DATABASE_URL); empty: home/gateway.db")
    ray_address: str = Field(default_factory=lambda: os.environ.get("FLM_RAY_ADDRESS", "http://127.0.0.1:8265"),
                             description="the Ray dashboard (job server) URL ($FLM_RAY_ADDRESS)")
    serve_url: str = Field(default_factory=lambda: os.environ.get("FLM_SERVE_URL", "http://127.0.0.1:8000"),
                           description="Ray Serve's HTTP ingress, where model routes are proxied ($FLM_SERVE_URL)")
    job_python: str = Field(default_factory=lambda: os.environ.get("FLM_JOB_PYTHON", sys.executable),
                            description="the Python that runs job entrypoints on the head node ($FLM_JOB_PYTHON)")
    max_body_bytes: int = Field(default_factory=lambda: env_int("FLM_MAX_BODY_BYTES", 1 << 20, least=1024), ge=1024,
                                description="larger request bodies get 413 ($FLM_MAX_BODY_BYTES)")
    limits: Limits = Field(default_factory=Limits.from_env, description="each key's caps unless the key has its own")
    poll_s: float = Field(default=1.0, gt=0, description="how often job states are reconciled with Ray")
    serve_check_s: float = Field(default=10.0, gt=0, description="how often RUNNING deployments are checked against "
                                 "Serve's applications (a restarted Ray cluster has none), seconds")

    @property
    def db_url(self) -> str:
        return self.database_url or os.environ.get("FLM_DATABASE_URL") or f"sqlite:///{self.home / 'gateway.db'}"

    def job_dir(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id

    @property
    def runs_dir(self) -> Path:
        """Where every job's run directory is (its metrics.jsonl, checkpoints, tensorboard/): TensorBoard's logdir."""
        return self.home / "runs"

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def deployment_dir(self, name: str) -> Path:
        """A deployment's files: the spec.json its Ray job deploys, the result.json (its URL) that job writes."""
        return self.home / "deployments" / name

    def owner_dir(self, owner: str) -> Path | None:
        """The owner's own directory; None for an owner whose name is no plain directory name ('..', 'a/b')."""
        return self.home / "owners" / owner if OWNER_DIR_NAME.match(owner) and ".." not in owner else None
