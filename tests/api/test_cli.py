"""api/cli.py: the `flm` client commands against a real uvicorn gateway (no Ray: jobs are held), `flm keys`, and
bad input: exit code 2 with one line."""

import json

import httpx
import openai
import pytest
import yaml

from api.app import create_app
from api.cli import load_request
from api.schemas import CONFIGS
from api.settings import GatewaySettings
from api.stack import free_port
from api.store import Deployment, open_store, utcnow
from flm.cli import main
from tests.conftest import uvicorn_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A gateway under uvicorn in a thread, its store under a temporary FLM_HOME."""
    home = tmp_path_factory.mktemp("home")
    app = create_app(GatewaySettings(home=home, ray_address="http://127.0.0.1:9"), reconcile=False)
    with uvicorn_server(app) as url:
        yield home, url


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


def test_keys_carry_their_own_limits(env, capsys):
    code, out, _ = run(capsys, "keys", "create", "--name", "capped", "--max-running-jobs", "3", "--max-streams",
                       "unlimited")
    assert code == 0 and "limits: max_running_jobs=3, max_streams=unlimited" in out
    code, out, _ = run(capsys, "keys", "limits", "capped", "--max-running-jobs", "default", "--max-replicas", "2")
    assert code == 0 and "limits: max_streams=unlimited, max_replicas=2" in out
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and "max_replicas=2" in out
    code, _, err = run(capsys, "keys", "limits", "capped", "--max-replicas", "-1")
    assert code == 2 and "--max-replicas: Input should be greater than or equal to 0" in err
    code, _, err = run(capsys, "keys", "limits", "capped", "--max-replicas", "many")
    assert code == 2 and "'many': give a whole number, 'unlimited' or 'default'" in err
    code, _, err = run(capsys, "keys", "limits", "capped")
    assert code == 2 and "give at least one of --max-running-jobs" in err


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
    with pytest.raises(SystemExit) as stopped:  # the job's server-sent events, read to their `end`
        main(["logs", job_id, "-f"])
    assert stopped.value.code == 1 and f"{job_id}: STOPPED" in capsys.readouterr().out
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


def test_up_says_where_the_jobs_curves_are(tmp_path):
    """`flm up`'s lines for a started stack (the dict api.stack.start_stack returns) name TensorBoard's logdir: the
    directory the gateway's jobs write their runs to."""
    from api.cli import stack_lines

    stack = {"home": str(tmp_path), "serve_url": "http://127.0.0.1:8000", "logs": str(tmp_path / "stack"),
             "processes": {"gateway": {"url": "http://127.0.0.1:8080"},
                           "ray": {"address": "127.0.0.1:6379", "dashboard": "http://127.0.0.1:8265"}}}
    lines = stack_lines(stack)
    logdir = GatewaySettings(home=tmp_path).run_dir("job-1").parent
    assert f"curves   tensorboard --logdir {logdir}  (a job's run writes <job id>/tensorboard)" in lines
    assert lines[-1] == "export FLM_URL=http://127.0.0.1:8080  # and FLM_API_KEY from `flm keys create`"


@pytest.fixture
def deployed(server, env, micro_data):
    """A RUNNING deployment of the key's owner: a random checkpoint of 32 tokens of context among the owner's files,
    served by the real OpenAI routes (service/routes.py, in process, tp = 1) under uvicorn: no Ray."""
    import torch

    from flm.checkpoint import save_checkpoint
    from flm.config import ModelConfig
    from flm.model import GPT
    from service.routes import OpenAIServer, build_api
    from service.spec import DeploymentRequest

    home, _ = server
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=32, base_width=32, output_mult=8.0,
                      init_std=0.1)  # peaked predictions: answers of varied text, rarely a newline
    ck = home / "owners" / "cli" / "ck"
    save_checkpoint(ck, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                    tokenizer_dir=micro_data / "tokenizer")
    model = OpenAIServer.in_process(DeploymentRequest(checkpoint=str(ck), name="served-ck"))
    with uvicorn_server(build_api(model)) as url:
        sessions = open_store(GatewaySettings(home=home).db_url)
        with sessions.begin() as s:
            s.merge(Deployment(id="served-ck", owner="cli", checkpoint="owners/cli/ck", spec={}, state="RUNNING",
                               url=url, attempt=0, created_at=utcnow(), updated_at=utcnow()))
        yield ck
    model.engine.close()


def test_flm_eval_through_the_gateway_cuts_long_prompts_as_the_local_backend(server, env, deployed, tmp_path,
                                                                             capsys):
    """`flm eval GATEWAY/v1` with $FLM_API_KEY: the gateway reports the model's context (max_model_len), the 58-token
    IQ prompts are cut to their last 16 tokens as the local backend cuts them (the answer gets the 16 tokens the
    context leaves: a prefix of the local answer), and the report says so."""
    from flm.iq.backends import FLMBackend
    from flm.iq.suite import run_suite

    _, url = server
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {env}"}).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("served-ck", 32)]
    code, out, err = run(capsys, "eval", f"{url}/v1", "--model-name", "served-ck", "--subtasks", "counting",
                         "--n-items", "3", "--out", str(tmp_path))
    assert code == 0, err
    assert "cut from the left to their last N tokens: counting 16" in out
    (remote,) = json.loads((tmp_path / "iq.json").read_text())["subtasks"]
    (local,) = run_suite(FLMBackend(deployed), ["counting"], n_items=3, progress=False).subtasks
    assert remote["prompt_tokens_kept"] == local.prompt_tokens_kept == 16
    assert all(theirs.startswith(ours) for ours, theirs in zip(remote["predictions"], local.predictions, strict=True))
    assert any(remote["predictions"])


def test_model_route_errors_have_openais_shape_through_the_gateway(server, env, deployed):
    """The gateway's own refusals and the deployment's, as the official client reads them."""
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=env, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:  # the deployment's: a field it does not support
        client.completions.create(model="served-ck", prompt="To be", max_tokens=2,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert (e.value.body["param"], e.value.body["code"]) == ("response_format", "unsupported_parameter")
    with pytest.raises(openai.NotFoundError) as e:  # the gateway's: no such model
        client.completions.create(model="nothing", prompt="To be", max_tokens=2)
    assert (e.value.body["param"], e.value.body["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{url}/v1", api_key="flm_wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key" and "not a key" in e.value.body["message"]
