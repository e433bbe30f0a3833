// The gateway's REST routes, called with the API key the user typed. The key lives in this tab's sessionStorage
// (gone when the tab closes) and travels only in the Authorization header: never in a URL, never in a cookie.

const KEY = "flm.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  forget: () => sessionStorage.removeItem(KEY),
};

/** An error answer of the gateway: its status and the one line that says what to change. */
export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

// Called on any 401 (the key was revoked meanwhile, or never valid): app.js shows the sign-in form again.
let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

function headers(json) {
  const h = { Authorization: `Bearer ${apiKey.get() ?? ""}` };
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  const body = await response.json().catch(() => null);
  const err = body?.error;  // ErrorResponse {error, field} or OpenAI's {error: {message, param}}
  const message = typeof err === "string" ? err : err?.message ?? `HTTP ${response.status} ${response.statusText}`;
  const error = new ApiError(response.status, message, typeof err === "string" ? body.field : err?.param);
  if (response.status === 401) onUnauthorized(error);
  return error;
}

/** One JSON call: the parsed body, or an ApiError. */
export async function call(method, path, body, { signal } = {}) {
  const response = await fetch(path, {
    method, signal, headers: headers(body !== undefined), cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** The driver log as text (GET /v1/jobs/{id}/logs). */
export async function logs(jobId, tail) {
  const q = tail ? `?tail=${tail}` : "";
  return (await call("GET", `/v1/jobs/${encodeURIComponent(jobId)}/logs${q}`)).logs;
}

/** Server-sent events of a call, as {event, data} objects, until the server ends the stream or `signal` aborts.
 *  Read from fetch: EventSource cannot send the Authorization header. */
export async function* events(method, path, body, { signal } = {}) {
  const response = await fetch(path, {
    method, signal, cache: "no-store",
    headers: { ...headers(body !== undefined), Accept: "text/event-stream" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

/** Runs `tick(alive)` now and again `ms` after each run settles, until the returned stop() is called (alive() is
 *  false from then on, so a late answer is dropped). An error goes to `onError`; a 401 also ends the polling (the
 *  sign-in form is back). */
export function poll(tick, ms, onError = () => {}) {
  let timer = null;
  let stopped = false;
  const alive = () => !stopped;
  const run = async () => {
    try {
      await tick(alive);
    } catch (e) {
      if (stopped) return;
      onError(e);
      if (e.status === 401) return;
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
