// The jobs page: the caller's jobs, newest first, refreshed every 2 s (GET /v1/jobs).

import { call, poll } from "./api.js";
import { errorBox, h, stateBadge } from "./dom.js";
import { age, num, parseTime } from "./format.js";

const REFRESH_MS = 2000;

function progressCell(job) {
  const pct = job.progress?.percent;
  if (pct === null || pct === undefined) return "—";
  return h("span", { class: "progress" },
    h("progress", { max: 100, value: pct, "aria-label": `${job.id} progress` }), ` ${num(pct, 3)} %`);
}

function stageCell(job) {
  return job.stages ? `${(job.stage ?? 0) + 1} / ${job.stages}` : "—";
}

function row(job) {
  return h("tr", { "data-job": job.id, "data-state": job.state },
    h("th", { scope: "row" }, h("a", { href: `#/jobs/${job.id}` }, job.id)),
    h("td", {}, stateBadge(job.state)),
    h("td", {}, job.kind),
    h("td", {}, stageCell(job)),
    h("td", {}, progressCell(job)),
    h("td", { class: "num" }, num(job.val_loss)),
    h("td", {}, h("time", { datetime: parseTime(job.created_at).toISOString() }, age(job.created_at))));
}

export function render(page) {
  const body = h("tbody");
  const status = h("p", { class: "muted", role: "status" });
  const error = h("div");
  page.append(
    h("h1", {}, "Jobs"),
    h("p", { class: "muted" }, "Your jobs, newest first. Submit them with ", h("code", {}, "flm submit"),
      " or POST /v1/jobs; this page follows them as they run."),
    error,
    h("table", { class: "jobs", id: "jobs-table" },
      h("caption", { class: "visually-hidden" }, "Your jobs"),
      h("thead", {}, h("tr", {}, ["Job", "State", "Kind", "Stage", "Progress", "Val loss", "Age"]
        .map((t) => h("th", { scope: "col" }, t)))),
      body),
    status);
  return poll(async (alive) => {
    const list = await call("GET", "/v1/jobs?limit=50");
    if (!alive()) return;
    error.replaceChildren();
    body.replaceChildren(...list.jobs.map(row));
    const shown = list.total > list.jobs.length ? ` (newest ${list.jobs.length} shown)` : "";
    status.textContent = list.total ? `${list.total} job${list.total === 1 ? "" : "s"}${shown}` : "No jobs yet.";
  }, REFRESH_MS, (e) => {
    body.replaceChildren();
    error.replaceChildren(errorBox(e.message));
  });
}
