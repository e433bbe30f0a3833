"""The deployment templates (Dockerfile, docker-compose.yml, cluster/deploy/): they parse, agree with each other and
with the code: image names, ports, entrypoints that the `flm` command accepts, GPU capacity for the paper's plan; and
they are safe by default: Ray's token auth on in every one (and in `flm up`), the dashboards and Serve reachable only
on localhost or a private network with the gateway the one public door, no secret written in any of them (each its
own reference), a non-root user in the image."""

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from api.settings import DEFAULT_PORT, GatewaySettings
from flm.cli import build_parser
from flm.config import load_plan

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"
IMAGE = "flm/flm"


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def launchers() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def kuberay() -> dict[str, dict]:
    docs = [d for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in load_all(p)]
    return {d["kind"]: d for d in docs}


def ray_cluster_specs() -> list[dict]:
    k = kuberay()
    return [k["RayCluster"]["spec"], k["RayJob"]["spec"]["rayClusterSpec"], k["RayService"]["spec"]["rayClusterConfig"]]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def flm_accepts(command: str) -> None:
    """The `flm ...` command line parses with the real CLI parser (argparse exits 2 on anything unknown)."""
    argv = shlex.split(command)
    assert argv[0] == "flm", command
    build_parser().parse_args(argv[1:])


def max_stage_gpus() -> int:
    plan = load_plan(ROOT / "configs" / "flm-101b.yaml")
    return max(s.layout.gpus for s in plan.stages)


def test_every_template_parses():
    assert len(launchers()) >= 2
    assert set(kuberay()) >= {"RayCluster", "RayJob", "RayService"}
    assert set(compose()["services"]) >= {"ray-head", "worker", "gateway", "postgres"}


@pytest.mark.parametrize("path", launchers(), ids=lambda p: p.name)
def test_launcher_holds_the_papers_plan(path):
    """Each stage of configs/flm-101b.yaml (192 GPUs) fits under the GPU worker type's max_workers."""
    cfg = yaml.safe_load(path.read_text())
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # training and serving never land on the head
    gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and cfg["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types)
    assert capacity >= max_stage_gpus()
    assert cfg["docker"]["image"].split(":")[0] == IMAGE
    assert cfg["idle_timeout_minutes"] > 0


def test_kuberay_manifests_agree_with_the_code_and_each_other():
    for spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__  # every node must run the Ray the code was tested with
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          .get("nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])
        assert gpus >= max_stage_gpus()
        for c in containers(spec):
            assert c["image"].split(":")[0] == IMAGE
            env = {e["name"]: e for e in c["env"]}
            assert {"mountPath": "/data", "name": "flm-home"} in c["volumeMounts"]
            assert env["FLM_HOME"]["value"] == "/data"
    flm_accepts(kuberay()["RayJob"]["spec"]["entrypoint"])


def test_rayservice_imports_the_serve_application():
    """The RayService's import_path names a real application builder in service/, with arguments it accepts."""
    import importlib
    import typing

    app = kuberay()["RayService"]["spec"]["serveConfigV2"]
    cfg = yaml.safe_load(app) if isinstance(app, str) else app
    final = load_plan(ROOT / "configs" / "flm-101b.yaml").model_configs()[-1]
    for application in cfg["applications"]:
        module, _, attr = application["import_path"].partition(":")
        assert module.startswith("service."), application["import_path"]
        builder = getattr(importlib.import_module(module), attr)
        request_type = typing.get_type_hints(builder)["request"]
        request = request_type.model_validate(application["args"])  # what Serve does with `args`
        assert final.n_head % request.tp == 0  # the paper's 101B shards evenly
        assert request.checkpoint.startswith("/data/")  # on the shared volume


def test_compose_stack():
    """Ray token auth everywhere, only the gateway's port published, health checks, one shared volume."""
    services = compose()["services"]
    flm_services = {n: s for n, s in services.items() if s.get("image", "").startswith(IMAGE)}
    assert set(flm_services) == {"ray-head", "worker", "gateway"}
    for name, s in flm_services.items():
        env = s["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env, name
        assert env["FLM_HOME"] == "/data" and "flm-home:/data" in s["volumes"], name
        # object store credentials pass through from the shell (s3:// runs), never written in the file
        assert all(env[k] is None for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")), name
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert published == {"gateway": [f"{DEFAULT_PORT}:{DEFAULT_PORT}"]}
    gateway = services["gateway"]
    assert f"--port {DEFAULT_PORT}" in gateway["command"] and "api.server" in gateway["command"]
    assert gateway["environment"]["FLM_DATABASE_URL"].startswith("postgresql")
    assert "ray-head:8265" in gateway["environment"]["FLM_RAY_ADDRESS"]
    for name in ("ray-head", "postgres", "gateway"):
        assert services[name]["healthcheck"]["test"], name
    assert "--address=ray-head:6379" in services["worker"]["command"]
    assert "--port=6379" in services["ray-head"]["command"]


def test_dockerfile_ships_every_package_and_port():
    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[(.*)\]', pyproject).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY {pkg} ./{pkg}" in text, pkg
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
    assert {6379, 8265, 8000, DEFAULT_PORT} <= exposed
    assert "torch==2.13.0" in text and "ARG VARIANT=cpu" in text


def test_every_copy_source_is_in_the_build_context():
    """Each COPY source of the Dockerfiles exists in a clean checkout and .dockerignore keeps it in the context (a
    missing docker/wheels/ fails the build at that line)."""
    import fnmatch
    import subprocess

    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    for dockerfile in [ROOT / "Dockerfile", *sorted((ROOT / "docker").glob("*.Dockerfile"))]:
        for src in re.findall(r"^COPY (?:--\S+ )*(\S+(?: \S+)*) \S+$", dockerfile.read_text(), re.M):
            for path in src.split():
                path = path.rstrip("/")
                assert any(t == path or t.startswith(path + "/") for t in tracked), f"{dockerfile.name}: {path}"
                assert not any(fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") for pat in ignored), path


def test_compose_file_reads_in_compose_v1_and_takes_local_images():
    """No top-level `name:` (Debian's docker-compose 1.29 rejects it; `-p` names the project), and the database
    image is a variable (a local stand-in where no registry answers: benchmarks/compose_check.py)."""
    c = compose()
    assert set(c) <= {"services", "volumes", "networks", "secrets", "configs"} | {k for k in c if k.startswith("x-")}
    assert c["services"]["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_CPU=python:3.11-slim" in text and "FROM ${BASE_CPU} AS base-cpu" in text


def test_compose_database_driver_is_in_the_image():
    """The gateway's FLM_DATABASE_URL names a driver that the image's extras install."""
    url = compose()["services"]["gateway"]["environment"]["FLM_DATABASE_URL"]
    driver = url.split("://")[0].split("+")[1]
    extras = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', (ROOT / "Dockerfile").read_text()).group(1)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = " ".join(" ".join(optional[e]) for e in extras.split(","))
    assert driver in installed


# --- safe by default --------------------------------------------------------------------------------------------
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", re.I)
REFERENCE = re.compile(r"^\$\{(\w+)(:[?-][^}]*)?\}$")  # compose: a variable of the shell that runs it


def templates() -> dict[str, str]:
    paths = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", *sorted(DEPLOY.rglob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def items(node, path=()):
    """(path, key, value) of every mapping entry in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from items(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from items(v, (*path, i))


def test_token_auth_is_on_in_every_template_and_in_flm_up(tmp_path):
    for path in launchers():
        cfg = yaml.safe_load(path.read_text())
        assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"], path.name
        assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, path.name  # where Ray looks
    for spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "flm-ray-token"}
        for c in containers(spec):  # the operator sets the mode and the token: nothing hand-set to disagree
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in c["env"]}
    for name, s in compose()["services"].items():
        if s.get("image", "").startswith(IMAGE):
            assert s["environment"]["RAY_AUTH_MODE"] == "token", name
    from api.stack import TOKEN_FILE, ray_auth_env

    env = ray_auth_env(tmp_path, {})  # what `flm up` gives Ray and the gateway (for real: tests/api/test_stack.py)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "stack" / TOKEN_FILE)}


def test_dashboards_and_serve_are_private_and_the_gateway_is_the_one_door():
    for path in launchers():
        cfg = yaml.safe_load(path.read_text())
        heads = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
        assert heads and all("--dashboard-host=127.0.0.1" in c for c in heads), path.name
        assert "0.0.0.0" not in json.dumps(cfg), path.name
    docs = [d for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in load_all(p)]
    for spec in ray_cluster_specs():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not [d for d in docs if d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort")]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}  # every Ray pod
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert peers and all(set(p) <= {"podSelector", "namespaceSelector"} and all(s["matchLabels"] for s in p.values())
                         for p in peers)  # no ipBlock, no empty selector (which would let everything in)
    assert {"matchLabels": {"app.kubernetes.io/name": "flm-gateway"}} in [p.get("podSelector") for p in peers]
    assert kuberay()["RayJob"]["spec"]["submissionMode"] == "HTTPMode"  # no submitter pod to let in
    services = compose()["services"]
    assert all("network_mode" not in s for s in services.values())
    assert {n for n, s in services.items() if s.get("ports")} == {"gateway"}
    # the gateway's defaults (flm up, a gateway on a launcher's head) reach Ray and Serve on localhost
    settings = GatewaySettings()
    assert settings.ray_address.startswith("http://127.0.0.1:") and settings.serve_url.startswith("http://127.0.0.1:")


def test_no_secret_is_written_in_a_template():
    texts = templates()
    for name, text in texts.items():
        assert not re.search(r"\b[0-9a-f]{32,}\b", text), name  # no generated token or password pasted in
        assert not re.search(r"://[^/\s:@]+:(?!\$\{)[^@\s]+@", text), name  # a URL's password only as ${VAR}
    for name, text in texts.items():
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            for _, key, value in items(doc):
                if key == "name" or not isinstance(key, str) or not SECRET_KEY.search(key) or value is None:
                    continue  # None: passed through from the shell
                if isinstance(value, str) and (m := REFERENCE.match(value)):
                    assert m.group(1) == key, (name, key, value)  # each secret its own variable, named for it
                elif key in ("secretName", "secretKeyRef") or key.endswith("_token"):
                    continue  # a Kubernetes Secret's name, a token file's path
                else:
                    raise AssertionError(f"{name}: {key} = {value!r} is written in the template")
            for _, key, value in items(doc):  # Kubernetes env entries: a secret only from a Secret
                if key == "env" and isinstance(value, list):
                    for e in value:
                        if SECRET_KEY.search(e["name"]):
                            assert "secretKeyRef" in e.get("valueFrom", {}), (name, e)
    minio = compose()["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert REFERENCE.match(minio).group(1) == "MINIO_ROOT_PASSWORD"  # not the database's password


def test_the_image_runs_as_a_non_root_user():
    lines = [ln.split() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip()]
    users = [i for i, ln in enumerate(lines) if ln[0] == "USER"]
    assert users and lines[users[-1]][1] not in ("root", "0"), users
    assert not [ln for ln in lines[users[-1]:] if ln[0] == "RUN"]  # nothing after it runs as root
    for name, s in compose()["services"].items():
        assert s.get("user") in (None, "flm"), name
    for spec in ray_cluster_specs():  # and the shared volume is writable by it (fsGroup)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            ctx = group["template"]["spec"]["securityContext"]
            assert ctx == {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}
    assert "useradd --create-home --uid 1000" in (ROOT / "Dockerfile").read_text()
