"""`python -m api.deploy up SPEC.json` / `python -m api.deploy down NAME`: the Ray Jobs that create and delete a
deployment through the service/ Python API (`service.app.deploy` / `undeploy`).

Running these inside short Ray Jobs keeps the gateway a plain HTTP client of Ray (no driver connection, no torch
in its process), and the Serve application outlives the job (Serve's controller is detached). The pipeline's
deploy step calls `deploy_checkpoint` from inside its own job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from service.spec import DeploymentRequest


def _connect() -> None:
    """Join the job's cluster ($RAY_ADDRESS, set by Ray for a job's driver), its workers' output kept out of the
    job's log."""
    import ray

    from flm.connect import connect

    connect(ray, log_to_driver=False)


def deploy_checkpoint(request: DeploymentRequest | dict, serve_url: str) -> str:
    """Deploy `request` (a `service.spec.DeploymentRequest` or its JSON) on the connected cluster; Serve's HTTP
    proxy on serve_url's host and port if it is not running."""
    from service.app import deploy

    _connect()
    where = urlparse(serve_url)
    return deploy(request, host=where.hostname or "127.0.0.1", port=where.port or 8000)


def run(op: str, target: str) -> None:
    """up: deploy the spec.json `target` and write the URL to its result file; down: delete deployment `target`."""
    if op == "up":
        spec = json.loads(Path(target).read_text())
        url = deploy_checkpoint(spec["request"], spec["serve_url"])
        tmp = Path(spec["result"]).with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url}))
        tmp.replace(spec["result"])
        print(f"deployed {spec['request']['name']} at {url}")
    else:
        from service.app import undeploy

        _connect()
        undeploy(target)
        print(f"deleted {target}")


def main(argv: list[str] | None = None) -> int:
    """Exit 2 for a bad request, 1 for anything else, the error in $FLM_ERROR_FILE either way (flm/error_file.py)."""
    from flm.error_file import exit_code_of

    p = argparse.ArgumentParser(prog="python -m api.deploy")
    p.add_argument("op", choices=("up", "down"))
    p.add_argument("target", help="up: the spec.json the gateway wrote; down: the deployment name")
    args = p.parse_args(argv)
    return exit_code_of(lambda: run(args.op, args.target))


if __name__ == "__main__":
    sys.exit(main())
