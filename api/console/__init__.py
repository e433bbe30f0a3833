"""The web console: static pages (HTML, CSS and ES modules in `static/`, no build step) that the gateway serves
at /console, in its own process.

Loading the pages needs no key: they hold no data. The page asks for an API key once, keeps it in the tab's
sessionStorage and sends it in the `Authorization` header of every call to the REST routes (the same routes as
`flm` and the `openai` client; never in a URL). The metric stream and streamed completions are read with
`fetch`, because `EventSource` cannot send a header. A strict Content-Security-Policy allows only the console's
own scripts and calls to this origin, so nothing injected into a job's error text or a log can run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) so a new gateway's console is picked up at once
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_console(app: FastAPI) -> None:
    """/console/ serves static/index.html and its files; / redirects there. Neither is in /openapi.json."""
    app.mount("/console", ConsoleFiles(directory=STATIC, html=True), name="console")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/")
