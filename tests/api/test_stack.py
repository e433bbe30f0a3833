"""api/stack.py: `flm up`'s stack has Ray's token auth on. A real Ray head and gateway (start_stack, as `flm up`
starts them): the dashboard's job API refuses a request without the token or with a wrong one, a Ray job submitted
with it runs a driver that connects to the cluster, and the gateway (which holds the token) gets a training job
running on Ray and cancels it, and deploys a checkpoint on Serve (a Ray job of its own) that answers a completion
through the gateway."""

import json
import shlex
import stat
import sys
import time

import httpx
import pytest

from api.settings import GatewaySettings
from api.stack import STACK_FILE, TOKEN_FILE, free_port, start_stack, stop_processes
from api.store import create_key, open_store

pytestmark = pytest.mark.timeout(600)


def wait(get, until, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = get()
        if until(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"not there after {timeout_s} s: {value}")


def checkpoint(path, tokenizer_dir) -> None:
    """A random 2-layer model of 32 tokens of context with the micro dataset's tokenizer."""
    import torch

    from flm.checkpoint import save_checkpoint
    from flm.config import ModelConfig
    from flm.model import GPT

    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=32, base_width=32, init_std=0.1)
    save_checkpoint(path, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                    tokenizer_dir=tokenizer_dir)


def test_flm_up_turns_ray_token_auth_on(tmp_path, monkeypatch, micro_data):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # what a user's shell has: no choice made
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    home = tmp_path / "home"
    stack = start_stack(home, free_port(), free_port(), free_port(), free_port(), num_cpus=2)
    try:
        token_file = home / "stack" / TOKEN_FILE
        token = token_file.read_text()
        assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        recorded = (home / STACK_FILE).read_text()
        assert token not in recorded and json.loads(recorded)["processes"]["ray"]["auth_token_path"] == str(token_file)

        dashboard = stack["processes"]["ray"]["dashboard"]
        assert httpx.get(f"{dashboard}/api/jobs/").status_code == 401
        assert httpx.get(f"{dashboard}/api/jobs/", headers={"Authorization": "Bearer " + "0" * 64}).status_code == 403
        ray_api = httpx.Client(base_url=dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        driver = "import ray; ray.init(address='auto'); print('cpus', int(ray.cluster_resources()['CPU']))"
        r = ray_api.post("/api/jobs/", json={"entrypoint": shlex.join([sys.executable, "-c", driver])})
        assert r.status_code == 200, r.text
        sid = r.json()["submission_id"]
        info = wait(lambda: ray_api.get(f"/api/jobs/{sid}").json(),
                    lambda j: j["status"] in ("SUCCEEDED", "FAILED", "STOPPED"), 120)
        logs = ray_api.get(f"/api/jobs/{sid}/logs").json()["logs"]
        assert info["status"] == "SUCCEEDED" and "cpus 2" in logs, (info, logs)

        key, _ = create_key(open_store(GatewaySettings(home=home).db_url), "me")
        gateway = httpx.Client(base_url=stack["processes"]["gateway"]["url"], timeout=30,
                               headers={"Authorization": f"Bearer {key}"})
        job = gateway.post("/v1/jobs", json={"kind": "train", "plan": "tiny"}).json()
        job = wait(lambda: gateway.get(f"/v1/jobs/{job['id']}").json(),
                   lambda j: j["state"] not in ("QUEUED", "PENDING"), 120)
        assert job["state"] == "RUNNING" and job["ray_submission_id"], job  # submitted with the token
        assert ray_api.get(f"/api/jobs/{job['ray_submission_id']}").json()["status"] == "RUNNING"
        assert gateway.delete(f"/v1/jobs/{job['id']}").status_code == 202
        wait(lambda: gateway.get(f"/v1/jobs/{job['id']}").json()["state"], lambda s: s == "STOPPED", 120)
        assert gateway.get("/health").json()["ray"] == "ok"

        checkpoint(home / "owners" / "me" / "ck", micro_data / "tokenizer")
        r = gateway.post("/v1/deployments", json={"checkpoint": "owners/me/ck", "name": "auth-check"})
        assert r.status_code == 201, r.text
        dep = wait(lambda: gateway.get("/v1/deployments/auth-check").json(), lambda d: d["state"] != "DEPLOYING", 300)
        assert dep["state"] == "RUNNING", dep  # Serve started and deployed under token auth
        r = gateway.post("/v1/completions", json={"model": "auth-check", "prompt": "To be", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        assert gateway.delete("/v1/deployments/auth-check").status_code == 202
        wait(lambda: gateway.get("/v1/deployments/auth-check").status_code, lambda c: c == 404, 120)
    finally:
        stop_processes(stack["processes"])
