// Loss curves drawn as SVG by hand (a few dozen lines instead of a vendored charting library): lines and dots
// against a linear x axis (tokens or FLOPs), and vertical markers at growth events.

const NS = "http://www.w3.org/2000/svg";
const MARGIN = { top: 34, right: 16, bottom: 42, left: 56 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** About `count` round tick values covering [lo, hi]. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => raw <= s);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

let chartCount = 0;

/**
 * A figure holding one SVG chart.
 * series: [{name, cls, points: [[x, y], ...], dots}]; markers: [{x, label, cls}] (vertical lines, labelled).
 */
export function lineChart({ title, xLabel, yLabel, series, markers = [], formatX = String, formatY = String,
                            width = 620, height = 300, id }) {
  const cid = id ?? `chart-${++chartCount}`;
  const xs = series.flatMap((s) => s.points.map((p) => p[0])).concat(markers.map((m) => m.x));
  const ys = series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.id = cid;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": `${cid}-title`,
                            class: "chart-svg" });
  root.append(svg("title", { id: `${cid}-title` }, title));
  figure.append(root);
  if (!xs.length || !ys.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" },
                    "no records yet"));
    return figure;
  }
  let [x0, x1] = [Math.min(0, ...xs), Math.max(...xs)];
  if (x1 === x0) x1 = x0 + 1;
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const pad = (y1 - y0) * 0.08 || 0.5;
  [y0, y1] = [y0 - pad, y1 + pad];
  const pw = width - MARGIN.left - MARGIN.right;
  const ph = height - MARGIN.top - MARGIN.bottom;
  const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * ph;

  const axes = svg("g", { class: "axes" });
  for (const t of ticks(x0, x1)) {
    axes.append(svg("line", { x1: sx(t), x2: sx(t), y1: MARGIN.top, y2: MARGIN.top + ph, class: "grid" }));
    axes.append(svg("text", { x: sx(t), y: MARGIN.top + ph + 16, "text-anchor": "middle" }, formatX(t)));
  }
  for (const t of ticks(y0, y1)) {
    axes.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left + pw, y1: sy(t), y2: sy(t), class: "grid" }));
    axes.append(svg("text", { x: MARGIN.left - 6, y: sy(t) + 4, "text-anchor": "end" }, formatY(t)));
  }
  axes.append(svg("rect", { x: MARGIN.left, y: MARGIN.top, width: pw, height: ph, class: "frame" }));
  axes.append(svg("text", { x: MARGIN.left + pw / 2, y: height - 6, "text-anchor": "middle", class: "label" },
                  xLabel));
  axes.append(svg("text", { x: 14, y: MARGIN.top + ph / 2, "text-anchor": "middle", class: "label",
                            transform: `rotate(-90 14 ${MARGIN.top + ph / 2})` }, yLabel));
  root.append(axes);

  markers.forEach((m, i) => {
    const g = svg("g", { class: `marker ${m.cls ?? ""}`.trim() });
    const x = sx(m.x);
    g.append(svg("line", { x1: x, x2: x, y1: MARGIN.top - 4, y2: MARGIN.top + ph }));
    const right = x > MARGIN.left + pw * 0.6;
    g.append(svg("text", { x: right ? x - 4 : x + 4, y: MARGIN.top - 20 + (i % 2) * 12,
                           "text-anchor": right ? "end" : "start" }, m.label));
    g.append(svg("title", {}, m.label));
    root.append(g);
  });

  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const g = svg("g", { class: `series ${s.cls}`, "data-points": pts.length });
    g.append(svg("title", {}, s.name));
    if (s.dots) {
      for (const [x, y] of pts) g.append(svg("circle", { cx: sx(x), cy: sy(y), r: 3 }));
    }
    if (pts.length > 1 || !s.dots) {
      g.append(svg("polyline", { points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") }));
    }
    root.append(g);
  }

  const legend = document.createElement("figcaption");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    item.className = `key ${s.cls}`;
    item.textContent = s.name;
    legend.append(item);
  }
  if (markers.length) {
    const item = document.createElement("span");
    item.className = "key growth";
    item.textContent = "growth (|Δloss| across it)";
    legend.append(item);
  }
  figure.append(legend);
  return figure;
}
