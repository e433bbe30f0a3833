"""`python -m api.server`: the gateway under uvicorn (what `flm up` starts in the background)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from api.app import create_app
from api.settings import DEFAULT_PORT, GatewaySettings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m api.server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--ray-address", help="the Ray dashboard URL (default $FLM_RAY_ADDRESS or :8265)")
    p.add_argument("--serve-url", help="Ray Serve's HTTP ingress (default $FLM_SERVE_URL or :8000)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in dict(ray_address=args.ray_address, serve_url=args.serve_url).items() if v}
    app = create_app(GatewaySettings(**overrides))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
