"""Per-key quotas of the gateway: caps on what an owner holds (jobs that run, deployments, their replicas), on
the server-sent event streams it keeps open, and on how fast it writes and queries models.

A request over a cap is answered 429 with `Retry-After` and a message that names the cap, its value and how to
raise it. The caps are `api.settings.Limits`: the gateway's (FLM_MAX_RUNNING_JOBS, ...) with the calling key's
own put over them (`flm keys limits KEY --max-running-jobs N`). What is counted is the owner's: every key of an
owner shares its jobs, deployments and streams. Held counts (jobs, deployments) come from the store, so they hold
across gateway restarts and processes; streams and request rates are counted in this process.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.settings import Limits
from api.store import Deployment, Job

RUNNING = ("QUEUED", "PENDING", "RUNNING", "STOPPING")  # a job that holds (or is about to hold) the cluster
LIVE_DEPLOYMENTS = ("DEPLOYING", "RUNNING", "DELETING")  # a deployment whose replicas may be up


class QuotaExceeded(Exception):
    """A cap of `Limits` is reached: HTTP 429 with `retry_after` seconds."""

    def __init__(self, cap: str, message: str, retry_after: float):
        self.cap, self.retry_after = cap, max(1, math.ceil(retry_after))
        super().__init__(f"{message}; raise it for this key with `flm keys limits <key> {Limits.option(cap)} N` on the "
                         f"gateway's machine, or for every key with FLM_{cap.upper()}")


def replicas(spec: dict) -> int:
    """The Serve replicas a deployment's settings may start (an autoscaled one: its max_replicas)."""
    scaling = spec.get("autoscaling")
    return int(scaling["max_replicas"]) if scaling else int(spec.get("replicas", 1))


def check_running_jobs(sessions: sessionmaker[Session], owner: str, limits: Limits, adding: int = 1) -> None:
    cap = limits.max_running_jobs
    if cap is None:
        return
    with sessions() as s:
        n = s.scalar(select(func.count()).select_from(Job).where(Job.owner == owner, Job.state.in_(RUNNING)))
    if n + adding > cap:
        raise QuotaExceeded("max_running_jobs", f"max_running_jobs: {owner} has {n} jobs queued or running, the "
                                                f"cap is {cap}; wait for one to end, cancel one, or submit with "
                                                f"hold: true", 60)


def check_deployments(sessions: sessionmaker[Session], owner: str, limits: Limits, new_replicas: int) -> None:
    """One more deployment of `new_replicas` replicas."""
    if limits.max_deployments is None and limits.max_replicas is None:
        return
    with sessions() as s:
        deps = s.execute(select(Deployment.job_id, Deployment.spec).where(
            Deployment.owner == owner, Deployment.state.in_(LIVE_DEPLOYMENTS))).all()
        pipelines = dict(s.execute(select(Job.id, Job.spec).where(  # each will deploy when its training ends
            Job.owner == owner, Job.kind == "pipeline", Job.state.in_(("HELD", *RUNNING)))).all())
    held = [spec for job_id, spec in deps if job_id not in pipelines] + \
           [spec["deploy"] for spec in pipelines.values() if spec.get("deploy")]
    if limits.max_deployments is not None and len(held) + 1 > limits.max_deployments:
        raise QuotaExceeded("max_deployments", f"max_deployments: {owner} has {len(held)} deployments (counting "
                                               f"pipelines that will deploy), the cap is {limits.max_deployments}; "
                                               f"DELETE /v1/deployments/<name> one first", 30)
    in_use = sum(replicas(spec) for spec in held)
    if limits.max_replicas is not None and in_use + new_replicas > limits.max_replicas:
        raise QuotaExceeded("max_replicas", f"max_replicas: {owner}'s deployments hold {in_use} replicas and this "
                                            f"one asks for {new_replicas}, the cap is {limits.max_replicas}; ask "
                                            f"for fewer replicas (or a lower autoscaling.max_replicas)", 30)


class RateLimiter:
    """A token bucket per (owner, kind): `per_minute` requests in any minute, in bursts of up to `per_minute`."""

    def __init__(self):
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, owner: str, cap: str, per_minute: int | None) -> None:
        if per_minute is None:
            return
        now, rate = time.monotonic(), per_minute / 60.0
        with self._lock:
            tokens, then = self._buckets.get((owner, cap), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[(owner, cap)] = (tokens, now)
                raise QuotaExceeded(cap, f"{cap}: {owner} sent more than {per_minute} of these requests in a "
                                         f"minute; retry after the Retry-After seconds", (1.0 - tokens) / rate)
            self._buckets[(owner, cap)] = (tokens - 1.0, now)


class StreamSlots:
    """Open streams per owner. `take()` holds a slot (or raises QuotaExceeded) and returns its release, which
    `guard()` calls when the stream ends, is cancelled (the client went away), or is never started and collected;
    releasing twice releases once."""

    def __init__(self):
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, owner: str) -> int:
        return self._open.get(owner, 0)

    def take(self, owner: str, cap: int | None) -> Callable[[], None]:
        with self._lock:
            n = self._open.get(owner, 0)
            if cap is not None and n >= cap:
                raise QuotaExceeded("max_streams", f"max_streams: {owner} has {n} streams open, the cap is {cap}; "
                                                   f"close one (or poll without streaming)", 5)
            self._open[owner] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._open[owner] -= 1

        return release

    @staticmethod
    def guard(stream: AsyncIterator, release: Callable[[], None]) -> AsyncIterator:
        """`stream`, releasing its slot however it ends."""

        async def guarded():
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                release()

        gen = guarded()
        weakref.finalize(gen, release)
        return gen
