"""The gateway's REST client, as `flm submit`, `flm jobs`, ... and `flm demo` use it: `Client` (HTTP against
`FLM_URL` with `FLM_API_KEY`, every non-2xx answer a one-line FLMConfigError) and `follow` (a live progress bar
from a job's server-sent events).

Built on the standard library's http.client, not httpx: importing httpx and building its client (an SSL context
with certifi's bundle, even for http://) cost ~0.3 s of CPU, more than all of `flm jobs` besides; a command makes
one request or one stream and needs neither pooling nor HTTP/2."""

from __future__ import annotations

import json
import os

from flm.config import FLMConfigError


def console():
    from flm.cli import console

    return console()


# --- the client --------------------------------------------------------------------------------------------
class Client:
    """JSON over HTTP(S) against FLM_URL with FLM_API_KEY; every non-2xx answer becomes a one-line FLMConfigError.
    `timeout`: seconds to connect and between bytes of an answer (a stream has none between events)."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60.0):
        from urllib.parse import urlsplit

        from api.settings import DEFAULT_PORT

        self.url = (url or os.environ.get("FLM_URL") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")
        where = urlsplit(self.url)
        if where.scheme not in ("http", "https") or not where.hostname:
            raise FLMConfigError(f"FLM_URL: {self.url!r} is not an http(s)://host[:port] URL of the gateway")
        key = key if key is not None else os.environ.get("FLM_API_KEY")
        if not key:
            raise FLMConfigError("FLM_API_KEY: not set; create a key with `flm keys create --name NAME` on the "
                                 "gateway's machine and export it")
        self.where, self.timeout = where, timeout
        self.headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}

    def _open(self, method: str, path: str, body: dict | None, params: dict | None, timeout: float | None,
              accept: str | None = None):
        """(connection, response) of one request; FLMConfigError if nothing answers."""
        import http.client
        from urllib.parse import urlencode

        kind = http.client.HTTPSConnection if self.where.scheme == "https" else http.client.HTTPConnection
        conn = kind(self.where.hostname, self.where.port, timeout=timeout)  # https: the default context verifies
        target = self.where.path + path + (f"?{urlencode(params)}" if params else "")
        headers = {**self.headers, **({"Accept": accept} if accept else {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, target, body=data, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise FLMConfigError(f"FLM_URL: nothing answers at {self.url} ({type(e).__name__}); start the stack "
                                 f"with `flm up` or set FLM_URL") from None

    @staticmethod
    def _refusal(status: int, method: str, path: str, text: str) -> FLMConfigError:
        try:
            message = json.loads(text).get("error") or text
        except (ValueError, AttributeError):
            message = text.strip() or "no message"
        return FLMConfigError(f"{status} from {method} {path}: {message}")

    def request(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        """The JSON answer of `method path` (with `body` as JSON, `params` as the query)."""
        import http.client

        conn, r = self._open(method, path, body, params, self.timeout)
        try:
            text = r.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as e:
            raise FLMConfigError(f"FLM_URL: the answer from {self.url} broke off ({type(e).__name__})") from None
        finally:
            conn.close()
        if r.status >= 400:
            raise self._refusal(r.status, method, path, text)
        try:
            return json.loads(text)
        except ValueError:
            raise FLMConfigError(f"FLM_URL: {self.url} answered {method} {path} with no JSON; is it the gateway?") \
                from None

    def stream_events(self, path: str):
        """(event, data) pairs of a server-sent event stream."""
        import http.client

        conn, r = self._open("GET", path, None, None, None, accept="text/event-stream")
        try:
            if r.status >= 400:
                raise self._refusal(r.status, "GET", path, r.read().decode("utf-8", "replace"))
            event, data = "message", []
            for raw in r:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []
        except (OSError, http.client.HTTPException) as e:
            raise FLMConfigError(f"FLM_URL: the stream from {self.url} broke ({type(e).__name__})") from None
        finally:
            conn.close()


def follow(client: Client, job_id: str) -> str:
    """A live progress bar from the job's metric stream until it ends; returns the final state."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    c = console()
    final = "UNKNOWN"
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    steps: dict[str, str] = {}
    with Progress(*columns, console=c) as bar:
        task = bar.add_task(f"{job_id} queued", total=None)
        for event, data in client.stream_events(f"/v1/jobs/{job_id}/metrics?stream=true"):
            if event == "state":
                p = data.get("progress") or {}
                bar.update(task, total=p.get("total_tokens"), description=f"{job_id} {data['state'].lower()}")
                for step in data.get("steps") or []:  # a pipeline's steps, as they change
                    if steps.get(step["name"]) != step["state"]:
                        steps[step["name"]] = step["state"]
                        if step["state"] not in ("PENDING", "SKIPPED"):
                            result = f" {step['result']}" if step.get("result") else ""
                            c.print(f"{step['name']}: {step['state'].lower()}{result}", soft_wrap=True)
                    if step["state"] == "RUNNING":
                        bar.update(task, description=f"{job_id} {step['name']}")
            elif event == "metric":
                if data.get("event") == "growth":
                    c.print(f"grew into stage {data['stage']} at step {data['step']}: "
                            f"{data['params'] / 1e6:.2f}M params, |Δloss| {data['dloss']:.1e}")
                elif "loss" in data:
                    val = f" val {data['val_loss']:.3f}" if "val_loss" in data else ""
                    bar.update(task, completed=data["tokens"],
                               description=f"stage {data['stage']} loss {data['loss']:.3f}{val}")
            elif event == "end":
                final = data["state"]
                if data.get("error"):
                    c.print(f"[red]{job_id} {final}[/red]: {data['error']}")
    return final
