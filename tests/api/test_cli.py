"""api/cli.py: the `flm` client commands against a real uvicorn gateway (no Ray: jobs are held), `flm keys`, and
bad input: exit code 2 with one line."""

import threading
import time

import pytest
import uvicorn
import yaml

from api.app import create_app
from api.cli import load_request
from api.schemas import CONFIGS
from api.settings import GatewaySettings
from api.stack import free_port
from flm.cli import main


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A gateway under uvicorn in a thread, its store under a temporary FLM_HOME."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    app = create_app(GatewaySettings(home=home, ray_address="http://127.0.0.1:9"), reconcile=False)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield home, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def env(server, monkeypatch, capsys):
    home, url = server
    monkeypatch.setenv("FLM_HOME", str(home))
    monkeypatch.setenv("FLM_URL", url)
    assert main(["keys", "create", "--name", "cli", "-q"]) == 0
    key = capsys.readouterr().out.strip()
    monkeypatch.setenv("FLM_API_KEY", key)
    return key


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_keys_create_prints_the_key_once_and_list_hides_it(env, capsys):
    code, out, _ = run(capsys, "keys", "create", "--name", "second", "--owner", "cli")
    key = out.strip().splitlines()[-1]
    assert code == 0 and key.startswith("flm_") and "shown once" in out
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and "second" in out and key not in out and key[:10] in out
    assert run(capsys, "keys", "revoke", key)[0] == 0


def test_submit_jobs_status_cancel_resume(env, capsys, tmp_path):
    request = tmp_path / "job.yaml"
    request.write_text(yaml.safe_dump({"kind": "train", "plan": "tiny"}))
    code, out, _ = run(capsys, "submit", str(request), "--hold")
    assert code == 0 and " train job HELD" in out
    job_id = out.split(":")[0]
    code, out, _ = run(capsys, "jobs", "--state", "HELD")
    assert code == 0 and job_id in out
    code, out, _ = run(capsys, "status", job_id)
    assert code == 0 and "0/256" in out and "0/524,288 tokens (0.0%)" in out
    assert run(capsys, "cancel", job_id)[1].strip() == f"{job_id}: STOPPED"
    assert "QUEUED" in run(capsys, "resume", job_id)[1]


def test_a_bare_plan_file_is_a_train_job(tmp_path):
    assert load_request(str(CONFIGS / "tiny.yaml"))["kind"] == "train"


@pytest.mark.parametrize("argv,words", [
    (["status", "job-0000000000"], "404 from GET /v1/jobs/job-0000000000: job 'job-0000000000': no such job"),
    (["submit", "/nonexistent.yaml"], "/nonexistent.yaml: no such file"),
    (["logs", "nothing", "--tail", "3"], "404"),
    (["cancel", "job-0000000000"], "404"),
    (["deploy", "/etc", "--tp", "2"], "403 from POST /v1/deployments: checkpoint: '/etc' is outside the storage root"),
    (["keys", "revoke", "nobody"], "no API key with id, name or value 'nobody'"),
])
def test_bad_input_exits_2_with_one_line(env, capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_bad_plan_submitted_exits_2_naming_the_stage(env, capsys, tmp_path):
    plan = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    plan["stages"][1]["grow"]["n_layer"] = 1
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    code, _, err = run(capsys, "submit", str(tmp_path / "plan.yaml"))
    assert code == 2 and "422 from POST /v1/jobs: plan: stages.1.n_layer: cannot shrink 2 -> 1" in err


def test_without_key_or_gateway(env, capsys, monkeypatch):
    monkeypatch.setenv("FLM_API_KEY", "flm_wrong")
    code, _, err = run(capsys, "jobs")
    assert code == 2 and "401" in err and "not a key of this gateway" in err
    monkeypatch.delenv("FLM_API_KEY")
    code, _, err = run(capsys, "jobs")
    assert code == 2 and "FLM_API_KEY: not set" in err
    monkeypatch.setenv("FLM_API_KEY", env)
    monkeypatch.setenv("FLM_URL", "http://127.0.0.1:9")
    code, _, err = run(capsys, "jobs")
    assert code == 2 and "FLM_URL: nothing answers at http://127.0.0.1:9" in err


def test_up_refuses_a_taken_port(env, capsys, server):
    _, url = server
    taken = int(url.rsplit(":", 1)[1])
    code, _, err = run(capsys, "up", "--port", str(taken))
    assert code == 2 and f"--port: port {taken} is taken" in err
    code, _, err = run(capsys, "up", "--ray-port", "12345", "--port", str(free_port()))
    assert code == 2 and "10002-19999" in err
