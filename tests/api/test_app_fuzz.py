"""api/app.py under generated requests: schemathesis draws requests for every route of `/openapi.json`, valid ones
(positive: bodies and parameters the schema allows) and invalid ones (negative: wrong types, missing fields, out of
range), half of the bodies with one string swapped for one a file system or database chokes on (a NUL byte, `~user`,
a 5,000-character path, ...), and the path parameters either generated or the ids of jobs and deployments that
exist (the key's own and another owner's). Every answer must be below 500, each 4xx a JSON error body. The gateway
is the real app on a temporary SQLite store, without Ray (jobs stay HELD, QUEUED or STOPPED). On the gateway before
this test it found the NUL byte in a checkpoint path and an `offset` past SQLite's 64-bit integers (both 500s)."""

import json
import logging

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.app import create_app
from api.errors import MODEL_ROUTES
from api.settings import GatewaySettings, Limits
from api.store import create_key

EXAMPLES = 20  # per route and generation mode: 680 requests in all, about 25 s on one core


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """The gateway with jobs and deployments of `alice` (the fuzzing key) and of `bob`, to reach the item routes;
    yields (client, alice's key, {path parameter: ids that exist})."""
    root = tmp_path_factory.mktemp("root")
    # no request rates: 680 requests from one key would be mostly 429s (the caps on what it holds stay on)
    app = create_app(GatewaySettings(home=root, ray_address="http://127.0.0.1:9", limits=Limits(
        requests_per_minute=None, model_requests_per_minute=None)), reconcile=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        sessions = app.state.gateway.sessions
        keys = {who: create_key(sessions, who)[0] for who in ("alice", "bob")}
        ids: dict[str, list[str]] = {"job_id": [], "name": []}
        for who, key in keys.items():
            ckpt = f"owners/{who}/ckpt"
            (root / ckpt / "tokenizer").mkdir(parents=True)
            (root / ckpt / "config.json").write_text("{}")
            headers = {"Authorization": f"Bearer {key}"}
            for body in ({"kind": "train", "plan": "tiny", "hold": True},
                         {"kind": "pipeline", "plan": "tiny", "tune": "search", "hold": True},
                         {"kind": "eval", "checkpoint": ckpt, "hold": True},
                         {"kind": "tune", "search": "search", "hold": True}):
                r = client.post("/v1/jobs", json=body, headers=headers)
                assert r.status_code == 201, r.text
                ids["job_id"].append(r.json()["id"])
            client.delete(f"/v1/jobs/{ids['job_id'][-1]}", headers=headers)  # one STOPPED job each
            r = client.post("/v1/deployments", json={"checkpoint": ckpt, "name": f"{who}-model"},
                            headers=headers)
            assert r.status_code == 201, r.text
            ids["name"].append(f"{who}-model")
        yield client, keys["alice"], ids


# what a generated string rarely is and a file system or a database chokes on
HOSTILE = ["a\x00b", "~nosuchuser/x", "~/x", "../x", "/etc", "/", ".", "x/" + "a" * 300, "a" * 5000, "runs",
           "owners/bob/ckpt", "owners/alice/ckpt", "bob-model", "alice-model", "job-0123456789",
           "\u202e\ufeff\U0001f600", " ", "%00", "\\x00"]


def string_leaves(value, path=()):
    """The paths of the strings inside a JSON value."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from string_leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from string_leaves(v, (*path, i))


def with_hostile_string(body, data):
    """`body` with one of its strings (drawn) replaced by a hostile one (drawn), or unchanged (drawn)."""
    leaves = list(string_leaves(body))
    if not leaves or not data.draw(st.booleans(), "hostile"):
        return body
    *parents, last = data.draw(st.sampled_from(leaves), "where")
    target = body
    for key in parents:
        target = target[key]
    target[last] = data.draw(st.sampled_from(HOSTILE), "what")
    return body


def requests_for(op, mode: GenerationMode, ids: dict[str, list[str]]):
    """Cases for one operation; one with a path parameter is given an existing id half of the time."""
    generated = op.as_strategy(generation_mode=mode)
    existing = [op.as_strategy(generation_mode=mode, path_parameters={param: v})
                for param, values in ids.items() if f"{{{param}}}" in op.path for v in values]
    return st.one_of(generated, st.one_of(existing)) if existing else generated


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_gets_a_5xx(fuzzed, mode, caplog):
    client, key, ids = fuzzed
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    seen: dict[tuple[str, str, int], int] = {}

    def send(case, data) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        if "json" in kwargs:
            kwargs["json"] = with_hostile_string(kwargs["json"], data)
        kwargs["headers"]["Authorization"] = f"Bearer {key}"  # 401s are test_app.py's; here, reach the routes
        if case.path == "/v1/jobs/{job_id}/metrics":  # a QUEUED job's event stream lasts until the job ends
            kwargs["params"] = {**kwargs.get("params", {}), "stream": "false"}
            kwargs["headers"]["Accept"] = "application/json"
        if isinstance(kwargs.get("data"), str | bytes):  # a raw body (httpx: content=)
            kwargs["content"] = kwargs.pop("data")
        request = {k: v for k, v in kwargs.items() if v and k in ("method", "url", "headers", "params", "json",
                                                                   "data", "content", "files")}
        r = client.request(**request)
        seen[case.method, case.path, r.status_code] = seen.get((case.method, case.path, r.status_code), 0) + 1
        assert r.status_code < 500, f"{case.method} {case.formatted_path} {request}: {r.status_code} {r.text}"
        if r.status_code >= 400:
            body = r.json()
            if case.path in MODEL_ROUTES:  # OpenAI's error body
                assert set(body) == {"error"} and body["error"]["message"], (request, body)
            else:
                assert set(body) == {"error", "field"} and body["error"], (request, body)

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 17
    no_invalid_request, failures = set(), {}
    with caplog.at_level(logging.ERROR, "flm.gateway"):
        for op in operations:
            run = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))(given(requests_for(op, mode, ids), st.data())(send))
            try:
                run()
            except Unsatisfiable:  # negative: a route without parameters or body (GET /health) has no invalid form
                assert mode == GenerationMode.NEGATIVE, op.label
                no_invalid_request.add((op.method.upper(), op.path))
            except AssertionError as e:  # the next routes are fuzzed all the same: one report of everything found
                failures[op.label] = str(e)
    print(json.dumps({f"{m} {p} {c}": n for (m, p, c), n in sorted(seen.items())}, indent=1))
    assert not failures, "\n\n".join(f"{label}: {e}" for label, e in failures.items())
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert {(m, p) for m, p, _ in seen} | no_invalid_request == {(op.method.upper(), op.path) for op in operations}
