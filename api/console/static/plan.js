// The plan page: `flm plan`'s cost table (POST /v1/plan) for a preset (GET /v1/presets) or a pasted plan.

import { call } from "./api.js";
import { errorBox, h } from "./dom.js";
import { dollars, num, sci, si } from "./format.js";

function costTable(cost) {
  const rows = cost.stages.map((s) => h("tr", {},
    h("th", { scope: "row" }, s.name), h("td", {}, si(s.params)), h("td", {}, si(s.tokens)), h("td", {}, sci(s.flops)),
    h("td", {}, String(s.gpus)), h("td", {}, num(s.tflops_per_gpu, 3)), h("td", {}, num(s.days, 3)),
    h("td", {}, num(s.gpu_days, 3)), h("td", {}, dollars(s.dollars))));
  const last = cost.stages[cost.stages.length - 1];
  rows.push(h("tr", { class: "total" }, h("th", { scope: "row" }, "growth total"), h("td"),
    h("td", {}, si(cost.total_tokens)), h("td", {}, sci(cost.total_flops)), h("td"), h("td"),
    h("td", {}, num(cost.total_days, 3)), h("td"), h("td", {}, dollars(cost.total_dollars))));
  rows.push(h("tr", {}, h("th", { scope: "row" }, "from scratch"), h("td", {}, si(last.params)),
    h("td", {}, si(cost.total_tokens)), h("td", {}, sci(cost.scratch_flops)), h("td", {}, String(last.gpus)),
    h("td", {}, num(last.tflops_per_gpu, 3)), h("td", {}, num(cost.scratch_days, 3)), h("td"),
    h("td", {}, dollars(cost.scratch_dollars))));
  return h("div", {},
    h("table", { id: "plan-cost" },
      h("caption", {}, `plan ${cost.name}: growth vs training the final size from scratch`),
      h("thead", {}, h("tr", {}, ["Stage", "Params", "Tokens", "FLOPs", "GPUs", "TFLOP/s/GPU", "Days", "GPU-days", "$"]
        .map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)),
    h("p", { id: "plan-saving" }, "Time saved by growth: ", h("strong", {}, `${(cost.time_saving * 100).toFixed(1)} %`),
      ` (${num(cost.speedup, 3)}× faster)`));
}

function numberField(id, label, attrs = {}) {
  const input = h("input", { id, type: "number", step: "any", class: "short", ...attrs });
  return { input, element: h("div", { class: "field" }, h("label", { for: id }, label), input) };
}

export function render(page) {
  const preset = h("select", { id: "plan-preset" }, h("option", { value: "" }, "— paste a plan below —"));
  const text = h("textarea", { id: "plan-text", rows: 14, spellcheck: false, class: "code",
                               placeholder: "name: my-plan\nstages:\n  - model: {...}\n    tokens: ..." });
  const gpus = numberField("hw-gpus", "GPUs per stage (empty: each stage's layout)", { min: 1, step: 1 });
  const tflops = h("input", { id: "hw-tflops", class: "medium", placeholder: "e.g. 160,160,165" });
  const mfu = numberField("hw-mfu", "MFU (when no TFLOP/s are given)", { min: 0, max: 1, placeholder: "0.5" });
  const peak = numberField("hw-peak", "Peak TFLOP/s per GPU", { min: 0, placeholder: "312" });
  const price = numberField("hw-price", "$ per GPU-hour", { min: 0, placeholder: "1.0" });
  const out = h("div", { id: "plan-out", "aria-live": "polite" });
  let presets = [];

  preset.addEventListener("change", () => {
    const p = presets.find((x) => x.name === preset.value);
    if (p) text.value = p.text;
  });

  const form = h("form", { id: "plan-form", onsubmit: async (e) => {
    e.preventDefault();
    const hardware = {};
    if (gpus.input.value) hardware.gpus = Number(gpus.input.value);
    if (tflops.value.trim()) hardware.tflops_per_gpu = tflops.value.split(",").map((v) => Number(v.trim()));
    if (mfu.input.value) hardware.mfu = Number(mfu.input.value);
    if (peak.input.value) hardware.peak_tflops = Number(peak.input.value);
    if (price.input.value) hardware.price_per_gpu_hour = Number(price.input.value);
    out.replaceChildren(h("p", { class: "muted" }, "computing…"));
    try {
      out.replaceChildren(costTable(await call("POST", "/v1/plan", { plan: text.value, hardware })));
    } catch (err) {
      out.replaceChildren(errorBox(err.message));
    }
  } },
    h("div", { class: "field" }, h("label", { for: "plan-preset" }, "Preset"), preset),
    h("div", { class: "field" }, h("label", { for: "plan-text" }, "Plan (YAML, as in configs/)"), text),
    h("fieldset", {}, h("legend", {}, "Hardware"),
      h("div", { class: "row" }, gpus.element,
        h("div", { class: "field" }, h("label", { for: "hw-tflops" }, "Achieved TFLOP/s per GPU (one, or one per stage)"),
          tflops),
        mfu.element, peak.element, price.element)),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "plan-run" }, "Compute the cost")));

  page.append(h("h1", {}, "Plan"),
    h("p", { class: "muted" }, "What ", h("code", {}, "flm plan"), " prints: FLOPs, days, GPU-days and dollars per ",
      "stage, against training the final size from scratch on the same tokens (compute only)."),
    form, out);

  call("GET", "/v1/presets").then((list) => {
    presets = list.plans;
    preset.append(...presets.map((p) => h("option", { value: p.name }, p.name)));
  }).catch((e) => out.replaceChildren(errorBox(e.message)));
  return () => {};
}
