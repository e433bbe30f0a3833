"""service/app.py (the Serve application) with service/routes.py (the OpenAI routes) and service/spec.py. In-process
(tp = 1, no Ray) for the response formats and every bad input; through Ray Serve (tp = 2 replica on the local
cluster, real HTTP) with the official `openai` client; a killed shard actor gets its replica replaced and later
requests succeed."""

import json
import socket
import time

import httpx
import openai
import pytest
import ray
import torch
from fastapi.testclient import TestClient
from ray import serve

from flm.checkpoint import load_model
from flm.cli import main
from flm.config import FLMConfigError
from flm.generate import SamplingParams, generate
from service.app import FLMDeployment, deploy, deployment_options, undeploy
from service.protocol import CHAT_STOP, ChatMessage, render_chat
from service.routes import OpenAIServer, build_api
from service.spec import DeploymentRequest
from tests.conftest import uvicorn_server

NAME = "micro"


@pytest.fixture(scope="module")
def reference(grown):
    return load_model(grown["final"])


@pytest.fixture(scope="module")
def client(grown):
    server = OpenAIServer.in_process(DeploymentRequest(checkpoint=str(grown["final"]), name=NAME))
    with TestClient(build_api(server)) as c:
        yield c
    server.engine.close()


def greedy(reference, prompt: str, max_tokens: int, stop=()) -> str:
    model, tok = reference
    return generate(model, tok, [prompt], SamplingParams(max_tokens=max_tokens, stop=list(stop)))[0]


def sse(lines) -> list:
    """The JSON events of a server-sent event stream, and "[DONE]"."""
    events = [line.removeprefix("data: ") for line in lines if line]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# --- in-process ----------------------------------------------------------------------------------------------------
def test_completion_is_the_models_greedy_continuation(client, reference):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "To be", "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200
    body, want = r.json(), greedy(reference, "To be", 10)
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["choices"] == [{"index": 0, "text": want.text, "logprobs": None, "finish_reason": want.finish_reason}]
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.tokens),
                             "total_tokens": want.prompt_tokens + len(want.tokens)}


def test_stream_sends_the_same_text_as_events_ending_with_done(client, reference):
    body = {"model": NAME, "prompt": "The king", "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    want = greedy(reference, "The king", 12)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.tokens)


def test_chat_uses_the_documented_template(client, reference):
    messages = [{"role": "system", "content": "Be."}, {"role": "user", "content": "Go."}]  # 30 of 32 tokens
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 2,
                                                   "temperature": 0})
    prompt = render_chat([ChatMessage(**m) for m in messages])
    assert prompt == "System: Be.\n\nUser: Go.\n\nAssistant:"
    want = greedy(reference, prompt, 2, [CHAT_STOP])
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens


def test_n_seeded_choices_are_the_seed_and_the_next_seeds(client):
    def texts(n, seed):
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "Enter", "max_tokens": 8, "n": n,
                                                  "seed": seed, "temperature": 1.0})
        return [c["text"] for c in r.json()["choices"]]

    two = texts(2, 5)
    assert two == texts(1, 5) + texts(1, 6) and two[0] != two[1]


BAD = [  # (body or raw bytes, status, param, code)
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty_prompt"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "empty_prompt"),
    ({"model": NAME, "prompt": "a b " * 40}, 413, "prompt", "context_length_exceeded"),
    ({"model": NAME, "prompt": "To be", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "prompt": "To be", "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "prompt": "To be", "max_tokens": 1000}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "prompt": "To be, or not to be", "max_tokens": 30}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": "gpt-4", "prompt": "To be"}, 404, "model", "model_not_found"),
    (b'{"model": "micro", "prompt": ', 400, None, "invalid_json"),
    ({"model": NAME, "prompt": "To be", "n": 9}, 400, "n", "invalid_value"),
    ({"model": NAME}, 422, "prompt", "invalid_request"),
    ({"model": NAME, "prompt": "To be", "temperature": 9}, 422, "temperature", "invalid_request"),
    ({"model": NAME, "prompt": [[1, 99999]]}, 400, "prompt", "invalid_value"),
    # what we do not do is refused, never ignored: OpenAI's fields we lack, fields OpenAI lacks, odd combinations
    ({"model": NAME, "prompt": "To be", "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "min_p": 0.1}, 400, "min_p", "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "logprobs": 1, "stream": True}, 400, "logprobs", "unsupported_parameter"),
    ({"model": NAME, "prompt": "To be", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),  # 0: echo only
    ({"model": NAME, "prompt": "To be", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"model": NAME, "prompt": "To be", "stop": "x" * 257}, 400, "stop", "invalid_value"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=lambda v: None)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(client, body, status, param, code):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    ok = client.post("/v1/completions", json={"model": NAME, "prompt": "To be", "max_tokens": 2})
    assert ok.status_code == 200


def test_unsupported_chat_fields_are_refused(client):
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Go."}], "max_tokens": 2}
    for field, value in [("response_format", {"type": "json_schema"}), ("tools", [{"type": "function"}]),
                         ("logprobs", True), ("top_logprobs", 2), ("stream_opts", {})]:
        r = client.post("/v1/chat/completions", json={**chat, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
        assert r.json()["error"]["code"] == "unsupported_parameter"
    # the neutral values of OpenAI's fields change nothing and pass
    r = client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}, "tools": None,
                                                  "presence_penalty": 0, "logprobs": False})
    assert r.status_code == 200, r.text


def test_n_limits_the_choices_of_each_prompt_not_prompts_times_n(client, reference):
    prompts = ["To be", "The king", "Enter", "My lord", "First Citizen"]  # 5 prompts > max_n = 4
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompts, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [greedy(reference, p, 4).text for p in prompts]
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompts[:3], "max_tokens": 2, "n": 2,
                                              "temperature": 0})
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [greedy(reference, p, 2).text for p in prompts[:3] for _ in range(2)]


def test_truncate_prompt_tokens_keeps_the_end_of_a_long_prompt(client, reference):
    _, tok = reference
    ids = tok.encode("a b " * 40)
    assert len(ids) > 32  # longer than the context: 413 without truncation (see BAD)
    r = client.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 4, "temperature": 0,
                                              "truncate_prompt_tokens": 20})
    want = client.post("/v1/completions", json={"model": NAME, "prompt": ids[-20:], "max_tokens": 4,
                                                 "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"] == want.json()["choices"]
    assert r.json()["usage"]["prompt_tokens"] == 20


def test_echo_and_logprobs_are_the_models_log_probabilities(client, reference):
    model, tok = reference
    prompt = "To be, or not to be"
    ids = tok.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                              "echo": True, "logprobs": 2})
    (choice,) = r.json()["choices"]
    lp, nxt = choice["logprobs"], int(logp[-1].argmax())
    assert choice["text"] == prompt + tok.decode([nxt])
    assert lp["tokens"] == [tok.decode([t]) for t in ids + [nxt]] and lp["text_offset"][0] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [logp[i, t].item() for i, t in enumerate(ids[1:] + [nxt])]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        best = logp[i].topk(2)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-5)
    # max_tokens 0 with echo: the prompt scored, nothing generated; logprobs alone: the generated tokens only
    r = client.post("/v1/completions", json={"model": NAME, "prompt": [ids, ids[:3]], "max_tokens": 0, "echo": True,
                                              "logprobs": 0})
    a, b = r.json()["choices"]
    assert a["text"] == prompt and a["logprobs"]["token_logprobs"][1:] == pytest.approx(want[:-1], abs=1e-5)
    assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(want[:2], abs=1e-5)
    assert r.json()["usage"]["completion_tokens"] == 0
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                              "logprobs": 0})
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx([want[-1]], abs=1e-5)


def test_tokenizer_routes_as_vllm_has_them(client, reference):
    _, tok = reference
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 32
    r = client.post("/tokenize", json={"prompt": "To be<|endoftext|>or", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("To be") + [tok.eot_id] + tok.encode("or")
    assert client.post("/detokenize", json={"tokens": tok.encode("To be")}).json() == {"prompt": "To be"}


def test_chat_without_content_and_unknown_routes_are_refused(client):
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True
    assert client.get("/v1/models").json()["data"][0]["id"] == NAME


def test_a_bad_deployment_request_is_refused_before_anything_starts(grown, tmp_path):
    with pytest.raises(FLMConfigError, match="--tp: 3"):
        deploy({"checkpoint": str(grown["final"]), "tp": 3})
    with pytest.raises(FLMConfigError, match="not a checkpoint"):
        deploy({"checkpoint": str(tmp_path)})
    with pytest.raises(FLMConfigError, match="max_replicas"):
        deploy({"checkpoint": str(grown["final"]), "autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def test_deployment_options_place_the_shards_and_scale_the_replicas():
    fixed = deployment_options(DeploymentRequest(checkpoint="ck", tp=2, replicas=3, cpus_per_shard=0.4,
                                                 replica_cpus=0.1))
    assert fixed["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.4}]  # the replica sits in the first bundle
    assert fixed["placement_group_strategy"] == "STRICT_PACK" and fixed["num_replicas"] == 3
    auto = deployment_options(DeploymentRequest(checkpoint="ck", tp=4, gpus_per_shard=1, max_batch=8,
                                                autoscaling={"min_replicas": 0, "max_replicas": 5}))
    assert auto["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}] * 4 and "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 5, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0, "target_ongoing_requests": 8}
    assert (fixed["max_queued_requests"], auto["max_queued_requests"]) == (4 * 16 * 3, 4 * 8 * 5)  # never unbounded
    for options in (fixed, auto):  # Serve accepts them
        deployment = FLMDeployment.options(**options)
        assert deployment.max_ongoing_requests == options["max_ongoing_requests"]
        assert deployment.max_queued_requests == options["max_queued_requests"]
        assert deployment.backpressure_config.status_code == 429 and deployment.backpressure_config.retry_after_s == 1


# --- through Ray Serve ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, grown):
    """A tp = 2 replica (2 x 0.4 CPU shards + 0.1 CPU replica: a replacement fits beside it on 2 CPUs)."""
    request = DeploymentRequest(checkpoint=str(grown["final"]), name=NAME, tp=2, cpus_per_shard=0.4,
                                replica_cpus=0.1, health_check_period_s=1, health_check_timeout_s=10)
    url = deploy(request, port=free_port())
    yield url
    undeploy(NAME)
    serve.shutdown()


def test_openai_client_gets_completions_chat_and_a_stream(served, reference):
    api = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == [NAME]
    want = greedy(reference, "To be", 10)
    c = api.completions.create(model=NAME, prompt="To be", max_tokens=10, temperature=0)
    assert c.choices[0].text == want.text and c.usage.completion_tokens == len(want.tokens)
    chat = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak."}], max_tokens=6,
                                       temperature=0)
    want_chat = greedy(reference, "User: Speak.\n\nAssistant:", 6, [CHAT_STOP])
    assert chat.choices[0].message.content == want_chat.text
    stream = api.completions.create(model=NAME, prompt="To be", max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want.text
    chat_stream = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak."}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_stream) == want_chat.text


def test_bad_input_through_serve(served):
    api = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="nope", prompt="To be", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=NAME, prompt="", max_tokens=4)
    assert e.value.body["param"] == "prompt"
    r = httpx.post(served + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert api.completions.create(model=NAME, prompt="To be", max_tokens=3).usage.completion_tokens == 3


def test_overload_is_a_429_with_retry_after_from_serve_and_openais_body_through_the_gateway(served, grown, tmp_path):
    """A deployment that takes one request at a time and queues one more (max_queued_requests): of 8 requests at
    once, Serve answers the extra ones 429 with Retry-After at once (before, its queue had no bound and the engine's
    own 429 never fired); through the gateway the same refusal is OpenAI's body (code rate_limit_exceeded)."""
    from concurrent.futures import ThreadPoolExecutor

    from api.app import create_app
    from api.settings import GatewaySettings
    from api.store import Deployment, create_key, utcnow

    name = "tight"
    url = deploy(DeploymentRequest(checkpoint=str(grown["final"]), name=name, cpus_per_shard=0.3, max_batch=1,
                                   max_ongoing_requests=1, max_queued_requests=1))
    body = {"model": name, "prompt": "To be", "max_tokens": 20, "temperature": 0}

    def at_once(target: str, headers: dict) -> list[httpx.Response]:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.post(target, json=body, headers=headers, timeout=120), range(8)))
        assert sorted({r.status_code for r in answers}) == [200, 429], [r.status_code for r in answers]
        assert next(r for r in answers if r.status_code == 200).json()["usage"]["completion_tokens"] == 20
        return [r for r in answers if r.status_code == 429]

    app = create_app(GatewaySettings(home=tmp_path, ray_address="http://127.0.0.1:9"), reconcile=False)
    try:
        refused = at_once(f"{url}/v1/completions", {})[0]
        assert refused.headers["retry-after"] == "1" and "backpressure" in refused.text
        with uvicorn_server(app) as gateway:
            sessions = app.state.gateway.sessions
            key, _ = create_key(sessions, "team")
            with sessions.begin() as s:
                s.add(Deployment(id=name, owner="team", checkpoint="owners/team/ck", spec={}, state="RUNNING",
                                 url=url, attempt=0, created_at=utcnow(), updated_at=utcnow()))
            refused = at_once(f"{gateway}/v1/completions", {"Authorization": f"Bearer {key}"})[0]
        error = refused.json()["error"]
        assert (error["code"], error["param"], refused.headers["retry-after"]) == ("rate_limit_exceeded", "model", "1")
        assert "tight is overloaded" in error["message"]
    finally:
        undeploy(name)


def test_flm_eval_against_the_deployment_cuts_long_prompts_as_the_local_backend(served, grown, tmp_path, capsys):
    """The IQ prompts (58 tokens) are longer than the context (32): cut to the same last 16 tokens as locally (before,
    the endpoint answered 413). A model with varied answers: tests/api/test_cli.py, through the gateway."""
    from flm.iq.backends import FLMBackend
    from flm.iq.suite import run_suite

    assert main(["eval", served + "/v1", "--model-name", NAME, "--subtasks", "counting", "--n-items", "5",
                 "--out", str(tmp_path)]) == 0
    assert "cut from the left to their last N tokens: counting 16" in capsys.readouterr().out
    (remote,) = json.loads((tmp_path / "iq.json").read_text())["subtasks"]
    (local,) = run_suite(FLMBackend(grown["final"]), ["counting"], n_items=5, progress=False).subtasks
    assert remote["prompt_tokens_kept"] == local.prompt_tokens_kept == 16
    assert remote["predictions"] == local.predictions  # this model answers a newline first: cut to ""


def test_lm_eval_local_completions_gets_the_numbers_of_flm_lm_eval(served, grown, tmp_path, monkeypatch):
    """lm-eval's own OpenAI client (`local-completions`, our tokenizer through /tokenize) against the deployment, and
    `flm lm-eval` in process, on the lm-eval test's local tasks (documents that fit lm-eval's API budget of
    max_length - 1 tokens; the in-process model keeps max_length + 1): the same log-likelihoods and generations."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (the eval extra)")
    from tests.flm.test_lm_eval_model import write_tasks

    docs = {"flm_mc": [{"question": q, "choices": c, "answer": a} for q, c, a in [
                ("To be, or not to", ["be", "go home", "sleep"], 0), ("My lord, I", ["will", "cannot tell", "am"], 1),
                ("The king is", ["dead", "in his house", "gone"], 0)]],
            "flm_rolling": [{"text": "A horse!"}, {"text": "My kingdom for a horse, a horse."}],
            "flm_gen": [{"prompt": "Enter the king.", "target": "x"}, {"prompt": "First Citizen:", "target": "y"}]}
    write_tasks(tmp_path, docs, monkeypatch)

    def samples(model: str, args: str, *extra: str) -> dict:
        out = tmp_path / model
        assert main(["lm-eval", "--model", model, "--model_args", args, "--tasks", ",".join(docs), "--include_path",
                     str(tmp_path), "--batch_size", "8", "--output_path", str(out), "--log_samples", *extra]) == 0
        return {name: [s["resps"] for s in sorted((json.loads(line) for f in out.rglob(f"samples_{name}_*.jsonl")
                                                   for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])]
                for name in docs}

    ours = samples("flm", f"checkpoint={grown['final']}", "--device", "cpu")
    theirs = samples("local-completions", f"base_url={served}/v1/completions,model={NAME},max_length=32,"
                                          f"tokenizer_backend=remote,tokenized_requests=True")
    assert theirs["flm_gen"] == ours["flm_gen"]
    for ours_doc, theirs_doc in zip(ours["flm_mc"], theirs["flm_mc"], strict=True):
        for ((lp, greedy_),), ((their_lp, their_greedy),) in zip(ours_doc, theirs_doc, strict=True):
            assert float(their_lp) == pytest.approx(float(lp), abs=1e-4) and their_greedy == greedy_
    for ((lp,),), ((their_lp,),) in zip(ours["flm_rolling"], theirs["flm_rolling"], strict=True):
        assert float(their_lp) == pytest.approx(float(lp), abs=1e-4)


def shard_actors() -> list[tuple[str, str]]:
    """(name, namespace) of the replicas' shard actors, `flm-<app>-<replica>-shard<rank>`."""
    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"flm-{NAME}-") and "-shard" in a["name"])


def test_a_killed_shard_actor_gets_its_replica_replaced(served, reference):
    before = shard_actors()
    assert len(before) == 2
    ray.kill(ray.get_actor(*before[1]))
    deadline, after = time.monotonic() + 150, before
    while time.monotonic() < deadline:  # Serve's health check fails, the replica and its shards are replaced
        after = shard_actors()
        if len(after) == 2 and not set(after) & set(before) and serve.status().applications[NAME].status == "RUNNING":
            break
        time.sleep(1)
    assert len(after) == 2 and not set(after) & set(before)
    api = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=3)
    c = api.completions.create(model=NAME, prompt="To be", max_tokens=10, temperature=0)
    assert c.choices[0].text == greedy(reference, "To be", 10).text
