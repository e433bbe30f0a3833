"""A real OpenAI-compatible completions server (http.server on a free port) for the endpoint backend's tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@pytest.fixture()
def completions_server():
    """`start(answers, suffix="", api_key=None) -> base URL`: POST {url}/completions answers every prompt with
    `answers[prompt] + suffix`; with `api_key`, a request without that bearer token gets HTTP 401."""
    servers = []

    def start(answers: dict[str, str], suffix: str = "", api_key: str | None = None) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                authorized = api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}"
                if self.path != "/v1/completions" or not authorized:
                    self.send_error(404 if authorized else 401)
                    return
                choices = [{"index": i, "text": answers[p] + suffix} for i, p in enumerate(body["prompt"])]
                data = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
