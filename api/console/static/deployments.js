// Deployments (state, TP, replicas) and a playground that streams a completion from a RUNNING one through the
// gateway's OpenAI route (POST /v1/completions with stream: true).

import { call, events, poll } from "./api.js";
import { errorBox, h, stateBadge } from "./dom.js";
import { age, parseTime } from "./format.js";

const REFRESH_MS = 3000;

function replicas(spec) {
  const a = spec.autoscaling;
  return a ? `${a.min_replicas}–${a.max_replicas} (autoscaling)` : String(spec.replicas ?? 1);
}

function row(dep) {
  return h("tr", { "data-deployment": dep.id, "data-state": dep.state },
    h("th", { scope: "row" }, dep.id),
    h("td", {}, stateBadge(dep.state), dep.error ? h("div", { class: "error" }, dep.error) : null),
    h("td", { class: "num" }, String(dep.spec.tp ?? 1)),
    h("td", { class: "num" }, replicas(dep.spec)),
    h("td", {}, dep.job_id ? h("a", { href: `#/jobs/${dep.job_id}` }, dep.job_id) : "—"),
    h("td", {}, h("code", {}, dep.checkpoint)),
    h("td", {}, h("time", { datetime: parseTime(dep.created_at).toISOString() }, age(dep.created_at))));
}

function playground() {
  const model = h("select", { id: "pg-model", required: true });
  const prompt = h("textarea", { id: "pg-prompt", rows: 3, required: true }, "ROMEO: What light");
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, max: 4096, value: 32, class: "short" });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0,
                                   class: "short" });
  const output = h("output", { id: "pg-output", for: "pg-prompt", class: "completion", "aria-live": "polite",
                               "data-chunks": 0 });
  const status = h("p", { class: "muted", role: "status", id: "pg-status" });
  const run = h("button", { type: "submit", id: "pg-run" }, "Generate");
  const stop = h("button", { type: "button", id: "pg-stop", disabled: true }, "Stop");
  let abort = null;

  stop.addEventListener("click", () => abort?.abort());
  const form = h("form", { id: "playground", onsubmit: async (e) => {
    e.preventDefault();
    abort = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    output.textContent = "";
    output.dataset.chunks = 0;
    output.dataset.done = "false";
    status.textContent = "generating…";
    const t0 = performance.now();
    let finish = null;
    try {
      const body = { model: model.value, prompt: prompt.value, max_tokens: Number(maxTokens.value),
                     temperature: Number(temperature.value), stream: true };
      for await (const ev of events("POST", "/v1/completions", body, { signal: abort.signal })) {
        if (ev.data === "[DONE]") break;
        const chunk = JSON.parse(ev.data);
        if (chunk.error) throw new Error(chunk.error.message ?? JSON.stringify(chunk.error));
        const choice = chunk.choices?.[0];
        if (choice?.text) {
          output.append(choice.text);
          output.dataset.chunks = Number(output.dataset.chunks) + 1;
        }
        finish = choice?.finish_reason ?? finish;
      }
      status.textContent = `${output.dataset.chunks} chunks in ${((performance.now() - t0) / 1000).toFixed(2)} s` +
        (finish ? ` (finish: ${finish})` : "");
    } catch (err) {
      status.textContent = err.name === "AbortError" ? "stopped" : `error: ${err.message}`;
    } finally {
      output.dataset.done = "true";
      run.disabled = false;
      stop.disabled = true;
    }
  } },
    h("div", { class: "field" }, h("label", { for: "pg-model" }, "Model (a RUNNING deployment)"), model),
    h("div", { class: "field" }, h("label", { for: "pg-prompt" }, "Prompt"), prompt),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "pg-max-tokens" }, "Max tokens"), maxTokens),
      h("div", { class: "field" }, h("label", { for: "pg-temperature" }, "Temperature"), temperature)),
    h("div", { class: "actions" }, run, stop));
  return { element: h("div", {}, form, h("h3", {}, "Completion"), output, status), model };
}

export function render(page) {
  const body = h("tbody");
  const error = h("div");
  const status = h("p", { class: "muted", role: "status" });
  const pg = playground();
  page.append(
    h("h1", {}, "Deployments"),
    error,
    h("table", { id: "deployments-table" },
      h("caption", { class: "visually-hidden" }, "Your deployments"),
      h("thead", {}, h("tr", {}, ["Name", "State", "TP", "Replicas", "Job", "Checkpoint", "Age"]
        .map((t) => h("th", { scope: "col" }, t)))),
      body),
    status,
    h("section", { "aria-labelledby": "pg-title" }, h("h2", { id: "pg-title" }, "Playground"), pg.element));

  return poll(async (alive) => {
    const { deployments } = await call("GET", "/v1/deployments");
    if (!alive()) return;
    error.replaceChildren();
    body.replaceChildren(...deployments.map(row));
    status.textContent = deployments.length ? "" : "No deployments. Deploy a finished job from its page.";
    const running = deployments.filter((d) => d.state === "RUNNING").map((d) => d.id);
    if (running.join() !== [...pg.model.options].map((o) => o.value).join()) {
      const keep = pg.model.value;
      pg.model.replaceChildren(...running.map((id) => h("option", { value: id }, id)));
      if (running.includes(keep)) pg.model.value = keep;
    }
  }, REFRESH_MS, (e) => error.replaceChildren(errorBox(e.message)));
}
