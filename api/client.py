"""The gateway's REST client, as `flm submit`, `flm jobs`, ... and `flm demo` use it: `Client` (httpx against
`FLM_URL` with `FLM_API_KEY`, every non-2xx answer a one-line FLMConfigError) and `follow` (a live progress bar
from a job's server-sent events). Imports nothing heavy at module level."""

from __future__ import annotations

import json
import os

from flm.config import FLMConfigError


def console():
    from flm.cli import console

    return console


# --- the client --------------------------------------------------------------------------------------------
class Client:
    """httpx against FLM_URL with FLM_API_KEY; every non-2xx answer becomes a one-line FLMConfigError."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60.0):
        import httpx

        from api.settings import DEFAULT_PORT

        self.url = (url or os.environ.get("FLM_URL") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")
        key = key if key is not None else os.environ.get("FLM_API_KEY")
        if not key:
            raise FLMConfigError("FLM_API_KEY: not set; create a key with `flm keys create --name NAME` on the "
                                 "gateway's machine and export it")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise FLMConfigError(f"FLM_URL: nothing answers at {self.url} ({type(e).__name__}); start the stack "
                                 f"with `flm up` or set FLM_URL") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text.strip() or r.reason_phrase
            raise FLMConfigError(f"{r.status_code} from {method} {path}: {message}")
        return r.json()

    def stream_events(self, path: str):
        """(event, data) pairs of a server-sent event stream."""
        import httpx

        try:
            with self.http.stream("GET", path, headers={"Accept": "text/event-stream"}, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise FLMConfigError(f"{r.status_code} from GET {path}: {r.json().get('error', r.text)}")
                event, data = "message", []
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, json.loads("\n".join(data))
                        event, data = "message", []
        except httpx.TransportError as e:
            raise FLMConfigError(f"FLM_URL: the stream from {self.url} broke ({type(e).__name__})") from None


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
