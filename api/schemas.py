"""The gateway's request and response bodies. Requests are strict (`extra="forbid"`): a misspelt field is a 422
naming it, never silently ignored. A growth plan is validated by `flm.config.GrowthPlan` itself, so a shrinking
stage is refused by the same rule as on the command line."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.search_spec import SearchConfig
from flm.config import GrowthPlan
from flm.plan import Hardware, PlanCost
from service.spec import Autoscaling, DeploymentRequest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAME = r"^[a-z0-9][a-z0-9-]{0,47}$"  # a deployment name: also a Serve application name and a URL path segment

JobState = Literal["HELD", "QUEUED", "PENDING", "RUNNING", "STOPPING", "SUCCEEDED", "FAILED", "STOPPED"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JobKind = Literal["train", "tune", "eval", "pipeline"]  # the `kind` of each JobRequest below
Backend = Literal["ddp", "zero1", "zero2", "zero3"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def preset_names(key: str = "stages") -> list[str]:
    """The presets in configs/ that have `key`: stages (growth plans), grid (searches), widths (proxy families)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if key in (yaml.safe_load(p.read_text()) or {}))


def _preset(value: Any, key: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    if value not in preset_names(key):
        raise ValueError(f"unknown preset {value!r}; give {what} mapping or one of: {', '.join(preset_names(key))}")
    return yaml.safe_load((CONFIGS / f"{value}.yaml").read_text())


MAX_STAGES = 64  # per plan (FLM-101B's has 4): bounds the work of validating a plan and of its progress


def plan_or_preset(value: Any) -> Any:
    """A plan given as a preset name ("tiny") is read from configs/<name>.yaml; a mapping is validated as is, if it
    has at most MAX_STAGES stages."""
    value = _preset(value, "stages", "a plan")
    if isinstance(value, dict) and isinstance(value.get("stages"), list) and len(value["stages"]) > MAX_STAGES:
        raise ValueError(f"stages: {len(value['stages'])} stages; a plan has at most {MAX_STAGES}")
    return value


def search_or_preset(value: Any) -> dict | None:
    """A proxy search (`flm tune`'s SEARCH.yaml) inline or as a preset name ("search"), its `proxy` inline or a
    preset name ("proxy"), validated by cluster.search_spec.SearchConfig (no torch in the gateway's process)."""
    if value is None:
        return None
    value = _preset(value, "grid", "a search")
    if not isinstance(value, dict):
        raise ValueError("expected a search mapping or a preset name")
    if isinstance(value.get("proxy"), str):
        value = {**value, "proxy": _preset(value["proxy"], "widths", "a proxy family")}
    try:
        SearchConfig.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{loc}: {err['msg'].removeprefix('Value error, ')}" if loc else err["msg"]) from None
    return value


# Stand-ins for what a tune step will find, so a plan that leaves them to the search validates before it runs; they
# change no shape, step or token count (what validation and progress depend on).
SEARCHED_STAND_IN = {"lr": 1e-3, "init_std": 0.02, "output_mult": 1.0}


def check_stage_steps(plan: GrowthPlan) -> GrowthPlan:
    """A stage of fewer tokens than one batch trains no step (and has no progress to show): refused at the door."""
    for k, (stage, cfg) in enumerate(zip(plan.stages, plan.model_configs(), strict=True)):
        batch = stage.batch_size * cfg.seq_len
        if stage.tokens < batch:
            raise ValueError(f"stages.{k}.tokens: {stage.tokens} tokens make no optimizer step of "
                             f"{stage.batch_size}x{cfg.seq_len} tokens; give at least {batch} (one batch)")
    return plan


def searched_plan(data: dict) -> GrowthPlan:
    """A plan whose LR, init_std and output_mult may come from a tune step (`hparams_from`), validated with
    stand-ins for the missing ones (the values written in the plan win, as with hparams_from)."""
    stages = data.get("stages")
    if isinstance(stages, list):
        filled = []
        for stage in stages:
            if isinstance(stage, dict):
                stage = {"lr": SEARCHED_STAND_IN["lr"], **stage}
                if isinstance(stage.get("model"), dict):
                    stage["model"] = {"init_std": SEARCHED_STAND_IN["init_std"],
                                      "output_mult": SEARCHED_STAND_IN["output_mult"], **stage["model"]}
            filled.append(stage)
        data = {**data, "stages": filled}
    return GrowthPlan.model_validate(data)


# --- requests -------------------------------------------------------------------------------------------------
class DeploySettings(_Request):
    """What an owner chooses of a deployment (a `service.spec.DeploymentRequest`); the gateway sets the rest."""

    name: str | None = Field(default=None, pattern=NAME, description="model name in /v1/completions; "
                                                                    "default: the job id or a generated one")
    tp: int = Field(default=1, ge=1, le=64, description="tensor-parallel degree: shards per replica")
    replicas: int = Field(default=1, ge=1, le=64, description="replicas when autoscaling is not given")
    autoscaling: Autoscaling | None = None

    def request(self, checkpoint: str, name: str) -> DeploymentRequest:
        """The service's spec of serving `checkpoint` as `name` with these settings."""
        return DeploymentRequest(checkpoint=checkpoint, name=name, tp=self.tp, replicas=self.replicas,
                                 autoscaling=self.autoscaling)


class EvalSettings(_Request):
    subtasks: str = Field(default="offline", min_length=1, description="an IQ suite name or subtasks a,b,c")
    n_items: int | None = Field(default=None, ge=1, le=10_000, description="items per subtask")
    seed: int = 0


class TrainJob(_Request):
    """Train a growth plan with Ray Train (`flm cluster train`), one run per stage."""

    kind: Literal["train"]
    plan: GrowthPlan = Field(description="a growth plan, or the name of a preset in configs/ such as 'tiny'")
    backend: Backend | None = Field(default=None, description="overrides every stage's layout.backend")
    max_failures: int = Field(default=3, ge=-1, description="worker-group restarts per stage (-1: unlimited)")
    hold: bool = Field(default=False, description="create the job but start it only on POST .../resume")

    _preset = field_validator("plan", mode="before")(plan_or_preset)
    _steps = field_validator("plan")(check_stage_steps)


class TuneJob(_Request):
    """The μP proxy search (`flm tune SEARCH.yaml`) with Ray Tune."""

    kind: Literal["tune"]
    search: dict[str, Any] = Field(description="the SEARCH.yaml document of `flm tune` (its proxy inline or a "
                                               "preset name), or a preset name such as 'search'")
    hold: bool = False

    _search = field_validator("search", mode="before")(search_or_preset)


class EvalJob(EvalSettings):
    """The IQ suite (`flm eval`) on a checkpoint."""

    kind: Literal["eval"]
    checkpoint: str = Field(min_length=1, description="a checkpoint directory inside the storage root, or a job "
                                                      "id (its newest checkpoint)")
    hold: bool = False


class PipelineJob(_Request):
    """tune (optional) -> train -> eval (optional) -> deploy (optional), as one Ray Job (`python -m api.pipeline`).

    With a tune step the plan may leave out `lr` (per stage) and `init_std` / `output_mult` (per stage model): the
    search's best point fills them in (`hparams_from`); values written in the plan win."""

    kind: Literal["pipeline"]
    tune: dict[str, Any] | None = Field(default=None, description="a SEARCH.yaml document or preset name; its best "
                                                                   "point is applied to the plan before training")
    plan: dict[str, Any] = Field(description="a growth plan, or the name of a preset in configs/")
    eval: EvalSettings | None = Field(default=None, description="the IQ suite on the final checkpoint")
    deploy: DeploySettings | None = Field(default=None, description="serve the final checkpoint")
    backend: Backend | None = None
    max_failures: int = Field(default=3, ge=-1)
    hold: bool = False

    _search = field_validator("tune", mode="before")(search_or_preset)

    @field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, value: Any, info) -> dict:
        value = plan_or_preset(value)
        if not isinstance(value, dict):
            raise ValueError("expected a growth plan mapping or a preset name")
        if info.data.get("tune") is None:
            return check_stage_steps(GrowthPlan.model_validate(value)).model_dump(mode="json")
        check_stage_steps(searched_plan(value))
        return value

    def growth_plan(self) -> GrowthPlan:
        return searched_plan(self.plan) if self.tune is not None else GrowthPlan.model_validate(self.plan)


JobRequest = Annotated[TrainJob | TuneJob | EvalJob | PipelineJob, Field(discriminator="kind")]
KINDS = get_args(JobKind)  # the `kind` tags of JobRequest


def plan_text(value: Any) -> Any:
    """A plan given as text: a preset name ("tiny") or a plan's YAML, as pasted into the console's plan page."""
    if not isinstance(value, str):
        return value
    if value.strip() in preset_names():
        return plan_or_preset(value.strip())
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"not valid YAML{line}; give a preset name ({', '.join(preset_names())}) or a plan's "
                         f"YAML") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a preset name ({', '.join(preset_names())}) or a plan's YAML (a mapping with "
                         f"stages)")
    return data


class HardwareRequest(Hardware, _Request):
    """`flm plan`'s throughput and price assumptions (its --gpus, --tflops-per-gpu, --mfu, --peak-tflops, --price)."""


class PlanRequest(_Request):
    """What `flm plan` computes for a growth plan: FLOPs, days, GPU-days and dollars per stage, against training the
    final size from scratch. `lr`, `init_std` and `output_mult` may be left out (a plan whose tune step finds them):
    they change no cost."""

    plan: dict[str, Any] | str = Field(description="a growth plan: a mapping, its YAML text, or a preset name in "
                                                   "configs/ such as 'flm-101b'")
    hardware: HardwareRequest = Field(default_factory=HardwareRequest)

    @field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, value: Any) -> dict:
        value = plan_text(value)
        if not isinstance(value, dict):
            raise ValueError("expected a growth plan mapping, its YAML text or a preset name")
        searched_plan(value)
        return value


class NewDeployment(DeploySettings):
    """The body of POST /v1/deployments: serve a checkpoint (a path inside the storage root) or a finished job's
    final checkpoint."""

    checkpoint: str | None = Field(default=None, min_length=1)
    job_id: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.checkpoint is None) == (self.job_id is None):
            raise ValueError("give exactly one of checkpoint or job_id")
        return self


# --- responses ------------------------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    """Every 4xx and 5xx of the gateway: one line that names the problem (and the field, when there is one)."""

    error: str
    field: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(default=None, description="the request field at fault")
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every 4xx and 5xx of the OpenAI routes (/v1/models, /v1/completions, /v1/chat/completions): OpenAI's error
    body, which OpenAI clients read."""

    error: OpenAIErrorDetail


class Progress(BaseModel):
    step: int = Field(description="optimizer steps done")
    total_steps: int | None = None
    tokens: int = Field(description="training tokens done")
    total_tokens: int | None = None
    percent: float | None = Field(default=None, description="tokens done / tokens of the whole plan, in %")


class PipelineStep(BaseModel):
    name: Literal["tune", "train", "eval", "deploy"]
    state: Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "SKIPPED"]
    seconds: float | None = None
    result: dict[str, Any] | None = None


class JobView(BaseModel):
    id: str
    kind: JobKind
    owner: str
    state: JobState
    attempt: int = Field(description="Ray submissions so far (a resume adds one)")
    ray_submission_id: str | None
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    stage: int | None = Field(default=None, description="the growth stage training now (or last trained)")
    stages: int | None = Field(default=None, description="stages in the plan")
    progress: Progress | None = None
    metrics: dict[str, Any] | None = Field(default=None, description="the newest record of the metric stream")
    val_loss: float | None = Field(default=None, description="the newest validation loss")
    checkpoints: list[str] = Field(default=[], description="checkpoint directories, relative to the storage root")
    run_dir: str | None = Field(default=None, description="the training run directory, relative to the root")
    steps: list[PipelineStep] | None = Field(default=None, description="a pipeline's steps")
    results: dict[str, Any] | None = Field(default=None, description="eval scores, tune's best point, deployment")
    spec: dict[str, Any]


class JobList(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int


class MetricsPage(BaseModel):
    records: list[dict[str, Any]]
    next: int = Field(description="pass as ?after= to get only newer records")
    state: JobState


class LogsView(BaseModel):
    id: str
    ray_submission_id: str | None
    logs: str


class ModelRequest(BaseModel):
    """An OpenAI completions or chat completions body: `model` picks the deployment, the rest goes to it as is."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="a deployment name (see GET /v1/models)")


DeploymentState = Literal["DEPLOYING", "RUNNING", "FAILED", "DELETING", "DELETED"]


class DeploymentView(BaseModel):
    id: str = Field(description="the deployment's name: the model name of /v1/completions")
    owner: str
    job_id: str | None
    checkpoint: str = Field(description="relative to the storage root")
    state: DeploymentState
    url: str | None = Field(description="Serve's own URL of the application (base_url = url + '/v1')")
    error: str | None = None
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class DeploymentList(BaseModel):
    deployments: list[DeploymentView]


class PlanView(PlanCost):
    """`flm plan`'s cost table (flm.plan.PlanCost) of the plan named `name`."""

    name: str


class Preset(BaseModel):
    name: str
    text: str = Field(description="the preset's YAML, as in configs/<name>.yaml")


class PresetList(BaseModel):
    plans: list[Preset] = Field(description="the growth plans of configs/ (those with stages)")


class KeyInfo(BaseModel):
    owner: str
