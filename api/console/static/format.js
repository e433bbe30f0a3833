// Numbers and times as people read them: 1.2M tokens, 3.4e+12 FLOPs, "5 min ago".

export function si(n, digits = 3) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [v, u] of units) if (Math.abs(n) >= v) return `${+(n / v).toPrecision(digits)}${u}`;
  return `${+Number(n).toPrecision(digits)}`;
}

export function sci(n, digits = 3) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  if (n === 0) return "0";
  return Number(n).toExponential(digits - 1);
}

export function num(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  if (Math.abs(n) >= 10 ** digits) return Math.round(n).toLocaleString("en-US");  // 1,843 rather than 1.84e+3
  const text = Number(n).toPrecision(digits);
  return text.includes("e") || !text.includes(".") ? text : text.replace(/\.?0+$/, "");
}

export function dollars(n) {
  return n === null || n === undefined ? "—" : `$${Math.round(n).toLocaleString("en-US")}`;
}

export function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 120) return `${num(s, 3)} s`;
  if (s < 7200) return `${num(s / 60, 3)} min`;
  return `${num(s / 3600, 3)} h`;
}

/** The gateway's times are UTC without a zone suffix: read them as UTC. */
export function parseTime(text) {
  return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(text) ? text : `${text}Z`);
}

export function age(text, now = Date.now()) {
  const s = Math.max(0, (now - parseTime(text).getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
