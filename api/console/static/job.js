// One job: its loss curves against tokens and FLOPs with the growth events marked, its stages, checkpoints,
// pipeline steps, errors and driver log, live while it runs (the metric stream's server-sent events), and the
// cancel / resume / deploy actions.

import { call, events, logs, poll } from "./api.js";
import { lineChart } from "./chart.js";
import { errorBox, h, stateBadge, table } from "./dom.js";
import { age, num, parseTime, sci, seconds, si } from "./format.js";

const TERMINAL = ["SUCCEEDED", "FAILED", "STOPPED"];
const VIEW_REFRESH_MS = 3000;
const DRAW_EVERY_MS = 400;
const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;  // terminal colour codes, which Ray puts around its workers' log prefixes

/** The tokens and FLOPs done when each growth event happened: those of the newest record at or before its step. */
export function growthEvents(records) {
  const out = [];
  let last = { tokens: 0, flops: 0 };
  for (const r of records) {
    if (r.event === "growth") out.push({ ...r, tokens: last.tokens, flops: last.flops });
    else if ("tokens" in r) last = r;
  }
  return out;
}

/** Per stage: tokens and FLOPs done, training seconds (tokens / tokens-per-second of each logged interval), the
 *  newest losses, and the parameters of the grown model (growth events carry them). */
export function stageSummaries(records) {
  const stages = new Map();
  let prev = { tokens: 0, flops: 0 };
  for (const r of records) {
    if (r.event === "growth") {
      stages.set(r.stage, { ...(stages.get(r.stage) ?? {}), params: r.params, dloss: r.dloss });
      continue;
    }
    if (!("tokens" in r)) continue;
    const s = stages.get(r.stage) ?? {};
    if (s.startTokens === undefined) Object.assign(s, { startTokens: prev.tokens, startFlops: prev.flops });
    s.tokens = r.tokens - s.startTokens;
    s.flops = r.flops - s.startFlops;
    if (r.tokens_per_s > 0 && r.tokens > prev.tokens) s.seconds = (s.seconds ?? 0) + (r.tokens - prev.tokens) / r.tokens_per_s;
    if ("loss" in r) s.loss = r.loss;
    if ("val_loss" in r) s.val_loss = r.val_loss;
    stages.set(r.stage, s);
    prev = r;
  }
  return stages;
}

function curves(records, x, xLabel, formatX, id) {
  const train = records.filter((r) => "loss" in r && r.event === undefined);
  const val = records.filter((r) => "val_loss" in r);
  const growth = growthEvents(records);
  return lineChart({
    id, title: `Loss against ${xLabel}`, xLabel, yLabel: "loss (nats/token)", formatX, formatY: (v) => num(v, 3),
    series: [
      { name: "training loss", cls: "train", points: train.map((r) => [r[x], r.loss]) },
      { name: "validation loss", cls: "val", dots: true, points: val.map((r) => [r[x], r.val_loss]) },
    ],
    markers: growth.map((g) => ({
      x: g[x], cls: "growth-marker",
      label: `grow → stage ${g.stage + 1}: |Δloss| ${g.dloss === 0 ? "0" : sci(g.dloss, 2)}`,
    })),
  });
}

function section(title, ...children) {
  const id = `sec-${title.toLowerCase().replace(/[^a-z]+/g, "-")}`;
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

export function render(page, [jobId]) {
  const abort = new AbortController();
  let view = null;
  let planned = null;  // POST /v1/plan of the job's plan: params and tokens per stage
  let records = [];
  let stopped = false;
  let drawTimer = null;
  let stopPolling = () => {};
  let actionsFor = null;  // the state the action buttons were drawn for: redrawn only when it changes

  const header = h("div", { class: "job-header" });
  const actions = h("div", { class: "actions", role: "group", "aria-label": "Job actions" });
  const actionStatus = h("p", { role: "status", class: "muted", id: "action-status" });
  const problems = h("div");
  const charts = h("div", { class: "charts" });
  const growth = h("div");
  const stagesBox = h("div");
  const stepsBox = h("div");
  const checkpointsBox = h("div");
  const resultsBox = h("div");
  const logBox = h("pre", { class: "log", tabindex: 0, hidden: true, "aria-label": "Driver log" });
  const streamStatus = h("p", { class: "muted", role: "status", id: "stream-status" });

  page.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    header, actions, actionStatus, problems,
    section("Loss", streamStatus, charts, growth),
    section("Stages", stagesBox),
    stepsBox,
    section("Checkpoints", checkpointsBox),
    resultsBox,
    section("Logs",
      h("div", { class: "actions" },
        h("button", { type: "button", onclick: () => showLog(200) }, "Show the last 200 lines"),
        h("button", { type: "button", onclick: downloadLog }, "Download the whole log")),
      logBox));

  async function showLog(tail) {
    try {
      logBox.textContent = (await logs(jobId, tail)).replace(ANSI, "") || "(no output yet)";
    } catch (e) {
      logBox.textContent = e.message;
    }
    logBox.hidden = false;
  }

  async function downloadLog() {
    try {
      const text = await logs(jobId);
      const a = h("a", { href: URL.createObjectURL(new Blob([text], { type: "text/plain" })), download: `${jobId}.log` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    } catch (e) {
      actionStatus.textContent = e.message;
    }
  }

  async function act(label, method, path, body) {
    actionStatus.textContent = `${label}…`;
    try {
      const out = await call(method, path, body);
      actionStatus.textContent = `${label}: done`;
      return out;
    } catch (e) {
      actionStatus.textContent = `${label}: ${e.message}`;
      return null;
    } finally {
      await refreshView();
    }
  }

  function drawActions() {
    const buttons = [];
    if (!TERMINAL.includes(view.state)) {
      const confirm = h("span", { class: "confirm", hidden: true },
        "Stop this job? ",
        h("button", { type: "button", class: "danger", id: "confirm-cancel",
                      onclick: () => act("Cancel", "DELETE", `/v1/jobs/${jobId}`) }, "Yes, cancel it"),
        h("button", { type: "button", onclick: () => { confirm.hidden = true; ask.hidden = false; ask.focus(); } },
          "No"));
      const ask = h("button", { type: "button", id: "cancel", disabled: view.state === "STOPPING",
                                onclick: () => { ask.hidden = true; confirm.hidden = false; confirm.querySelector("button").focus(); } },
        view.state === "STOPPING" ? "Stopping…" : "Cancel job");
      buttons.push(ask, confirm);
    }
    if (["HELD", "STOPPED", "FAILED"].includes(view.state)) {
      buttons.push(h("button", { type: "button", id: "resume",
                                 onclick: () => act("Resume", "POST", `/v1/jobs/${jobId}/resume`) },
        view.state === "HELD" ? "Start" : "Resume"));
    }
    if (view.state === "SUCCEEDED" && ["train", "pipeline"].includes(view.kind)) {
      const name = h("input", { id: "deploy-name", value: view.id, size: 18, pattern: "[a-z0-9][a-z0-9-]{0,47}" });
      const tp = h("input", { id: "deploy-tp", type: "number", min: 1, max: 64, value: 1, class: "short" });
      buttons.push(h("form", { class: "inline", onsubmit: async (e) => {
        e.preventDefault();
        const out = await act("Deploy", "POST", "/v1/deployments",
                              { job_id: jobId, name: name.value || undefined, tp: Number(tp.value) });
        if (out) actionStatus.append(" — ", h("a", { href: "#/deployments" }, `${out.id} on the deployments page`));
      } },
        h("label", { for: "deploy-name" }, "Deployment name"), name,
        h("label", { for: "deploy-tp" }, "TP"), tp,
        h("button", { type: "submit" }, "Deploy")));
    }
    actions.replaceChildren(...buttons);
  }

  function drawHeader() {
    const p = view.progress;
    header.replaceChildren(
      h("h1", {}, `Job ${view.id} `, stateBadge(view.state)),
      h("dl", { class: "facts" },
        h("dt", {}, "Kind"), h("dd", {}, view.kind),
        h("dt", {}, "Stage"), h("dd", {}, view.stages ? `${(view.stage ?? 0) + 1} / ${view.stages}` : "—"),
        h("dt", {}, "Progress"), h("dd", {}, p ? h("span", { class: "progress" },
          h("progress", { max: 100, value: p.percent ?? 0, "aria-label": "Progress" }),
          ` ${num(p.percent ?? 0, 3)} % · step ${p.step} / ${p.total_steps ?? "?"} · ${si(p.tokens)} tokens`) : "—"),
        h("dt", {}, "Val loss"), h("dd", {}, num(view.val_loss)),
        h("dt", {}, "Attempt"), h("dd", {}, `${view.attempt}${view.ray_submission_id ? ` (Ray ${view.ray_submission_id})` : ""}`),
        h("dt", {}, "Created"), h("dd", {}, h("time", { datetime: parseTime(view.created_at).toISOString() },
          age(view.created_at)))));
    problems.replaceChildren(...(view.error ? [errorBox(`Error: ${view.error}`)] : []));
    if (actionsFor !== view.state) {
      actionsFor = view.state;
      drawActions();
    }
    checkpointsBox.replaceChildren(view.checkpoints?.length
      ? h("ul", { class: "paths" }, view.checkpoints.map((c) => h("li", {}, h("code", {}, c))))
      : h("p", { class: "muted" }, "none yet"));
    stepsBox.replaceChildren(...(view.steps ? [section("Pipeline steps", table(null,
      ["Step", "State", "Seconds", "Result"],
      view.steps.map((s) => [s.name, stateBadge(s.state), seconds(s.seconds),
                             s.result ? h("code", {}, JSON.stringify(s.result)) : "—"]), { id: "steps" }))] : []));
    const results = view.results && view.kind !== "pipeline" ? view.results : null;
    resultsBox.replaceChildren(...(results ? [section("Results", h("pre", {}, JSON.stringify(results, null, 2)))] : []));
  }

  function drawCurves() {
    drawTimer = null;
    charts.replaceChildren(
      curves(records, "tokens", "tokens", si, "chart-tokens"),
      curves(records, "flops", "FLOPs", (v) => sci(v, 2), "chart-flops"));
    const events = growthEvents(records);
    growth.replaceChildren(events.length ? table("Growth events", ["Into stage", "Step", "Mode", "Params after",
      "|Δloss|", "max |Δlogits|"], events.map((g) => [String(g.stage + 1), String(g.step), g.mode ?? "—",
      si(g.params), sci(g.dloss, 2), sci(g.max_abs_dlogits, 2)]), { id: "growth-events" }) : "");
    const done = stageSummaries(records);
    const count = Math.max(view?.stages ?? 0, planned?.stages.length ?? 0, ...[...done.keys()].map((k) => k + 1));
    const rows = [];
    for (let k = 0; k < count; k++) {
      const d = done.get(k) ?? {};
      const plan = planned?.stages[k];
      rows.push([plan?.name ?? String(k + 1), si(d.params ?? plan?.params),
        `${si(d.tokens ?? 0)} / ${plan ? si(plan.tokens) : "?"}`, sci(d.flops, 2), seconds(d.seconds),
        num(d.loss), num(d.val_loss)]);
    }
    stagesBox.replaceChildren(count ? table(null, ["Stage", "Params", "Tokens (done / plan)", "FLOPs",
      "Training time", "Loss", "Val loss"], rows, { id: "stages" }) : h("p", { class: "muted" }, "no stages"));
  }

  function scheduleDraw() {
    if (drawTimer === null) drawTimer = setTimeout(drawCurves, DRAW_EVERY_MS);
  }

  async function refreshView() {
    try {
      view = await call("GET", `/v1/jobs/${jobId}`);
      if (!stopped) drawHeader();
    } catch (e) {
      if (!stopped && !view) page.replaceChildren(h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")), errorBox(e.message));
      throw e;
    }
  }

  async function follow() {
    streamStatus.textContent = "following the metric stream…";
    try {
      for await (const ev of events("GET", `/v1/jobs/${jobId}/metrics?stream=true`, undefined,
                                    { signal: abort.signal })) {
        if (ev.event === "metric") {
          records.push(JSON.parse(ev.data));
          scheduleDraw();
        } else if (ev.event === "state") {
          view = { ...view, ...JSON.parse(ev.data) };
          drawHeader();
        } else if (ev.event === "end") {
          streamStatus.textContent = `${records.length} records; the job ended ${JSON.parse(ev.data).state}`;
          await refreshView();
          drawCurves();
          return;
        }
      }
    } catch (e) {
      if (stopped) return;
      streamStatus.textContent = `the metric stream broke (${e.message}); reconnecting`;
    }
    if (!stopped) {  // reconnect from the start (a resumed run may have rewritten its stream)
      records = [];
      setTimeout(follow, 2000);
    }
  }

  (async () => {
    try {
      await refreshView();
    } catch {
      return;
    }
    drawCurves();
    if (view.spec?.plan) {
      call("POST", "/v1/plan", { plan: view.spec.plan }).then((p) => { planned = p; drawCurves(); }).catch(() => {});
    }
    follow();
    // checkpoints and progress between the stream's state events
    stopPolling = poll(async () => TERMINAL.includes(view.state) || refreshView(), VIEW_REFRESH_MS);
  })();

  return () => {
    stopped = true;
    abort.abort();
    clearTimeout(drawTimer);
    stopPolling();
  };
}
