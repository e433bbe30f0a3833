"""The Ray Serve application: `FLMDeployment` replicas, each a tensor-parallel `ShardGroup` (service/tp.py) driven by
a continuously batching `Engine`, behind the OpenAI-compatible routes of service/routes.py.

`application(DeploymentRequest)` is the bound application (`service.app:application`, the import path of KubeRay's
RayService); the REST gateway's Ray Jobs and `flm serve` call `deploy(DeploymentRequest(...)) -> url` and
`undeploy(name)`.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig

from flm.config import parse
from flm.connect import connect
from service.routes import OpenAIServer, build_api
from service.spec import DeploymentRequest, check_request
from service.tp import ShardGroup


@serve.deployment
@serve.ingress()
class FLMDeployment:
    """One replica: a ShardGroup of `tp` actors in this replica's placement group (Serve creates it from
    `placement_group_bundles`, one bundle per shard), an Engine, and the OpenAI routes. `check_health` pings every
    shard: a dead shard fails the check and Serve replaces the whole replica (its shard actors die with it)."""

    def __init__(self, request: DeploymentRequest):
        self.request = request
        replica = serve.get_replica_context().replica_id.unique_id
        self.group = ShardGroup(request.checkpoint, request.tp, max_batch=request.max_batch,
                                num_cpus=request.cpus_per_shard, num_gpus=request.gpus_per_shard, dtype=request.dtype,
                                name=f"flm-{request.name}-{replica}")
        self.server = OpenAIServer.with_model(self.group, request, self.group.cfg.seq_len, self.group.cfg.vocab_size)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.server, health=self.check_health)

    async def check_health(self) -> None:
        if not self.server.engine.healthy:
            raise RuntimeError(f"engine failed: {self.server.engine.error!r}")
        await asyncio.to_thread(self.group.check, self.request.health_check_timeout_s / 2)

    def __del__(self):
        if hasattr(self, "server"):
            self.server.engine.close()
        if hasattr(self, "group"):
            self.group.shutdown()


def deployment_options(request: DeploymentRequest) -> dict:
    """Serve deployment options for `request`: one placement-group bundle per shard (the replica itself sits in
    the first), STRICT_PACK, health checks, and either a fixed replica count or autoscaling."""
    first = {"CPU": request.cpus_per_shard + request.replica_cpus}
    rest = {"CPU": request.cpus_per_shard}
    if request.gpus_per_shard:
        first["GPU"] = rest["GPU"] = request.gpus_per_shard
    options = dict(
        ray_actor_options={"num_cpus": request.replica_cpus},
        placement_group_bundles=[first] + [rest] * (request.tp - 1),
        placement_group_strategy="STRICT_PACK",
        health_check_period_s=request.health_check_period_s,
        health_check_timeout_s=request.health_check_timeout_s,
        max_ongoing_requests=request.max_ongoing_requests or 4 * request.max_batch,
        # an unbounded queue hides overload behind ever longer waits: a full one answers 429 at once
        max_queued_requests=request.max_queued_requests or 4 * request.max_batch * (
            request.autoscaling.max_replicas if request.autoscaling else request.replicas),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
    )
    a = request.autoscaling
    if a is not None:
        options["autoscaling_config"] = {
            **a.model_dump(exclude_none=True, exclude={"target_ongoing_requests"}),
            "target_ongoing_requests": a.target_ongoing_requests or request.max_batch}
    else:
        options["num_replicas"] = request.replicas
    return options


def application(request: DeploymentRequest):
    """The bound Serve application for `request`."""
    return FLMDeployment.options(**deployment_options(request)).bind(request)


def _http_address() -> tuple[str, int]:
    """Host and port the running Serve proxies listen on."""
    import ray
    from ray.serve.context import _get_global_client  # the running instance's HTTP options have no public getter

    http = _get_global_client().http_config
    host = ray.util.get_node_ip_address() if http.host in ("0.0.0.0", "::") else http.host
    return host, http.port


def deploy(request: DeploymentRequest | dict, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy a checkpoint as the Serve application `request.name` and return its URL once every replica is
    ready; OpenAI clients use `url + "/v1"` as their base_url, and `request.name` as the model.

    For the REST gateway: call it from a process connected to the Ray cluster (`flm.connect.connect`; a process
    that is not connected joins $RAY_ADDRESS, else starts a local cluster). The checkpoint path must be
    readable on every node. Serve's HTTP proxy is started on `host:port` if it is not running yet (a running one
    keeps its address). Redeploying a name updates that application in place. Raises FLMConfigError for a bad
    request (missing checkpoint or tokenizer, a TP degree that does not divide the heads, invalid fields) before
    anything starts, and RuntimeError if Serve cannot start the replicas."""
    import ray

    if isinstance(request, dict):
        request = parse(DeploymentRequest, request, "deployment request")
    check_request(request)
    connect(ray)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(request), name=request.name, route_prefix=request.prefix)
    h, p = _http_address()
    return f"http://{h}:{p}{request.prefix.rstrip('/')}"


def undeploy(name: str) -> None:
    """Delete the Serve application `name` (its replicas and their shard actors); a no-op if there is none."""
    serve.delete(name)
