"""What a deployment is: `DeploymentRequest`, one served checkpoint, and its `Autoscaling`.

The one spec of a deployment: `flm serve` builds it from its options, the REST gateway (api/) from what an owner
may choose (`api.schemas.DeploySettings`), KubeRay's RayService gives it as `args:` of `service.app:application`.
This module imports only pydantic and flm.config, so the gateway validates a deployment with it in a process that
never imports torch or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flm.config import FLMConfigError


class Autoscaling(BaseModel):
    """Serve's autoscaling_config, the fields a user sets. Replicas are added when the requests in flight per
    replica exceed `target_ongoing_requests` (default: the engine's max batch, which it serves at once)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float | None = Field(default=None, gt=0, description="requests in flight per "
                                                                                 "replica; default: its max batch")
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class DeploymentRequest(BaseModel):
    """One served checkpoint: what `flm serve`, the REST gateway and a RayService ask for."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory, readable at the same path on every node")
    name: str = Field(default="flm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="the model id clients send, and the Serve application's name")
    tp: int = Field(default=1, ge=1, description="tensor-parallel degree: shard actors per replica")
    replicas: int = Field(default=1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: Autoscaling | None = None
    route_prefix: str | None = Field(default=None, description="URL prefix; default /<name>")
    max_batch: int = Field(default=16, ge=1, description="requests decoded together per replica")
    max_batch_tokens: int = Field(default=0, ge=0, description="KV positions reserved by running requests "
                                                               "(prompt + max_tokens each); 0: max_batch x context")
    max_n: int = Field(default=4, ge=1, description="most choices per prompt (n) of a request")
    max_ongoing_requests: int = Field(default=0, ge=0, description="Serve's concurrency cap per replica; "
                                                                   "0: 4 x max_batch")
    max_queued_requests: int = Field(default=0, ge=-1, description="requests Serve holds waiting for a replica, "
                                     "per caller; beyond it Serve answers 429 with Retry-After (overload); 0: 4 x "
                                     "max_batch x replicas (the most), -1: no limit")
    cpus_per_shard: float = Field(default=1.0, ge=0)
    gpus_per_shard: float = Field(default=0.0, ge=0, description="> 0: shards on GPUs, NCCL between them")
    replica_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved for the replica (HTTP + sampling)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)

    @property
    def prefix(self) -> str:
        return self.route_prefix if self.route_prefix is not None else f"/{self.name}"


def check_request(request: DeploymentRequest) -> None:
    """Everything that can be wrong with a request, found before any actor starts (FLMConfigError): reads the
    checkpoint's config, so it imports service.tp (torch) here, where a deployment is about to start."""
    from service.tp import read_config, shard_config

    cfg = read_config(request.checkpoint)
    shard_config(cfg, request.tp)
    if not (Path(request.checkpoint) / "tokenizer").is_dir():
        raise FLMConfigError(f"{request.checkpoint}: no tokenizer/ directory; serving needs the tokenizer the model "
                             f"was trained with")
    if not request.prefix.startswith("/"):
        raise FLMConfigError(f"route_prefix: {request.prefix!r} must start with '/'")
