"""api/quotas.py through the real gateway under uvicorn (real HTTP, a temporary SQLite store, no Ray: jobs stay
QUEUED or HELD, deployments DEPLOYING): each cap of api.settings.Limits answers 429 with Retry-After and a message
naming the cap and how to raise it, frees up when what it counts ends, and a key's own limits win over the
gateway's; bodies over the limit are 413; the model stream cap with a real model served in process."""

import json
import time

import httpx
import pytest
import yaml

from api.app import create_app
from api.schemas import CONFIGS, MAX_STAGES
from api.settings import GatewaySettings, Limits
from api.store import Deployment, Job, create_key, set_key_limits, utcnow
from flm.config import FLMConfigError
from tests.conftest import uvicorn_server

LIMITS = Limits(max_running_jobs=2, max_deployments=2, max_replicas=3, max_streams=2, requests_per_minute=1000,
                model_requests_per_minute=1000)
BODY_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The gateway with small caps under uvicorn in a thread; yields (app, base url, storage root)."""
    root = tmp_path_factory.mktemp("root")
    app = create_app(GatewaySettings(home=root, ray_address="http://127.0.0.1:9", limits=LIMITS,
                                     max_body_bytes=BODY_LIMIT), reconcile=False)
    with uvicorn_server(app) as url:
        yield app, url, root


@pytest.fixture
def tenant(server, request):
    """An httpx client with a new owner's key (each test its own owner: caps count per owner)."""
    app, url, root = server
    owner = f"o{abs(hash(request.node.nodeid)) % 10**8}"
    key, row = create_key(app.state.gateway.sessions, owner)
    (root / "owners" / owner).mkdir(parents=True)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        client.owner, client.key_id, client.app, client.root = owner, row.id, app, root
        yield client


def assert_429(r, cap: str, *words: str) -> str:
    assert r.status_code == 429, r.text
    body = r.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    field = body["error"]["param"] if isinstance(body["error"], dict) else body["field"]
    assert field == cap and message.startswith(f"{cap}: "), body
    assert f"flm keys limits <key> --{cap.replace('_', '-')} N" in message and f"FLM_{cap.upper()}" in message
    assert int(r.headers["Retry-After"]) >= 1
    for w in words:
        assert w in message, (w, message)
    return message


def job(client, hold=False):
    return client.post("/v1/jobs", json={"kind": "train", "plan": "tiny", "hold": hold})


def set_state(client, table, row_id: str, state: str) -> None:
    """What the reconciler would record (no Ray here)."""
    with client.app.state.gateway.sessions.begin() as s:
        s.get(table, row_id).state = state


def checkpoint(client, name="ckpt") -> str:
    path = client.root / "owners" / client.owner / name
    (path / "tokenizer").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return f"owners/{client.owner}/{name}"


def test_running_jobs_cap(tenant):
    first, second = job(tenant).json(), job(tenant).json()
    assert (first["state"], second["state"]) == ("QUEUED", "QUEUED")
    assert_429(job(tenant), "max_running_jobs", "has 2 jobs queued or running, the cap is 2", "hold: true")
    held = job(tenant, hold=True)
    assert held.status_code == 201, held.text  # a held job runs nothing
    assert_429(tenant.post(f"/v1/jobs/{held.json()['id']}/resume"), "max_running_jobs")
    assert tenant.delete(f"/v1/jobs/{first['id']}").json()["state"] == "STOPPED"  # QUEUED: stopped at once
    assert tenant.post(f"/v1/jobs/{held.json()['id']}/resume").json()["state"] == "QUEUED"
    set_state(tenant, Job, second["id"], "SUCCEEDED")
    assert job(tenant).status_code == 201


def test_a_keys_own_limits_win_over_the_gateways(tenant):
    sessions = tenant.app.state.gateway.sessions
    set_key_limits(sessions, str(tenant.key_id), {"max_running_jobs": 3})
    assert [job(tenant).status_code for _ in range(4)] == [201, 201, 201, 429]
    set_key_limits(sessions, str(tenant.key_id), {"max_running_jobs": None})  # no cap
    assert job(tenant).status_code == 201
    set_key_limits(sessions, str(tenant.key_id), {"max_running_jobs": "default"})
    assert_429(job(tenant), "max_running_jobs", "the cap is 2")
    with pytest.raises(FLMConfigError, match="--max-running-jobs: Input should be greater than or equal to 0"):
        set_key_limits(sessions, str(tenant.key_id), {"max_running_jobs": -1})
    with pytest.raises(FLMConfigError, match="--max-gpus: Extra inputs are not permitted"):
        set_key_limits(sessions, str(tenant.key_id), {"max_gpus": 1})


def test_caps_count_the_owner_across_its_keys(tenant):
    other, _ = create_key(tenant.app.state.gateway.sessions, f"{tenant.owner}-laptop", owner=tenant.owner)
    job(tenant), job(tenant)
    r = tenant.post("/v1/jobs", json={"kind": "train", "plan": "tiny"}, headers={"Authorization": f"Bearer {other}"})
    assert_429(r, "max_running_jobs")


def test_deployment_and_replica_caps(tenant):
    ckpt = checkpoint(tenant)
    r = tenant.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{tenant.owner}-a", "replicas": 2})
    assert r.status_code == 201, r.text
    r = tenant.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{tenant.owner}-b",
                                             "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    assert_429(r, "max_replicas", "hold 2 replicas and this one asks for 2, the cap is 3")
    r = tenant.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{tenant.owner}-b"})
    assert r.status_code == 201, r.text
    assert_429(tenant.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{tenant.owner}-c"}),
               "max_deployments", "has 2 deployments", "the cap is 2")
    # a pipeline that will deploy counts as a deployment from its submission on
    pipeline = {"kind": "pipeline", "plan": "tiny", "deploy": {"name": f"{tenant.owner}-p"}, "hold": True}
    assert_429(tenant.post("/v1/jobs", json=pipeline), "max_deployments")
    set_state(tenant, Deployment, f"{tenant.owner}-a", "DELETED")  # what the reconciler records once deleted
    assert tenant.post("/v1/jobs", json=pipeline).status_code == 201
    assert_429(tenant.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{tenant.owner}-c"}),
               "max_deployments")


def test_write_and_model_rates(tenant):
    set_key_limits(tenant.app.state.gateway.sessions, str(tenant.key_id),
                   {"requests_per_minute": 3, "model_requests_per_minute": 2})
    assert [job(tenant, hold=True).status_code for _ in range(3)] == [201, 201, 201]
    assert_429(job(tenant, hold=True), "requests_per_minute", "more than 3 of these requests in a minute")
    r = job(tenant, hold=True)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 20  # one request's worth: 20 s
    assert tenant.get("/v1/jobs").status_code == 200  # reads are not rate-limited
    body = {"model": "nothing", "prompt": "x"}
    assert [tenant.post("/v1/completions", json=body).status_code for _ in range(2)] == [404, 404]
    r = tenant.post("/v1/chat/completions", json=body)
    assert_429(r, "model_requests_per_minute")
    assert r.json()["error"]["code"] == "rate_limit_exceeded"  # OpenAI's body, as OpenAI clients read it


def test_body_over_the_limit_is_413_naming_the_setting(tenant):
    r = tenant.post("/v1/jobs", json={"kind": "train", "plan": "tiny", "pad": "x" * BODY_LIMIT})
    assert r.status_code == 413 and "over the limit of 16384 bytes" in r.json()["error"]
    assert "FLM_MAX_BODY_BYTES" in r.json()["error"]


class Stream:
    """An open event stream of a job, its first line read."""

    def __init__(self, client, job_id: str):
        self.cm = client.stream("GET", f"/v1/jobs/{job_id}/metrics", params={"stream": True})
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self.lines = self.response.iter_lines()
        assert next(self.lines) == "event: state"

    def close(self) -> None:
        self.cm.__exit__(None, None, None)


def wait_for_slots(streams, owner: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while streams.count(owner) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert streams.count(owner) == n


def test_stream_cap_and_slots_given_back(tenant):
    streams = tenant.app.state.gateway.streams
    held = job(tenant, hold=True).json()["id"]  # a held job's stream lasts until the job ends
    first, second = Stream(tenant, held), Stream(tenant, held)
    with tenant.stream("GET", f"/v1/jobs/{held}/metrics", params={"stream": True}) as r:
        r.read()
        assert_429(r, "max_streams", "has 2 streams open, the cap is 2")
    assert tenant.get(f"/v1/jobs/{held}/metrics").status_code == 200  # a JSON page is no stream
    first.close()  # the client goes away: its slot comes back
    wait_for_slots(streams, tenant.owner, 1)
    third = Stream(tenant, held)
    assert tenant.delete(f"/v1/jobs/{held}").json()["state"] == "STOPPED"
    for stream in (second, third):  # the job ended: each stream says so and closes, and gives its slot back
        assert [line for line in stream.lines if line.startswith("event: ")][-1] == "event: end"
        stream.close()
    wait_for_slots(streams, tenant.owner, 0)


@pytest.fixture
def deployed(tenant, micro_data):
    """A RUNNING deployment of the tenant: a random 32-token-context checkpoint served by the real OpenAI routes
    (service/routes.py, in process, tp = 1) under uvicorn: no Ray."""
    import torch

    from flm.checkpoint import save_checkpoint
    from flm.config import ModelConfig
    from flm.model import GPT
    from service.routes import OpenAIServer, build_api
    from service.spec import DeploymentRequest

    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=32, base_width=32, output_mult=8.0,
                      init_std=0.1)
    ck = tenant.root / "owners" / tenant.owner / "served"
    save_checkpoint(ck, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                    tokenizer_dir=micro_data / "tokenizer")
    name = f"{tenant.owner}-m"
    model = OpenAIServer.in_process(DeploymentRequest(checkpoint=str(ck), name=name))
    with uvicorn_server(build_api(model)) as url:
        with tenant.app.state.gateway.sessions.begin() as s:
            s.add(Deployment(id=name, owner=tenant.owner, checkpoint=f"owners/{tenant.owner}/served", spec={},
                             state="RUNNING", url=url, attempt=0, created_at=utcnow(), updated_at=utcnow()))
        yield name
    model.engine.close()


def test_model_streams_share_the_stream_cap(tenant, deployed, monkeypatch):
    streams = tenant.app.state.gateway.streams
    taken = []  # the owner's open streams right after each slot is taken (a 4-token stream may end before we look)
    take = streams.take

    def counting_take(owner, cap):
        release = take(owner, cap)
        taken.append(streams.count(owner))
        return release

    monkeypatch.setattr(streams, "take", counting_take)
    body = {"model": deployed, "prompt": "To be", "max_tokens": 4, "stream": True}
    held = job(tenant, hold=True).json()["id"]
    first, second = Stream(tenant, held), Stream(tenant, held)
    assert_429(tenant.post("/v1/completions", json=body), "max_streams")
    r = tenant.post("/v1/completions", json={**body, "stream": False})  # an answer in one piece is no stream
    assert r.status_code == 200 and r.json()["choices"], r.text
    second.close()
    wait_for_slots(streams, tenant.owner, 1)
    taken.clear()
    with tenant.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and taken == [2]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0].removeprefix("data: "))["choices"]
    wait_for_slots(streams, tenant.owner, 1)  # the model stream's slot came back; the job stream's is held
    first.close()


def test_gateway_limits_come_from_the_environment():
    limits = Limits.from_env({"FLM_MAX_RUNNING_JOBS": "16", "FLM_MAX_STREAMS": "unlimited"})
    assert (limits.max_running_jobs, limits.max_streams, limits.max_deployments) == (16, None, Limits().max_deployments)
    assert limits.over({"max_running_jobs": 1, "max_replicas": None}).model_dump() == \
        {**limits.model_dump(), "max_running_jobs": 1, "max_replicas": None}
    with pytest.raises(FLMConfigError, match="FLM_REQUESTS_PER_MINUTE: Input should be greater than or equal to 1"):
        Limits.from_env({"FLM_REQUESTS_PER_MINUTE": "0"})
    with pytest.raises(FLMConfigError, match="FLM_MAX_REPLICAS: .*whole number"):
        Limits.from_env({"FLM_MAX_REPLICAS": "lots"})


def many_stages(n: int) -> dict:
    """tiny's first stage, then n - 1 stages of its second without growth (each a step count of its own)."""
    plan = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    same = {k: v for k, v in plan["stages"][1].items() if k not in ("grow", "name")}
    return {**plan, "stages": [plan["stages"][0]] + [dict(same) for _ in range(n - 1)]}


@pytest.mark.parametrize("kind", ["train", "pipeline"])
def test_a_plan_has_at_most_max_stages(tenant, kind):
    r = tenant.post("/v1/jobs", json={"kind": kind, "plan": many_stages(MAX_STAGES + 1), "hold": True})
    assert r.status_code == 422 and r.json() == {"error": f"plan: stages: {MAX_STAGES + 1} stages; a plan has at "
                                                         f"most {MAX_STAGES}", "field": "plan"}
    r = tenant.post("/v1/jobs", json={"kind": kind, "plan": many_stages(MAX_STAGES), "hold": True})
    assert r.status_code == 201, r.text
    assert r.json()["stages"] == MAX_STAGES and r.json()["progress"]["total_steps"] == 128 + 64 * (MAX_STAGES - 1)


@pytest.mark.parametrize("value", ["12x", "100"])
def test_a_bad_body_limit_in_the_environment_names_the_variable(monkeypatch, value):
    from api.settings import GatewaySettings

    monkeypatch.setenv("FLM_MAX_BODY_BYTES", value)
    with pytest.raises(FLMConfigError, match=f"FLM_MAX_BODY_BYTES: '{value}' is not a whole number >= 1024"):
        GatewaySettings()
    monkeypatch.setenv("FLM_MAX_BODY_BYTES", "4096")
    assert GatewaySettings().max_body_bytes == 4096
