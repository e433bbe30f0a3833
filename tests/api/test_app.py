"""The gateway (api/app.py, routes.py, gateway.py, errors.py) in process (FastAPI's TestClient, a temporary SQLite
store, no Ray: jobs stay QUEUED or HELD): every route refuses bad input with a 4xx whose JSON body names the problem,
never a 500; ownership, pagination, cancel/resume state rules; the OpenAPI schema documents every route and every
error it returns. One test runs the main routes on a real PostgreSQL store (tests/conftest.py's `postgres`)."""

import json
import logging
import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import MODEL_ROUTES
from api.schemas import CONFIGS
from api.settings import GatewaySettings, Limits
from api.store import Job, create_key, revoke_key, set_key_limits, utcnow
from service.spec import DeploymentRequest

UNREACHABLE_RAY = "http://127.0.0.1:9"  # the discard port: nothing answers, so nothing is ever submitted
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    app = create_app(GatewaySettings(home=root, ray_address=UNREACHABLE_RAY, max_body_bytes=LIMIT),
                     reconcile=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app.state.gateway.sessions, root


@pytest.fixture
def gw(app_client, request):
    """The client of one gateway shared by the module, with this test's own owners (alice, bob, and a revoked key
    of alice's), `base`: alice's own directory (relative to the storage root `root`), and `uid` for names."""
    client, sessions, root = app_client
    uid = f"t{abs(hash(request.node.nodeid)) % 10**8}"
    alice, _ = create_key(sessions, f"alice-{uid}")
    bob, _ = create_key(sessions, f"bob-{uid}")
    old, _ = create_key(sessions, f"old-{uid}", owner=f"alice-{uid}")
    revoke_key(sessions, f"old-{uid}")
    client.root, client.base, client.uid = root, f"owners/alice-{uid}", uid
    (root / client.base).mkdir(parents=True)
    client.keys = {"alice": alice, "bob": bob, "revoked": old}
    client.app_client = app_client
    return client


def auth(gw, who="alice") -> dict:
    return {"Authorization": f"Bearer {gw.keys[who]}"}


def tiny_plan() -> dict:
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def checkpoint_dir(gw, name="ckpt", tokenizer=True):
    """A directory that looks like a checkpoint to the gateway's path checks (nothing is loaded in these tests)."""
    path = gw.root / gw.base / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if tokenizer:
        (path / "tokenizer").mkdir()
    return path


def held_job(gw, who="alice", **extra) -> dict:
    r = gw.post("/v1/jobs", json={"kind": "train", "plan": "tiny", "hold": True, **extra}, headers=auth(gw, who))
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r, status: int, *words: str) -> dict:
    """A JSON ErrorResponse with this status whose message contains every word (on the model routes OpenAI's error
    body, returned as an ErrorResponse: message as "error", param as "field")."""
    assert r.status_code == status, r.text
    body = r.json()
    if r.request.url.path in MODEL_ROUTES:
        error = body["error"]
        assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), body
        body = {"error": error["message"], "field": error["param"]}
    assert set(body) == {"error", "field"} and isinstance(body["error"], str)
    for w in words:
        assert w in body["error"], (w, body)
    return body


# --- every route: no key, a revoked key, an unknown key --------------------------------------------------------
ROUTES = [
    ("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/jobs/job-0123456789"),
    ("get", "/v1/jobs/job-0123456789/metrics"), ("get", "/v1/jobs/job-0123456789/logs"),
    ("delete", "/v1/jobs/job-0123456789"), ("post", "/v1/jobs/job-0123456789/resume"),
    ("post", "/v1/deployments"), ("get", "/v1/deployments"), ("get", "/v1/deployments/m"),
    ("delete", "/v1/deployments/m"), ("get", "/v1/models"), ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"), ("post", "/v1/plan"), ("get", "/v1/presets"),
]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("key,why", [(None, "missing"), ("revoked", "revoked"), ("flm_not-a-key", "not a key")])
def test_every_route_needs_a_valid_key(gw, method, path, key, why):
    headers = {} if key is None else {"Authorization": f"Bearer {gw.keys.get(key, key)}"}
    r = gw.request(method, path, headers=headers, json={} if method == "post" else None)
    body = assert_error(r, 401, "Authorization", why)
    assert body["field"] == "Authorization" and r.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_key(gw):
    r = gw.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# --- unknown ids, another owner's ids ------------------------------------------------------------------------------
ID_ROUTES = [("get", "/v1/jobs/{}"), ("get", "/v1/jobs/{}/metrics"), ("get", "/v1/jobs/{}/logs"),
             ("delete", "/v1/jobs/{}"), ("post", "/v1/jobs/{}/resume")]


@pytest.mark.parametrize("method,path", ID_ROUTES)
def test_unknown_job_id_is_404(gw, method, path):
    body = assert_error(gw.request(method, path.format("job-0000000000"), headers=auth(gw)), 404, "job-0000000000",
                        "no such job")
    assert body["field"] == "job_id"


@pytest.mark.parametrize("method,path", ID_ROUTES)
def test_another_owners_job_is_403(gw, method, path):
    job = held_job(gw, "bob")
    assert_error(gw.request(method, path.format(job["id"]), headers=auth(gw)), 403, "another owner")


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_deployment_is_404(gw, method):
    assert_error(gw.request(method, "/v1/deployments/nothing", headers=auth(gw)), 404, "nothing",
                 "no such deployment")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(gw, path):
    r = gw.post(path, json={"model": "nothing", "prompt": "x"}, headers=auth(gw))
    body = assert_error(r, 404, "nothing")
    assert body["field"] == "model" and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", MODEL_ROUTES)
def test_model_routes_answer_in_openais_error_shape(gw, path):
    post = path != "/v1/models"
    r = gw.request("post" if post else "get", path, json={"model": "m"} if post else None)
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": "Authorization", "code": "invalid_api_key"}}
    if post:
        assert r.status_code == 401 and gw.post(path, json={}, headers=auth(gw)).json()["error"]["code"] == \
            "invalid_request"
        big = gw.post(path, json={"model": "m", "prompt": "x" * LIMIT}, headers=auth(gw)).json()["error"]
        assert big["code"] == "request_too_large"


def test_unknown_route_is_a_json_404(gw):
    assert_error(gw.get("/v1/nothing", headers=auth(gw)), 404, "no route GET /v1/nothing")


# --- POST /v1/jobs: missing fields, wrong types, bad plans, paths, sizes -------------------------------------------
BAD_JOBS = {
    "no kind": ({"plan": "tiny"}, "kind", "required"),
    "unknown kind": ({"kind": "bake"}, "kind", "'bake' is not one of"),
    "train without plan": ({"kind": "train"}, "plan", "required"),
    "eval without checkpoint": ({"kind": "eval"}, "checkpoint", "required"),
    "tune without search": ({"kind": "tune"}, "search", "required"),
    "pipeline without plan": ({"kind": "pipeline"}, "plan", "required"),
    "plan of wrong type": ({"kind": "train", "plan": 3}, "plan", "plan"),
    "n_items of wrong type": ({"kind": "eval", "checkpoint": "x", "n_items": "many"}, "n_items", "integer"),
    "hold of wrong type": ({"kind": "train", "plan": "tiny", "hold": "later"}, "hold", "boolean"),
    "max_failures below -1": ({"kind": "train", "plan": "tiny", "max_failures": -2}, "max_failures", "-1"),
    "unknown backend": ({"kind": "train", "plan": "tiny", "backend": "mpi"}, "backend", "ddp"),
    "unknown field": ({"kind": "train", "plan": "tiny", "epochs": 3}, "epochs", "not permitted"),
    "unknown preset": ({"kind": "train", "plan": "huge"}, "plan", "unknown preset 'huge'"),
    "tp of wrong type in a pipeline": ({"kind": "pipeline", "plan": "tiny", "deploy": {"tp": "two"}},
                                       "deploy.tp", "integer"),
}


@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_job_request_is_422_naming_the_field(gw, case):
    body, field, words = BAD_JOBS[case]
    err = assert_error(gw.post("/v1/jobs", json=body, headers=auth(gw)), 422, field, words)
    assert err["field"] == field


def shrinking(plan: dict) -> dict:
    plan["stages"][2]["grow"]["n_head"] = 1
    plan["stages"][2]["grow"]["d_model"] = 64
    return plan


BAD_PLANS = {
    "shrinking stage": (shrinking, "stages.2.d_model: cannot shrink 128 -> 64"),
    "shrinking depth": (lambda p: p["stages"][1]["grow"].update(n_layer=1) or p,
                        "stages.1.n_layer: cannot shrink 2 -> 1"),
    "negative lr": (lambda p: p["stages"][0].update(lr=-1) or p, "stages.0.lr"),
    "ramp longer than the stage": (lambda p: p["stages"][1].update(ramp_steps=10_000) or p,
                                   "stages.1.ramp_steps"),
}


@pytest.mark.parametrize("kind", ["train", "pipeline"])
@pytest.mark.parametrize("case", BAD_PLANS)
def test_bad_plan_is_422_naming_the_stage(gw, kind, case):
    mutate, words = BAD_PLANS[case]
    r = gw.post("/v1/jobs", json={"kind": kind, "plan": mutate(tiny_plan())}, headers=auth(gw))
    assert assert_error(r, 422, words)["field"].startswith("plan")


def test_pipeline_with_tune_may_leave_hparams_to_the_search(gw):
    plan = tiny_plan()
    for stage in plan["stages"]:
        stage.pop("lr")
    assert_error(gw.post("/v1/jobs", json={"kind": "pipeline", "plan": plan}, headers=auth(gw)), 422,
                 "stages.0.lr", "required")
    r = gw.post("/v1/jobs", json={"kind": "pipeline", "plan": plan, "tune": "search", "hold": True},
                headers=auth(gw))
    assert r.status_code == 201, r.text
    job = r.json()
    assert "lr" not in job["spec"]["plan"]["stages"][0]  # kept for the search to fill in
    assert job["progress"]["total_steps"] == 256 and job["stages"] == 3
    # but a shrinking stage is still caught
    assert_error(gw.post("/v1/jobs", json={"kind": "pipeline", "plan": shrinking(plan), "tune": "search"},
                         headers=auth(gw)), 422, "stages.2.d_model: cannot shrink")


def search(**changes) -> dict:
    data = yaml.safe_load((CONFIGS / "search.yaml").read_text())
    return {**data, **changes}


BAD_SEARCHES = {
    "empty grid": (search(grid={"lr": [], "init_std": [0.02], "output_mult": [1.0]}), "search",
                   "grid.lr: empty"),
    "negative lr": (search(grid={"lr": [-1.0], "init_std": [0.02], "output_mult": [1.0]}), "search",
                    "grid.lr: -1.0 is not a positive number"),
    "width not a multiple of head_dim": (search(width=50), "search", "width: 50 is not a multiple"),
    "unknown search kind": (search(search="bayes"), "search", "'bayes' is not a search kind"),
    "unknown proxy preset": (search(proxy="nothing"), "search", "unknown preset 'nothing'"),
    "unknown preset": ("nothing", "search", "unknown preset 'nothing'"),
}


@pytest.mark.parametrize("kind", ["tune", "pipeline"])
@pytest.mark.parametrize("case", BAD_SEARCHES)
def test_bad_search_is_422_naming_the_field(gw, kind, case):
    value, field, words = BAD_SEARCHES[case]
    body = {"kind": "tune", "search": value} if kind == "tune" else {"kind": "pipeline", "plan": "tiny",
                                                                      "tune": value}
    err = assert_error(gw.post("/v1/jobs", json=body, headers=auth(gw)), 422, words)
    assert err["field"] == (field if kind == "tune" else "tune")


def test_tune_job_writes_its_search_with_the_proxy_inline(gw):
    r = gw.post("/v1/jobs", json={"kind": "tune", "search": search(proxy="proxy"), "hold": True}, headers=auth(gw))
    assert r.status_code == 201, r.text
    written = yaml.safe_load((gw.root / "jobs" / r.json()["id"] / "search.yaml").read_text())
    assert written["proxy"]["widths"] == yaml.safe_load((CONFIGS / "proxy.yaml").read_text())["widths"]
    assert_error(gw.post("/v1/jobs", json={"kind": "tune", "search": search(out="/tmp/x")}, headers=auth(gw)), 422,
                 "search.out", "leave it empty")
    assert_error(gw.post("/v1/jobs", json={"kind": "tune", "search": search(data="/etc")}, headers=auth(gw)), 403,
                 "search.data", "outside the storage root")


def test_plan_out_is_the_gateways(gw):
    plan = tiny_plan()
    plan["train"] = {"out": "/tmp/elsewhere"}
    body = assert_error(gw.post("/v1/jobs", json={"kind": "train", "plan": plan}, headers=auth(gw)), 422,
                        "plan.train.out", "leave it empty")
    assert "/tmp/elsewhere" not in body["error"]
    assert body["field"] == "plan.train.out"


@pytest.mark.parametrize("data,status,words", [
    ("/etc", 403, "outside the storage root"),
    ("../data", 400, "contains '..'"),
    ("{base}/missing", 400, "does not exist"),
])
def test_dataset_path_must_be_inside_the_root(gw, data, status, words):
    plan = tiny_plan()
    plan["train"] = {"data": data.format(base=gw.base)}
    body = assert_error(gw.post("/v1/jobs", json={"kind": "train", "plan": plan}, headers=auth(gw)), status, words)
    assert body["field"] == "plan.train.data"


def test_dataset_inside_the_root_is_made_absolute(gw):
    (gw.root / gw.base / "corpus").mkdir(parents=True)
    plan = tiny_plan()
    plan["train"] = {"data": f"{gw.base}/corpus"}
    job = gw.post("/v1/jobs", json={"kind": "train", "plan": plan, "hold": True}, headers=auth(gw)).json()
    assert job["spec"]["plan"]["train"]["data"] == str((gw.root / gw.base / "corpus").resolve())
    written = yaml.safe_load((gw.root / "jobs" / job["id"] / "plan.yaml").read_text())
    assert written == job["spec"]["plan"]


@pytest.mark.parametrize("checkpoint,status,words", [
    ("/etc", 403, "outside the storage root"),
    ("/", 403, "outside the storage root"),
    ("{base}/../../x", 400, "contains '..'"),
    ("{base}/escape", 403, "outside the storage root"),  # a symlink out of the root
    ("{base}/nothing", 400, "not a checkpoint directory"),
    ("job-0000000000", 404, "no such job"),
])
def test_eval_checkpoint_must_be_inside_the_root(gw, checkpoint, status, words):
    (gw.root / gw.base / "escape").symlink_to("/tmp")
    checkpoint = checkpoint.format(base=gw.base)
    body = assert_error(gw.post("/v1/jobs", json={"kind": "eval", "checkpoint": checkpoint}, headers=auth(gw)),
                        status, words)
    assert body["field"] == ("job_id" if status == 404 else "checkpoint")


def test_eval_of_a_checkpoint_inside_the_root(gw):
    path = checkpoint_dir(gw)
    for given in (f"{gw.base}/ckpt", str(path)):
        job = gw.post("/v1/jobs", json={"kind": "eval", "checkpoint": given, "hold": True}, headers=auth(gw)).json()
        assert job["state"] == "HELD" and job["spec"]["checkpoint_path"] == str(path.resolve())


UNUSABLE_PATHS = {  # what the file system cannot take, or the gateway must not expand: a 400, never a 500
    "NUL byte": ("{base}/a\x00b", "NUL byte"),
    "~user": ("~nosuchuser/x", "'~'"),
    "~": ("~/x", "'~'"),
    "too long": ("{base}/" + "a" * 1100, "longer than 1024"),
    "a part too long": ("{base}/" + "a" * 256 + "/b", "255 bytes"),
}
PATH_FIELDS = {  # a request naming a path, and the field that names it
    "deployment checkpoint": ("/v1/deployments", lambda p: {"checkpoint": p}, "checkpoint"),
    "eval checkpoint": ("/v1/jobs", lambda p: {"kind": "eval", "checkpoint": p}, "checkpoint"),
    "plan data": ("/v1/jobs", lambda p: {"kind": "train", "plan": {**tiny_plan(), "train": {"data": p}}},
                  "plan.train.data"),
    "pipeline data": ("/v1/jobs", lambda p: {"kind": "pipeline", "plan": {**tiny_plan(), "train": {"data": p}}},
                      "plan.train.data"),
    "search data": ("/v1/jobs", lambda p: {"kind": "tune", "search": search(data=p)}, "search.data"),
}


@pytest.mark.parametrize("where", PATH_FIELDS)
@pytest.mark.parametrize("case", UNUSABLE_PATHS)
def test_unusable_path_is_400_naming_the_field(gw, where, case):
    route, body, field = PATH_FIELDS[where]
    path, words = UNUSABLE_PATHS[case]
    err = assert_error(gw.post(route, json=body(path.format(base=gw.base)), headers=auth(gw)), 400, field, words)
    assert err["field"] == field


# --- tenant isolation: paths among the caller's own files, deployment names ----------------------------------
def with_hparams_from(path: str) -> dict:
    return {"kind": "train", "plan": {**tiny_plan(), "hparams_from": path}}


PATH_FIELDS_ALL = {**PATH_FIELDS, "hparams_from": ("/v1/jobs", with_hparams_from, "plan.hparams_from")}
OTHERS_PATHS = {  # relative to the root; {bob}: bob's directory, {job}: a job of bob's, {uid}: this test's
    "bob's own directory": "{bob}/ckpt",
    "bob's directory, missing file": "{bob}/nothing",
    "bob's job's run directory": "runs/{job}",
    "bob's job's files": "jobs/{job}",
    "every run": "runs",
    "every owner": "owners",
    "the root": ".",
    "a run of no job": "runs/tiny",
    "the store": "gateway.db",
    "a symlink from alice's directory into bob's": "owners/alice-{uid}/link",
}


@pytest.mark.parametrize("where", PATH_FIELDS_ALL)
@pytest.mark.parametrize("case", OTHERS_PATHS)
def test_a_path_among_another_owners_files_is_403(gw, where, case):
    bobs = f"owners/bob-{gw.uid}"
    (gw.root / bobs / "ckpt").mkdir(parents=True)
    (gw.root / bobs / "ckpt" / "config.json").write_text("{}")
    (gw.root / gw.base / "link").symlink_to(gw.root / bobs / "ckpt")
    job = held_job(gw, "bob")["id"]
    (gw.root / "runs" / job).mkdir(parents=True, exist_ok=True)
    route, body, field = PATH_FIELDS_ALL[where]
    path = OTHERS_PATHS[case].format(bob=bobs, job=job, uid=gw.uid)
    for given in (path, str(gw.root / path)):
        err = assert_error(gw.post(route, json=body(given), headers=auth(gw)), 403, field, "not among your files",
                           f"owners/alice-{gw.uid}/")
        assert err["field"] == field


def test_paths_among_the_callers_own_files_are_accepted(gw):
    """The caller's own directory, and the run and job directories of the caller's own jobs."""
    job = held_job(gw)["id"]
    best = gw.root / "jobs" / job / "tune" / "best.yaml"
    best.parent.mkdir(parents=True)
    best.write_text("lr: 0.001\ninit_std: 0.02\noutput_mult: 1.0\nbase_width: 64\n")
    own_ckpt, run_ckpt = checkpoint_dir(gw), gw.root / "runs" / job / "exported"
    run_ckpt.mkdir(parents=True)
    (run_ckpt / "config.json").write_text("{}")
    for given in (f"{gw.base}/ckpt", str(own_ckpt), f"runs/{job}/exported"):
        r = gw.post("/v1/jobs", json={"kind": "eval", "checkpoint": given, "hold": True}, headers=auth(gw))
        assert r.status_code == 201, r.text
    r = gw.post("/v1/jobs", json={**with_hparams_from(f"jobs/{job}/tune/best.yaml"), "hold": True}, headers=auth(gw))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["plan"]["hparams_from"] == str(best.resolve())
    written = yaml.safe_load((gw.root / "jobs" / r.json()["id"] / "plan.yaml").read_text())
    assert written["hparams_from"] == str(best.resolve())  # absolute: not resolved against the plan's directory
    assert_error(gw.post("/v1/jobs", json=with_hparams_from(f"jobs/{job}/tune"), headers=auth(gw)), 400,
                 "plan.hparams_from", "not a file")


def test_a_deployment_name_of_another_owner_is_409(gw):
    checkpoint_dir(gw)
    bobs = f"owners/bob-{gw.uid}/ckpt"
    (gw.root / bobs).mkdir(parents=True)
    (gw.root / bobs / "config.json").write_text("{}")
    (gw.root / bobs / "tokenizer").mkdir()
    taken, pending = f"{gw.uid}-taken", f"{gw.uid}-pending"
    assert gw.post("/v1/deployments", json={"checkpoint": bobs, "name": taken}, headers=auth(gw, "bob")).status_code \
        == 201
    pipeline = gw.post("/v1/jobs", json={"kind": "pipeline", "plan": "tiny", "deploy": {"name": pending},
                                         "hold": True}, headers=auth(gw, "bob")).json()
    unnamed = gw.post("/v1/jobs", json={"kind": "pipeline", "plan": "tiny", "deploy": {}, "hold": True},
                      headers=auth(gw, "bob")).json()  # will deploy as its job id
    for name in (taken, pending, unnamed["id"]):
        assert_error(gw.post("/v1/deployments", json={"checkpoint": f"{gw.base}/ckpt", "name": name},
                             headers=auth(gw)), 409, "another owner's deployment name")
        err = assert_error(gw.post("/v1/jobs", json={"kind": "pipeline", "plan": "tiny", "deploy": {"name": name}},
                                   headers=auth(gw)), 409, "another owner's deployment name")
        assert err["field"] == "deploy.name"
    # once bob's pipeline has ended, its name is free again; resuming it then checks the name anew
    gw.delete(f"/v1/jobs/{pipeline['id']}", headers=auth(gw, "bob"))
    r = gw.post("/v1/deployments", json={"checkpoint": f"{gw.base}/ckpt", "name": pending}, headers=auth(gw))
    assert r.status_code == 201, r.text
    assert_error(gw.post(f"/v1/jobs/{pipeline['id']}/resume", headers=auth(gw, "bob")), 409,
                 "another owner's deployment name")


def one_stage_plan(tokens: int) -> dict:
    plan = tiny_plan()
    plan["stages"] = plan["stages"][:1]
    plan["stages"][0].update(tokens=tokens, ramp_steps=0)
    return plan


@pytest.mark.parametrize("kind", ["train", "pipeline", "pipeline with tune"])
def test_zero_step_stage_is_422_naming_the_stage(gw, kind):
    plan = tiny_plan()
    plan["stages"][1].update(tokens=100, ramp_steps=0)  # batch 16 x seq_len 128 = 2048 tokens a step
    body = {"kind": kind.split()[0], "plan": plan, **({"tune": "search"} if "tune" in kind else {})}
    err = assert_error(gw.post("/v1/jobs", json=body, headers=auth(gw)), 422, "stages.1.tokens", "100 tokens",
                       "no optimizer step", "at least 2048")
    assert err["field"] == "plan"
    one_step = gw.post("/v1/jobs", json={"kind": "train", "plan": one_stage_plan(2048), "hold": True},
                       headers=auth(gw))
    assert one_step.status_code == 201 and one_step.json()["progress"]["total_steps"] == 1


def test_a_job_whose_view_cannot_be_computed_does_not_break_the_list(gw, caplog):
    """Jobs stored by an older gateway: a zero-step plan (its progress divided by zero) and a plan that no longer
    validates. Both are listed, the second with an error saying why it has no progress; the others are unaffected."""
    _, sessions, _ = gw.app_client
    good = held_job(gw)
    zero, broken = "job-00000000b0", "job-00000000b1"
    with sessions.begin() as s:
        for job_id, plan in ((zero, one_stage_plan(1)), (broken, {"stages": "not a list"})):
            s.add(Job(id=job_id, owner=good["owner"], kind="train", spec={"kind": "train", "plan": plan},
                      state="FAILED", attempt=1, error="it failed", created_at=utcnow(), updated_at=utcnow()))
    with caplog.at_level(logging.ERROR, "flm.gateway"):
        r = gw.get("/v1/jobs", params={"limit": 200}, headers=auth(gw))
    assert r.status_code == 200, r.text
    jobs = {j["id"]: j for j in r.json()["jobs"]}
    assert jobs[good["id"]]["error"] is None and jobs[good["id"]]["progress"]["total_steps"] == 256
    assert jobs[zero]["progress"] == {"step": 0, "total_steps": 0, "tokens": 0, "total_tokens": 0, "percent": None}
    assert jobs[zero]["error"] == "it failed"
    error = jobs[broken]["error"]
    assert error.startswith("it failed; ") and "cannot compute this job's progress" in error and broken in error
    assert "not a list" not in error  # the stored spec is the log's to quote, not the error's
    for job_id in (zero, broken):
        assert gw.get(f"/v1/jobs/{job_id}", headers=auth(gw)).json() == jobs[job_id]
    assert any(broken in rec.getMessage() for rec in caplog.records)


def test_an_unexpected_error_is_a_500_with_a_request_id_and_no_exception_text(tmp_path, caplog):
    app = create_app(GatewaySettings(home=tmp_path, ray_address=UNREACHABLE_RAY), reconcile=False)

    @app.get("/v1/broken")
    async def broken():
        raise RuntimeError("the contents of /etc/shadow")

    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR, "flm.gateway"):
        r = client.get("/v1/broken")
    body = assert_error(r, 500, "internal error", "request id")
    request_id = r.headers["x-request-id"]
    assert request_id in body["error"] and "shadow" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and "the contents of /etc/shadow" in str(logged[0].exc_info[1])


def test_eval_of_a_job_without_checkpoints_is_409(gw):
    job = held_job(gw)
    assert_error(gw.post("/v1/jobs", json={"kind": "eval", "checkpoint": job["id"]}, headers=auth(gw)), 409,
                 "no checkpoint yet")


def test_oversized_body_is_413(gw):
    plan = tiny_plan()
    plan["name"] = "x" * (LIMIT + 1)
    assert_error(gw.post("/v1/jobs", json={"kind": "train", "plan": plan}, headers=auth(gw)), 413, "over the limit",
                 str(LIMIT))


def test_oversized_chunked_body_is_413(gw):
    def chunks():
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024

    r = gw.post("/v1/jobs", content=chunks(), headers={**auth(gw), "Content-Type": "application/json"})
    assert_error(r, 413, "over the limit")


def test_malformed_json_is_422(gw):
    r = gw.post("/v1/jobs", content=b'{"kind": "train",', headers={**auth(gw), "Content-Type": "application/json"})
    assert_error(r, 422, "not valid JSON")


# --- listing, state rules ---------------------------------------------------------------------------------------
def test_jobs_are_listed_newest_first_paginated_and_filtered(gw):
    ids = [held_job(gw)["id"] for _ in range(5)]
    held_job(gw, "bob")
    page = gw.get("/v1/jobs", params={"limit": 2, "offset": 1}, headers=auth(gw)).json()
    assert page["total"] == 5 and [j["id"] for j in page["jobs"]] == ids[::-1][1:3]
    gw.delete(f"/v1/jobs/{ids[0]}", headers=auth(gw))
    stopped = gw.get("/v1/jobs", params={"state": "STOPPED"}, headers=auth(gw)).json()
    assert [j["id"] for j in stopped["jobs"]] == [ids[0]]


@pytest.mark.parametrize("params,field", [({"limit": 0}, "limit"), ({"limit": "all"}, "limit"),
                                          ({"offset": -1}, "offset"), ({"offset": 2**63}, "offset"),
                                          ({"state": "DONE"}, "state"), ({"kind": "bake"}, "kind"),
                                          ({"kind": "train\x00"}, "kind")])
def test_bad_list_query_is_422(gw, params, field):
    assert assert_error(gw.get("/v1/jobs", params=params, headers=auth(gw)), 422, field)["field"] == field


@pytest.mark.parametrize("params", [{"after": -1}, {"after": "x"}, {"stream": "maybe"}])
def test_bad_metrics_query_is_422(gw, params):
    job = held_job(gw)
    assert_error(gw.get(f"/v1/jobs/{job['id']}/metrics", params=params, headers=auth(gw)), 422)


def test_bad_logs_query_is_422(gw):
    job = held_job(gw)
    assert_error(gw.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 0}, headers=auth(gw)), 422, "tail")


def test_held_job_view(gw):
    job = held_job(gw)
    assert job["state"] == "HELD" and job["attempt"] == 0 and job["ray_submission_id"] is None
    assert job["progress"] == {"step": 0, "total_steps": 256, "tokens": 0, "total_tokens": 524288, "percent": 0.0}
    assert job["stages"] == 3 and job["run_dir"] == f"runs/{job['id']}" and job["checkpoints"] == []
    assert gw.get(f"/v1/jobs/{job['id']}", headers=auth(gw)).json() == job
    assert gw.get(f"/v1/jobs/{job['id']}/logs", headers=auth(gw)).json()["logs"] == ""


def test_cancel_and_resume_follow_the_state_rules(gw):
    job = held_job(gw)
    url = f"/v1/jobs/{job['id']}"
    assert gw.post(f"{url}/resume", headers=auth(gw)).json()["state"] == "QUEUED"
    assert_error(gw.post(f"{url}/resume", headers=auth(gw)), 409, "QUEUED", "only HELD, STOPPED or FAILED")
    r = gw.delete(url, headers=auth(gw))
    assert r.status_code == 202 and r.json()["state"] == "STOPPED"
    assert_error(gw.delete(url, headers=auth(gw)), 409, "already STOPPED")
    assert gw.post(f"{url}/resume", headers=auth(gw)).json()["state"] == "QUEUED"


def test_metrics_stream_of_a_finished_job_ends_at_once(gw):
    job = held_job(gw)
    gw.delete(f"/v1/jobs/{job['id']}", headers=auth(gw))
    r = gw.get(f"/v1/jobs/{job['id']}/metrics", params={"stream": True}, headers=auth(gw))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in r.text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: state", "event: end"]
    assert json.loads(events[1][1].removeprefix("data: ")) == {"state": "STOPPED", "error": None}


def test_the_gateway_on_postgresql(postgres, tmp_path):
    """Keys, jobs (a refused one, held ones, pages, filters, cancel, resume), quotas (the gateway's and a key's
    own, stored as JSON) and deployments through the routes, on a PostgreSQL store: every answer as on SQLite,
    and what PostgreSQL refuses and SQLite takes (a NUL byte in a filter) a 422 before it reaches the database."""
    app = create_app(GatewaySettings(home=tmp_path, ray_address=UNREACHABLE_RAY, database_url=postgres(),
                                     limits=Limits(max_running_jobs=1)), reconcile=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        sessions = app.state.gateway.sessions
        key, _ = create_key(sessions, "alice")
        h = {"Authorization": f"Bearer {key}"}
        assert_error(client.post("/v1/jobs", json={"kind": "train", "plan": shrinking(tiny_plan())}, headers=h),
                     422, "stages.2.d_model: cannot shrink")
        held = [client.post("/v1/jobs", json={"kind": "train", "plan": "tiny", "hold": True}, headers=h).json()
                for _ in range(3)]
        assert [j["state"] for j in held] == ["HELD"] * 3
        page = client.get("/v1/jobs", params={"limit": 2, "offset": 1}, headers=h).json()
        assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == [j["id"] for j in held][::-1][1:3]
        assert client.get("/v1/jobs", params={"offset": 10**9}, headers=h).json()["jobs"] == []
        assert client.get("/v1/jobs", params={"kind": "eval"}, headers=h).json()["total"] == 0
        assert_error(client.get("/v1/jobs", params={"kind": "train\x00"}, headers=h), 422, "kind")
        assert client.get(f"/v1/jobs/{held[0]['id']}", headers=h).json() == held[0]
        # the gateway's cap of one running job, then the key's own of two
        assert client.post(f"/v1/jobs/{held[0]['id']}/resume", headers=h).json()["state"] == "QUEUED"
        assert_error(client.post(f"/v1/jobs/{held[1]['id']}/resume", headers=h), 429, "max_running_jobs")
        set_key_limits(sessions, "alice", {"max_running_jobs": 2})
        assert client.post(f"/v1/jobs/{held[1]['id']}/resume", headers=h).json()["state"] == "QUEUED"
        assert_error(client.post("/v1/jobs", json={"kind": "train", "plan": "tiny"}, headers=h), 429,
                     "max_running_jobs: alice has 2 jobs queued or running, the cap is 2")
        assert client.delete(f"/v1/jobs/{held[0]['id']}", headers=h).json()["state"] == "STOPPED"
        assert_error(client.delete(f"/v1/jobs/{held[0]['id']}", headers=h), 409, "already STOPPED")
        stopped = client.get("/v1/jobs", params={"state": "STOPPED"}, headers=h).json()["jobs"]
        assert [j["id"] for j in stopped] == [held[0]["id"]]
        # a deployment: created, listed, not yet a model
        (tmp_path / "owners/alice/ckpt/tokenizer").mkdir(parents=True)
        (tmp_path / "owners/alice/ckpt/config.json").write_text("{}")
        r = client.post("/v1/deployments", json={"checkpoint": "owners/alice/ckpt", "name": "m", "replicas": 2},
                        headers=h)
        assert r.status_code == 201, r.text
        assert [d["spec"]["replicas"] for d in client.get("/v1/deployments", headers=h).json()["deployments"]] == [2]
        assert client.get("/v1/models", headers=h).json()["data"] == []
        revoke_key(sessions, "alice")
        assert_error(client.get("/v1/jobs", headers=h), 401, "revoked")


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_two_gateways_on_one_store_share_the_caps(db, request, tmp_path, monkeypatch):
    """Two gateway processes on one store (two apps here: each its own engine and thread lock) taking one owner's
    submissions at once: the cap of running jobs holds across them (api.store.owner_lock), where each counted
    below it and added. The count is made slow (0.3 s), so that without the lock both would always pass it."""
    import api.gateway

    def slow_count(*args, **kwargs):
        check_running_jobs(*args, **kwargs)
        time.sleep(0.3)

    check_running_jobs = api.gateway.check_running_jobs
    monkeypatch.setattr(api.gateway, "check_running_jobs", slow_count)
    url = f"sqlite:///{tmp_path / 'gateway.db'}" if db == "sqlite" else request.getfixturevalue("postgres")()
    settings = GatewaySettings(home=tmp_path, ray_address=UNREACHABLE_RAY, database_url=url,
                               limits=Limits(max_running_jobs=1))
    apps = [create_app(settings, reconcile=False) for _ in range(2)]
    with TestClient(apps[0], raise_server_exceptions=False) as a, \
            TestClient(apps[1], raise_server_exceptions=False) as b:
        key, _ = create_key(apps[0].state.gateway.sessions, "alice")
        barrier, codes = threading.Barrier(2), []

        def submit(client):
            barrier.wait()
            r = client.post("/v1/jobs", json={"kind": "train", "plan": "tiny"},
                            headers={"Authorization": f"Bearer {key}"})
            codes.append(r.status_code)

        threads = [threading.Thread(target=submit, args=(client,)) for client in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(codes) == [201, 429]


# --- deployments and models ---------------------------------------------------------------------------------
BAD_DEPLOYMENTS = {
    "no source": ({"tp": 2}, None, "exactly one of checkpoint or job_id"),
    "two sources": ({"checkpoint": "runs/ckpt", "job_id": "job-0123456789"}, None, "exactly one"),
    "tp of wrong type": ({"checkpoint": "runs/ckpt", "tp": "two"}, "tp", "integer"),
    "tp zero": ({"checkpoint": "runs/ckpt", "tp": 0}, "tp", "greater than or equal to 1"),
    "bad name": ({"checkpoint": "runs/ckpt", "name": "Not A Name"}, "name", "pattern"),
    "autoscaling inverted": ({"checkpoint": "runs/ckpt", "autoscaling": {"min_replicas": 3, "max_replicas": 1}},
                             "autoscaling", "min_replicas 3 is above max_replicas 1"),
    "unknown field": ({"checkpoint": "runs/ckpt", "gpus": 8}, "gpus", "not permitted"),
}


@pytest.mark.parametrize("case", BAD_DEPLOYMENTS)
def test_bad_deployment_request_is_422(gw, case):
    body, field, words = BAD_DEPLOYMENTS[case]
    err = assert_error(gw.post("/v1/deployments", json=body, headers=auth(gw)), 422, words)
    assert err["field"] == field


@pytest.mark.parametrize("checkpoint,status,words", [
    ("/etc", 403, "outside the storage root"), ("../x", 400, "contains '..'"),
    ("{base}/nothing", 400, "not a checkpoint"), ("{base}/bare", 400, "no tokenizer/"),
])
def test_deployment_checkpoint_must_be_a_servable_checkpoint_inside_the_root(gw, checkpoint, status, words):
    checkpoint_dir(gw, "bare", tokenizer=False)
    checkpoint = checkpoint.format(base=gw.base)
    body = assert_error(gw.post("/v1/deployments", json={"checkpoint": checkpoint}, headers=auth(gw)), status, words)
    assert body["field"] == "checkpoint"


def test_deployment_of_an_unfinished_or_unknown_job(gw):
    job = held_job(gw)
    assert_error(gw.post("/v1/deployments", json={"job_id": job["id"]}, headers=auth(gw)), 409, "HELD")
    assert_error(gw.post("/v1/deployments", json={"job_id": "job-0000000000"}, headers=auth(gw)), 404)
    bobs = held_job(gw, "bob")
    assert_error(gw.post("/v1/deployments", json={"job_id": bobs["id"]}, headers=auth(gw)), 403)


def test_deployment_lifecycle_without_ray(gw):
    checkpoint_dir(gw)
    ckpt = f"{gw.base}/ckpt"
    r = gw.post("/v1/deployments", json={"checkpoint": ckpt, "name": "tiny", "tp": 2}, headers=auth(gw))
    assert r.status_code == 201, r.text
    dep = r.json()
    assert (dep["id"], dep["state"], dep["checkpoint"], dep["spec"]["tp"]) == ("tiny", "DEPLOYING", ckpt, 2)
    spec = json.loads((gw.root / "deployments" / "tiny" / "spec.json").read_text())
    assert DeploymentRequest.model_validate(spec["request"]) == DeploymentRequest(
        checkpoint=str((gw.root / ckpt).resolve()), name="tiny", tp=2)
    assert_error(gw.post("/v1/deployments", json={"checkpoint": ckpt, "name": "tiny"}, headers=auth(gw)),
                 409, "DEPLOYING")
    assert_error(gw.get("/v1/deployments/tiny", headers=auth(gw, "bob")), 403, "another owner")
    assert [d["id"] for d in gw.get("/v1/deployments", headers=auth(gw)).json()["deployments"]] == ["tiny"]
    assert gw.get("/v1/deployments", headers=auth(gw, "bob")).json()["deployments"] == []
    # not RUNNING yet: listed by neither /v1/models nor reachable through the completion routes
    assert gw.get("/v1/models", headers=auth(gw)).json() == {"object": "list", "data": []}
    assert_error(gw.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=auth(gw)), 409,
                 "DEPLOYING")
    assert_error(gw.post("/v1/completions", json={"model": "tiny"}, headers=auth(gw, "bob")), 403)
    r = gw.delete("/v1/deployments/tiny", headers=auth(gw))
    assert r.status_code == 202 and r.json()["state"] == "DELETING"
    assert_error(gw.delete("/v1/deployments/tiny", headers=auth(gw)), 409, "already DELETING")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body,words", [({"prompt": "x"}, "model: required"), ({"model": 3}, "model"),
                                        ({"model": ""}, "model")])
def test_bad_model_request_is_422(gw, path, body, words):
    assert_error(gw.post(path, json=body, headers=auth(gw)), 422, words)


@pytest.mark.parametrize("path", ["/v1/deployments", "/v1/completions", "/v1/chat/completions"])
def test_oversized_model_and_deployment_bodies_are_413(gw, path):
    assert_error(gw.post(path, json={"model": "m", "prompt": "x" * LIMIT}, headers=auth(gw)), 413)


# --- the plan's cost, the presets, the console's files --------------------------------------------------------------
def test_plan_cost_of_a_preset_its_yaml_and_a_mapping_agree(gw):
    text = (CONFIGS / "flm-101b.yaml").read_text()
    answers = [gw.post("/v1/plan", json={"plan": plan}, headers=auth(gw)) for plan in
               ("flm-101b", text, yaml.safe_load(text))]
    assert [r.status_code for r in answers] == [200] * 3, answers[0].text
    assert answers[0].json() == answers[1].json() == answers[2].json()
    cost = answers[0].json()
    assert cost["name"] == "flm-101b" and [s["name"] for s in cost["stages"]] == ["16B", "51B", "101B"]
    assert 0.5 < cost["time_saving"] < 0.9 and cost["speedup"] > 1  # the paper's plan: growth saves most of the time
    cheaper = gw.post("/v1/plan", json={"plan": "flm-101b", "hardware": {"price_per_gpu_hour": 0.5}},
                      headers=auth(gw)).json()
    assert cheaper["total_dollars"] == pytest.approx(cost["total_dollars"] / 2)


def test_plan_cost_of_a_plan_that_leaves_its_lrs_to_a_search(gw):
    plan = tiny_plan()
    for stage in plan["stages"]:
        stage.pop("lr", None)
    r = gw.post("/v1/plan", json={"plan": plan}, headers=auth(gw))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,field,words", [
    ({"plan": "stages: [1"}, "plan", "not valid YAML at line 1"),
    ({"plan": "no-such-preset"}, "plan", "preset name (flm-101b, tiny)"),
    ({"plan": "name: x\nstages:\n  - tokens: 10\n"}, "plan.stages.0.batch_size", "required"),
    ({"plan": "tiny", "hardware": {"gpu": 8}}, "hardware.gpu", "Extra inputs"),
    ({"plan": "tiny", "hardware": {"mfu": 2}}, "hardware.mfu", "less than or equal to 1"),
    ({"plan": "tiny", "hardware": {"tflops_per_gpu": [100, 200]}}, "hardware", "give 1 or 3 values"),
    ({"plan": "tiny", "hardware": {"peak_tflops": 1e-320, "mfu": 1e-300}}, "hardware", "no finite cost"),
    ({"plan": "flm-101b", "hardware": {"price_per_gpu_hour": 1e308}}, "hardware", "no finite cost"),
    ({}, "plan", "required"),
])
def test_bad_plan_cost_request_is_422_naming_the_field(gw, body, field, words):
    assert assert_error(gw.post("/v1/plan", json=body, headers=auth(gw)), 422, words)["field"] == field


def test_presets_are_the_growth_plans_of_configs(gw):
    r = gw.get("/v1/presets", headers=auth(gw))
    assert r.status_code == 200
    plans = {p["name"]: p["text"] for p in r.json()["plans"]}
    assert plans == {name: (CONFIGS / f"{name}.yaml").read_text() for name in ("flm-101b", "tiny")}


def test_console_files_need_no_key_and_forbid_foreign_scripts(gw):
    r = gw.get("/console/")
    assert r.status_code == 200 and '<script type="module" src="app.js">' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    for name, kind in (("app.js", "javascript"), ("console.css", "text/css")):
        r = gw.get(f"/console/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert r.headers["x-content-type-options"] == "nosniff"
    assert gw.get("/console", follow_redirects=False).headers["location"].endswith("/console/")
    assert gw.get("/", follow_redirects=False).headers["location"] == "/console/"
    assert gw.get("/console/../app.py").status_code == 404  # nothing outside the console's static directory


# --- the schema -------------------------------------------------------------------------------------------------
EXPECTED_ERRORS = {  # what the tests above get from each route (and 401 from all but /health)
    ("post", "/v1/jobs"): {400, 403, 404, 409, 413, 422, 429},  # 429: tests/api/test_quotas.py
    ("get", "/v1/jobs"): {422},
    ("get", "/v1/jobs/{job_id}"): {403, 404},
    ("get", "/v1/jobs/{job_id}/metrics"): {403, 404, 422, 429},
    ("get", "/v1/jobs/{job_id}/logs"): {403, 404, 422, 503},
    ("delete", "/v1/jobs/{job_id}"): {403, 404, 409, 429, 503},
    ("post", "/v1/jobs/{job_id}/resume"): {403, 404, 409, 429},
    ("post", "/v1/deployments"): {400, 403, 404, 409, 413, 422, 429},
    ("get", "/v1/deployments"): set(),
    ("get", "/v1/deployments/{name}"): {403, 404},
    ("delete", "/v1/deployments/{name}"): {403, 404, 409, 429},
    ("get", "/v1/models"): set(),
    ("post", "/v1/completions"): {403, 404, 409, 413, 422, 429, 503},
    ("post", "/v1/chat/completions"): {403, 404, 409, 413, 422, 429, 503},
    ("post", "/v1/plan"): {413, 422},
    ("get", "/v1/presets"): set(),
}


def test_openapi_documents_every_route_and_error(gw):
    schema = gw.get("/openapi.json").json()
    routes = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert routes == set(EXPECTED_ERRORS) | {("get", "/health")}
    assert {(m.lower(), p) for m, p in ROUTES} | {(m, p.format("{job_id}")) for m, p in ID_ROUTES} <= \
        {(m, p.replace("{name}", "m").replace("{job_id}", "job-0123456789")) for m, p in routes} | \
        {(m, p) for m, p in routes}
    for (method, path), codes in EXPECTED_ERRORS.items():
        op = schema["paths"][path][method]
        documented = {int(c) for c in op["responses"] if int(c) >= 400}
        assert documented >= codes | {401}, (method, path, documented)
        shape = "OpenAIErrorResponse" if path in MODEL_ROUTES else "ErrorResponse"
        for code in documented:
            ref = op["responses"][str(code)]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{shape}", (method, path, code)
        assert op.get("security") == [{"HTTPBearer": []}], (method, path)
    job_body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(job_body["discriminator"]["mapping"]) == {"train", "tune", "eval", "pipeline"}
    assert "HTTPValidationError" not in json.dumps(schema)
