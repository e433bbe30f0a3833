"""The FastAPI gateway: jobs, deployments and model routes behind API keys, and the web console.

`create_app` puts the pieces together: the `Gateway` service (api/gateway.py) built at startup with its reconciler
thread, the routes (api/routes.py), the error bodies every route answers with (api/errors.py: `ErrorResponse`, or
OpenAI's on the model routes; every route documents its errors, so `/openapi.json` is complete), the request body
limit, and the console's static pages (api/console/). `python -m api.server` runs it under uvicorn.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.console import mount_console
from api.errors import BodyLimit, add_error_handlers
from api.gateway import Gateway
from api.routes import router
from api.settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None, reconcile: bool = True) -> FastAPI:
    """The gateway app. `reconcile=False` leaves jobs QUEUED (no Ray): in-process tests of the HTTP surface."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = Gateway(settings)
        app.state.gateway = gw
        if reconcile:
            gw.runner.start()
        yield
        gw.runner.shutdown()
        if gw.http is not None:
            await gw.http.aclose()

    app = FastAPI(title="FLM gateway", version="0.1.0", lifespan=lifespan,
                  description="Submit, watch and cancel growth-training jobs (Ray Jobs), deploy checkpoints (Ray "
                              "Serve) and query them. Every route but /health needs `Authorization: Bearer KEY`.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    add_error_handlers(app)
    app.include_router(router)
    mount_console(app)
    return app
