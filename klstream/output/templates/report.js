// klstream report: unpacks the inlined payload (see klstream/output/report.py) and draws the
// overview, the response table, one response's heat map at a time and the highest-KL tokens.
// No library, no network: charts are hand-drawn SVG.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MODEL_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000"];
const MODEL_DASHES = ["", "6 3", "2 2", "8 3 2 3", "1 3", "10 4", "4 4"];
// Viridis, light to dark: perceptually ordered and readable with colour-vision deficiencies.
const HEAT = ["#fde725", "#b5de2b", "#6ece58", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989", "#482878", "#440154"];
// Orange / purple (PuOr): Model 1 more sure of its token than Model 2, or less.
const MORE = ["#fee0b6", "#fdb863", "#e08214", "#b35806", "#7f3b08"];
const LESS = ["#d8daeb", "#b2abd2", "#8073ac", "#542788", "#2d004b"];
const PAGE_SIZE = 50;
const TYPED = {
  uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, int32: Int32Array,
  float32: Float32Array, float64: Float64Array,
};
const SCORE_NAMES = { kl: "KL", normalized: "KL/(H1+H2)", estimate: "kl_estimate", logratio: "log-ratio" };
const ESTIMATE_MEANING = "kl_estimate is the recommended number: a model-based point estimate of the full KL(Model 1 ‖ Model 2) per token, in nats, counting the probability both top-k lists leave out (kl_floor, the spec's KL, reads low); ± is the standard error of the mean over the scored positions.";
const CHART_HEIGHT = 280;

function byId(id) { return document.getElementById(id); }

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function isMissing(value) { return value === null || value === undefined || Number.isNaN(value); }

function num(value) {
  if (isMissing(value)) return "n/a";
  if (value === 0) return "0";
  const size = Math.abs(value);
  if (size >= 1e-3 && size < 1e5) return String(Number(value.toPrecision(4)));
  return value.toExponential(2);
}

function approx(value, exact) { return exact || isMissing(value) ? num(value) : "≈ " + num(value); }

function percent(value, digits = 2) { return isMissing(value) ? "n/a" : (100 * value).toFixed(digits) + " %"; }

function count(value) { return isMissing(value) ? "n/a" : Number(value).toLocaleString("en-US"); }

// A probability in percent to three significant digits.
function probability(logprob) {
  const pct = 100 * Math.exp(logprob);
  return (pct >= 0.01 ? String(Number(pct.toPrecision(3))) : pct.toExponential(2)) + " %";
}

// Token text made visible: line breaks and tabs as symbols (line breaks still break).
function showWhitespace(text) {
  const parts = [];
  let plain = "";
  for (const ch of text) {
    if (ch === "\n" || ch === "\t" || ch === "\r") {
      if (plain) parts.push(plain);
      plain = "";
      const symbol = ch === "\n" ? "↵" : ch === "\t" ? "⇥" : "␍";
      parts.push(h("span", { class: "ws", "aria-hidden": "true" }, symbol));
      if (ch === "\n") parts.push("\n");
    } else {
      plain += ch;
    }
  }
  if (plain) parts.push(plain);
  if (!text) parts.push(h("span", { class: "ws", title: "empty token" }, "∅"));
  return parts;
}

function quotedToken(text) { return "“" + text.replace(/\n/g, "↵").replace(/\t/g, "⇥") + "”"; }

function mixColour(stops, t) {
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const a = parseInt(stops[i].slice(1), 16);
  const b = parseInt(stops[i + 1].slice(1), 16);
  const channel = (shift) => Math.round(((a >> shift) & 255) * (1 - f) + ((b >> shift) & 255) * f);
  const [r, g, bl] = [channel(16), channel(8), channel(0)];
  const light = 0.2126 * r + 0.7152 * g + 0.0722 * bl > 140;
  return { background: `rgb(${r}, ${g}, ${bl})`, text: light ? "#000" : "#fff" };
}

// ---- payload ------------------------------------------------------------------------------

function base64Bytes(text) {
  if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

async function loadPayload() {
  const node = byId("klstream-data");
  const bytes = base64Bytes(node.textContent.trim());
  node.textContent = "";
  if (typeof DecompressionStream === "undefined") {
    throw new Error("this browser cannot unpack the report (it has no DecompressionStream); "
      + "open it in a current Chrome, Edge, Firefox or Safari");
  }
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const buffer = await new Response(stream).arrayBuffer();
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== "KLR1") throw new Error("the embedded data is not a klstream report payload");
  const headerLength = view.getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const base = Math.ceil((8 + headerLength) / 8) * 8;
  const arrays = {};
  for (const [name, [dtype, offset, length]] of Object.entries(header.sections)) {
    const Type = TYPED[dtype];
    const planes = new Uint8Array(buffer, base + offset, length * Type.BYTES_PER_ELEMENT);
    arrays[name] = Type.BYTES_PER_ELEMENT === 1 ? planes : new Type(interleave(planes, Type.BYTES_PER_ELEMENT));
  }
  return new Run(header, arrays);
}

// Arrays of wider items come byte plane by byte plane (see Payload.encode); put items together.
function interleave(planes, width) {
  const n = planes.length / width;
  const bytes = new Uint8Array(planes.length);
  for (let b = 0; b < width; b++) {
    const plane = planes.subarray(b * n, (b + 1) * n);
    for (let i = 0, j = b; i < n; i++, j += width) bytes[j] = plane[i];
  }
  return bytes.buffer;
}

function logTable(scale) {
  const step = (scale.high - scale.low) / 254;
  const table = new Float64Array(256);
  table[0] = NaN;
  for (let code = 1; code < 256; code++) table[code] = 10 ** (scale.low + (code - 1) * step);
  return table;
}

function signedLogTable(scale) {
  const step = (scale.high - scale.low) / 126;
  const table = new Float64Array(256);
  table[0] = NaN;
  for (let code = 1; code < 256; code++) {
    if (code > 128) table[code] = 10 ** (scale.low + (code - 129) * step);
    else if (code < 128) table[code] = -(10 ** (scale.low + (127 - code) * step));
  }
  return table;
}

class Run {
  constructor(header, arrays) {
    this.header = header;
    this.a = arrays;
    this.models = header.models;
    this.dictionary = header.dictionary;
    this.responses = arrays["response/index"].length;
    const kl = logTable(header.scales.kl);
    this.tables = { kl, normalized: kl, estimate: kl, logratio: signedLogTable(header.scales.logratio) };
    this.detailOf = new Map(header.detail_rows.map((row, i) => [row, i]));
    this.flags = header.flags;
  }
  label(row) { return this.header.stems[this.a["response/stem"][row]] + ":" + this.a["response/index"][row]; }
  prompt(row) { return this.header.prompts[this.a["response/prompt"][row]]; }
  start(row) { return this.a["response/offset"][row]; }
  length(row) { return this.a["response/num_tokens"][row]; }
  token(position) { return this.dictionary[this.a.tokens[position]]; }
  value(model, score, position) { return this.tables[score][this.a[`${score}/${model}`][position]]; }
  flag(model, position) { return this.a[`flags/${model}`][position]; }
  stat(model, name, row) { return this.a[`response/${model}/${name}`][row]; }
  matchesText(row) { return this.a["response/match_text"][row] === 1; }
  hasDetail(row) { return this.detailOf.has(row); }
  command(row) {
    const dir = this.header.meta.run_dir;
    const quote = (s) => (/^[\w@%+=:,./-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'");
    return `klstream report ${quote(dir)} --response ${quote(this.label(row))} -o ${quote(this.label(row).replace(/[^\w.-]+/g, "_") + ".html")}`;
  }
  errorsOf(row) {
    const start = this.start(row), end = start + this.length(row);
    const found = new Map();
    const positions = this.a["errors/position"], models = this.a["errors/model"];
    for (let i = 0; i < positions.length; i++) {
      if (positions[i] >= start && positions[i] < end) {
        found.set(models[i] * 1e9 + positions[i], this.header.error_messages[this.a["errors/message"][i]]);
      }
    }
    return found;
  }
  // Full lists and exact values of one position of a detail response.
  detail(row, offset) {
    const d = this.detailOf.get(row);
    if (d === undefined) return null;
    const at = this.a["detail/offset"][d] + offset;
    const list = (prefix) => {
      const from = this.a[`${prefix}/offset`][at], to = this.a[`${prefix}/offset`][at + 1];
      const tokens = this.a[`${prefix}/tokens`], logprobs = this.a[`${prefix}/logprobs`];
      const { logprob_units: units, missing_logprob: missing } = this.header.scales;
      const entries = [];
      for (let i = from; i < to; i++) {
        entries.push({ token: this.dictionary[tokens[i]], logprob: logprobs[i] === missing ? NaN : logprobs[i] / units });
      }
      return entries;
    };
    const exact = (m, name) => this.a[`detail/${m}/${name}`][at];
    return {
      m1: list("detail/m1"),
      m1Logprob: this.a["detail/m1/logprob"][at],
      models: this.models.map((_, m) => ({
        list: list(`detail/${m}`),
        kl: exact(m, "kl_floor"), klLower: exact(m, "kl_lower"), estimate: exact(m, "kl_estimate"), logratio: exact(m, "logratio"),
        entropy1: exact(m, "entropy1"), entropy2: exact(m, "entropy2"), logprob: exact(m, "logprob"),
      })),
    };
  }
}

// ---- overview -----------------------------------------------------------------------------

function usd(value) { return isMissing(value) ? "n/a" : "$" + value.toFixed(4); }

// Requests, tokens and USD as `klstream export` prints them (the costs view).
function costText(x, show) { return x.usage_recorded ? show(x) : "not recorded (scored before klstream recorded usage)"; }

function priceText(x, key) {
  if (!x.usage_recorded) return "not recorded";
  return isMissing(x.usd) ? "no price known: use --prices" : usd(x[key]);
}

function summaryTable(run) {
  const s = run.header.summaries;
  const rows = [
    ["Responses", (x) => count(x.responses)],
    ["Positions", (x) => count(x.positions)],
    ["Scored", (x) => count(x.scored)],
    ["Failed", (x) => count(x.failed)],
    ["Not scored yet", (x) => count(x.unscored)],
    ["Mean kl_estimate ± standard error (recommended)", (x) => `${num(x.mean_kl_estimate)} ± ${num(x.mean_kl_estimate_stderr)}`, "estimate"],
    ["Mean KL (kl_floor, the spec's) ± standard error", (x) => `${num(x.mean_kl)} ± ${num(x.mean_kl_stderr)}`],
    ["Maximum KL", (x) => num(x.max_kl)],
    ["99.9 % KL", (x) => num(x.p99_9_kl)],
    ["99 % KL", (x) => num(x.p99_kl)],
    ["95 % KL", (x) => num(x.p95_kl)],
    ["90 % KL", (x) => num(x.p90_kl)],
    ["Median KL", (x) => num(x.p50_kl)],
    ["10 % KL", (x) => num(x.p10_kl)],
    ["5 % KL", (x) => num(x.p05_kl)],
    ["1 % KL", (x) => num(x.p01_kl)],
    ["Minimum KL", (x) => num(x.min_kl)],
    ["Same top-1 token", (x) => `${percent(x.top1_agreement)} ± ${percent(x.top1_agreement_stderr)}`],
    ["Model 1 token outside Model 2's top-k", (x) => `${count(x.outside_topk)} (${percent(x.m1_token_outside_m2_topk_rate)})`],
    ["Mean KL lower bound ± s.e.", (x) => `${num(x.mean_kl_lower)} ± ${num(x.mean_kl_lower_stderr)}`],
    ["Mean log-ratio (MC KL) ± s.e.", (x) => `${num(x.mean_logratio)} ± ${num(x.mean_logratio_stderr)}`],
    ["Mean entropy, Model 1 / Model 2", (x) => `${num(x.mean_entropy1)} / ${num(x.mean_entropy2)}`],
    ["Requests to Model 2 (retries included)", (x) => costText(x, (c) => `${count(c.requests)} (${num(c.requests_per_position)} per position)`), "requests"],
    ["Input tokens, uncached", (x) => costText(x, (c) => count(c.uncached_input_tokens)), "uncached"],
    ["Input tokens, cached", (x) => costText(x, (c) => count(c.cached_input_tokens)), "cached"],
    ["Output tokens (thinking included)", (x) => costText(x, (c) => count(c.output_tokens)), "output"],
    ["Thinking tokens", (x) => costText(x, (c) => count(c.thoughts_tokens)), "thinking"],
    ["List price, online", (x) => priceText(x, "usd"), "usd"],
    ["List price, Batch Mode", (x) => priceText(x, "batch_usd"), "batch-usd"],
    ["Priced as", (x) => (x.priced_as ? `${x.priced_as}'s prices of ${x.price_date}` : "no price entry")],
    ["Logprobs left out (unusable entries)", (x) => `${count(x.dropped_logprobs)} at ${count(x.positions_with_dropped_logprobs)} positions`],
    ["Served by (positions)", (x) => (x.served_models || []).map((e) => `${e.model} (${count(e.positions)})`).join(", ") || "not said"],
  ];
  const model1 = [...new Set(s.flatMap((x) => x.model1 || []))].join(", ");
  return h("table", { id: "summary-table" },
    h("caption", { class: "caption" }, `Model 1: ${model1}. Failed and unscored positions are left out of every figure. Requests, tokens and prices are those klstream export prints (the costs view): a lookahead step answered inside another request is not a request of its own.`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Figure"),
      run.models.map((m) => h("th", { scope: "col", class: "num" }, m)))),
    h("tbody", {}, rows.map(([label, show, key]) => h("tr", { "data-figure": key },
      h("th", { scope: "row" }, label), s.map((x) => h("td", { class: "num" }, show(x)))))));
}

// What a reader must know before trusting any figure: a run scored in part, failed positions.
function banner(run) {
  const notes = [];
  run.header.summaries.forEach((x, m) => {
    const model = run.models[m];
    if (x.scored < x.positions) {
      notes.push(h("p", { class: "banner-line" },
        `${count(x.scored)} of ${count(x.positions)} positions scored for ${model}: figures are for the scored part only`
        + (x.failed ? ` (${count(x.failed)} failed, ${count(x.unscored)} not asked yet)` : "")
        + "; finish with ", h("code", { class: "command" }, x.resume),
        " (it asks for the missing and failed positions again, at the service the backend goes to by default or at $GOOGLE_GEMINI_BASE_URL / $OPENAI_BASE_URL: add --base-url if the run was scored elsewhere)."));
    }
  });
  return notes;
}

// Charts are drawn at the pixel size of their box (redrawn when it changes), so that their text
// stays at its CSS size (13 px) however wide the page is.
function chartFrame(width, height) {
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart" });
}

function chartWidth(id) { return Math.max(300, Math.floor(byId(id).clientWidth)); }

function niceMax(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= value) return step * magnitude;
  return 10 * magnitude;
}

function histogram(run, W) {
  const H = CHART_HEIGHT, L = 70, R = 16, T = 12, B = 46;
  const bins = run.header.histogram, counts = run.header.histogram_counts;
  const real = bins.flat().filter((b) => b !== null);
  const frame = chartFrame(W, H);
  if (!real.length) return frame;
  const lo = Math.floor(Math.min(...real) / 10) * 10, hi = Math.ceil((Math.max(...real) + 1) / 10) * 10;
  let top = 0;
  bins.forEach((list, m) => list.forEach((b, i) => { if (b !== null) top = Math.max(top, counts[m][i]); }));
  top = niceMax(top);
  const x = (bin) => L + ((bin - lo) / (hi - lo)) * (W - L - R);
  const y = (c) => T + (1 - c / top) * (H - T - B);
  frame.setAttribute("aria-label", `Histogram of per-token KL on a log scale from 1e${lo / 10} to 1e${hi / 10}`);
  for (let d = lo; d <= hi; d += 10) {
    frame.append(svg("line", { class: "grid", x1: x(d), x2: x(d), y1: T, y2: H - B }),
      svg("text", { x: x(d), y: H - B + 17, "text-anchor": "middle" }, `1e${d / 10}`));
  }
  for (const c of [0, top / 2, top]) {
    frame.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(c), y2: y(c) }),
      svg("text", { x: L - 6, y: y(c) + 4, "text-anchor": "end" }, count(c)));
  }
  frame.append(svg("text", { class: "axis-label", x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "KL per token (nats, log scale)"),
    svg("text", { class: "axis-label", x: 16, y: (T + H - B) / 2, transform: `rotate(-90 16 ${(T + H - B) / 2})`, "text-anchor": "middle" }, "positions (count)"));
  bins.forEach((list, m) => {
    let path = `M ${x(lo)} ${y(0)}`;
    const byBin = new Map(list.map((b, i) => [b, counts[m][i]]));
    for (let b = lo; b < hi; b++) {
      const c = byBin.get(b) || 0;
      path += ` L ${x(b)} ${y(c)} L ${x(b + 1)} ${y(c)}`;
      if (c) {
        frame.append(svg("rect", { x: x(b), y: y(c), width: x(b + 1) - x(b), height: y(0) - y(c), fill: "transparent" },
          svg("title", {}, `${run.models[m]}: ${count(c)} positions with KL in [1e${(b / 10).toFixed(1)}, 1e${((b + 1) / 10).toFixed(1)})`)));
      }
    }
    path += ` L ${x(hi)} ${y(0)}`;
    frame.append(svg("path", { d: path, fill: MODEL_COLOURS[m % 7], "fill-opacity": run.models.length > 1 ? 0.12 : 0.3,
      stroke: MODEL_COLOURS[m % 7], "stroke-width": 1.5, "stroke-dasharray": MODEL_DASHES[m % 7] }));
  });
  frame.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const zeros = bins.map((list, m) => list.includes(null) ? `${run.models[m]}: ${count(counts[m][list.indexOf(null)])}` : null).filter(Boolean);
  byId("histogram-note").textContent = zeros.length ? `Positions with KL exactly 0, not drawn: ${zeros.join(", ")}.` : "";
  return frame;
}

function byPosition(run, W) {
  const H = CHART_HEIGHT, L = 70, R = 16, T = 12, B = 46;
  const series = run.header.by_position;
  const frame = chartFrame(W, H);
  const starts = series.flatMap((s) => s.start);
  if (!starts.length) return frame;
  const width = series[0].width;
  const last = Math.max(...starts) + width;
  const top = niceMax(Math.max(...series.flatMap((s) => s.mean_kl.filter((v) => v !== null)), 0));
  const x = (p) => L + (p / last) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  frame.setAttribute("aria-label", `Mean KL by position in the response, positions 0 to ${last - 1}` + (width > 1 ? `, in groups of ${width}` : ""));
  const tick = niceMax(last / Math.max(2, Math.floor((W - L - R) / 90)));
  for (let p = 0; p <= last; p += tick) {
    frame.append(svg("line", { class: "grid", x1: x(p), x2: x(p), y1: T, y2: H - B }),
      svg("text", { x: x(p), y: H - B + 17, "text-anchor": "middle" }, count(p)));
  }
  for (const v of [0, top / 2, top]) {
    frame.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, num(v)));
  }
  frame.append(svg("text", { class: "axis-label", x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "position in the response (tokens from its start)"),
    svg("text", { class: "axis-label", x: 16, y: (T + H - B) / 2, transform: `rotate(-90 16 ${(T + H - B) / 2})`, "text-anchor": "middle" }, "mean KL (nats)"));
  series.forEach((s, m) => {
    const points = [];
    s.start.forEach((p, i) => { if (s.mean_kl[i] !== null) points.push(`${x(p + width / 2)},${y(s.mean_kl[i])}`); });
    frame.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: MODEL_COLOURS[m % 7],
      "stroke-width": 1.6, "stroke-dasharray": MODEL_DASHES[m % 7] }));
  });
  frame.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  return frame;
}

function chartLegend(run) {
  return run.models.map((m, i) => h("span", { class: "legend-item" },
    (() => {
      const sample = svg("svg", { width: 28, height: 10, "aria-hidden": "true" },
        svg("line", { x1: 0, x2: 28, y1: 5, y2: 5, stroke: MODEL_COLOURS[i % 7], "stroke-width": 2.5, "stroke-dasharray": MODEL_DASHES[i % 7] }));
      return sample;
    })(), " ", m));
}

// ---- the application ----------------------------------------------------------------------

class Report {
  constructor(run) {
    this.run = run;
    this.model = 0;
    this.sort = { key: "mean", direction: -1 };
    this.page = 0;
    this.order = new Uint32Array(0);
    this.row = -1;
    this.score = "kl";
    this.thresholds = { ...run.header.thresholds[0] };
    this.active = -1;
  }

  start() {
    const run = this.run;
    byId("summary").append(summaryTable(run));
    byId("banner").append(...banner(run));
    byId("estimate-meaning").textContent = ESTIMATE_MEANING;
    document.querySelector("#response-table th[data-sort=estimate] button").title = ESTIMATE_MEANING;
    this.drawCharts();
    for (const id of ["histogram-legend", "by-position-legend"]) byId(id).append(...chartLegend(run));
    let drawnAt = [chartWidth("histogram"), chartWidth("by-position")].join();
    new ResizeObserver(() => {
      const now = [chartWidth("histogram"), chartWidth("by-position")].join();
      if (now !== drawnAt) { drawnAt = now; this.drawCharts(); }
    }).observe(byId("overview"));
    byId("detail-count").textContent = run.header.detail_rows.length === run.responses
      ? "every response of this page"
      : `${count(run.header.detail_rows.length)} of ${count(run.responses)} responses: the highest by mean and by max KL, and any named with --detail; write a page with the lists of any other with the command shown above its heat map`;
    this.bindControls();
    this.refreshTable();
    this.drawTopTokens();
    const target = this.parseHash();
    // Opened on a link to a token (#response=ROW&pos=P): go there; else the most divergent response.
    if (target) this.open(target.row, target.position, true);
    else this.open(this.order.length ? this.order[0] : 0, -1, false);
    window.addEventListener("hashchange", () => {
      const next = this.parseHash();
      if (next) this.open(next.row, next.position, true);
    });
  }

  drawCharts() {
    byId("histogram").replaceChildren(histogram(this.run, chartWidth("histogram")));
    byId("by-position").replaceChildren(byPosition(this.run, chartWidth("by-position")));
  }

  parseHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const row = Number(params.get("response"));
    if (!params.has("response") || !Number.isInteger(row) || row < 0 || row >= this.run.responses) return null;
    const position = params.has("pos") ? Number(params.get("pos")) : -1;
    return { row, position: Number.isInteger(position) ? position : -1 };
  }

  bindControls() {
    byId("model-select").addEventListener("change", (event) => {
      this.model = Number(event.target.value);
      this.thresholds = { ...this.run.header.thresholds[this.model] };
      this.refreshTable();
      this.drawTopTokens();
      this.open(this.row, this.active, false);
    });
    byId("filter-text").addEventListener("input", () => { this.page = 0; this.refreshTable(); });
    byId("filter-kind").addEventListener("change", () => { this.page = 0; this.refreshTable(); });
    byId("page-prev").addEventListener("click", () => { this.page -= 1; this.drawTable(); });
    byId("page-next").addEventListener("click", () => { this.page += 1; this.drawTable(); });
    for (const th of document.querySelectorAll("#response-table th[data-sort]")) {
      th.querySelector("button").addEventListener("click", () => {
        const key = th.dataset.sort;
        const ascendingFirst = key === "response" || key === "prompt";
        this.sort = this.sort.key === key
          ? { key, direction: -this.sort.direction }
          : { key, direction: ascendingFirst ? 1 : -1 };
        this.page = 0;
        this.refreshTable();
      });
    }
    for (const radio of document.querySelectorAll("input[name=score]")) {
      radio.addEventListener("change", () => { this.score = radio.value; this.syncThreshold(); this.paint(); });
    }
    byId("threshold").addEventListener("input", (event) => {
      this.thresholds[this.score] = 10 ** Number(event.target.value);
      this.showThreshold();
      this.paint();
    });
    const tokens = byId("tokens");
    tokens.addEventListener("mouseover", (event) => {
      const span = event.target.closest(".tok");
      if (span) this.showToken(Number(span.dataset.pos));
    });
    tokens.addEventListener("focusin", (event) => {
      const span = event.target.closest(".tok");
      if (span) this.activate(Number(span.dataset.pos), false);
    });
    tokens.addEventListener("keydown", (event) => this.onKey(event));
  }

  // -- response table --

  sortValue(row) {
    const run = this.run, m = this.model;
    switch (this.sort.key) {
      case "mean": return run.stat(m, "mean_kl", row);
      case "max": return run.stat(m, "max_kl", row);
      case "total": return run.stat(m, "total_kl", row);
      case "normalized": return run.stat(m, "mean_normalized_kl", row);
      case "estimate": return run.stat(m, "mean_kl_estimate", row);
      case "length": return run.length(row);
      case "outside": return run.stat(m, "outside_topk", row);
      case "flags": return (run.stat(m, "failed", row) + run.stat(m, "unscored", row) > 0 ? 4 : 0)
        + (run.matchesText(row) ? 0 : 2) + (run.hasDetail(row) ? 1 : 0);
      default: return NaN;
    }
  }

  refreshTable() {
    const run = this.run, m = this.model;
    const text = byId("filter-text").value.trim().toLowerCase();
    const kind = byId("filter-kind").value;
    const keep = [];
    for (let row = 0; row < run.responses; row++) {
      if (kind === "detail" && !run.hasDetail(row)) continue;
      if (kind === "failures" && run.stat(m, "failed", row) + run.stat(m, "unscored", row) === 0) continue;
      if (kind === "hazard" && run.matchesText(row)) continue;
      if (kind === "outside" && run.stat(m, "outside_topk", row) === 0) continue;
      if (text && !run.label(row).toLowerCase().includes(text) && !run.prompt(row).toLowerCase().includes(text)) continue;
      keep.push(row);
    }
    const direction = this.sort.direction;
    if (this.sort.key === "response" || this.sort.key === "prompt") {
      const text = this.sort.key === "response" ? (r) => run.label(r) : (r) => run.prompt(r);
      const collator = new Intl.Collator("en", { numeric: true });
      keep.sort((a, b) => direction * collator.compare(text(a), text(b)) || a - b);
    } else {
      const values = new Float64Array(run.responses);
      for (const row of keep) values[row] = this.sortValue(row);
      keep.sort((a, b) => {
        const va = values[a], vb = values[b];
        if (Number.isNaN(va) !== Number.isNaN(vb)) return Number.isNaN(va) ? 1 : -1;
        return (va === vb || Number.isNaN(va) ? 0 : direction * (va < vb ? -1 : 1)) || a - b;
      });
    }
    this.order = Uint32Array.from(keep);
    for (const th of document.querySelectorAll("#response-table th[data-sort]")) {
      if (th.dataset.sort === this.sort.key) th.setAttribute("aria-sort", this.sort.direction > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    this.drawTable();
  }

  drawTable() {
    const run = this.run, m = this.model;
    const pages = Math.max(1, Math.ceil(this.order.length / PAGE_SIZE));
    this.page = Math.min(Math.max(this.page, 0), pages - 1);
    const first = this.page * PAGE_SIZE;
    const rows = this.order.subarray(first, first + PAGE_SIZE);
    const body = document.querySelector("#response-table tbody");
    body.replaceChildren(...Array.from(rows, (row, i) => {
      const failed = run.stat(m, "failed", row), unscored = run.stat(m, "unscored", row);
      const flags = [];
      if (failed + unscored) flags.push(h("span", { class: "flag flag-fail", title: `${failed} failed, ${unscored} not scored yet` }, "✗", h("span", { class: "visually-hidden" }, ` ${failed} failed, ${unscored} not scored`)));
      if (!run.matchesText(row)) flags.push(h("span", { class: "flag flag-hazard", title: "the tokens do not reproduce the response text" }, "⚠", h("span", { class: "visually-hidden" }, " re-tokenization hazard")));
      if (run.hasDetail(row)) flags.push(h("span", { class: "flag flag-detail", title: "full top-k detail in this page" }, "◆", h("span", { class: "visually-hidden" }, " top-k detail")));
      return h("tr", { "data-row": row, class: row === this.row ? "current" : null },
        h("td", { class: "num" }, first + i + 1),
        h("td", {}, h("a", { href: `#response=${row}` }, run.label(row))),
        h("td", { class: "prompt", title: run.prompt(row) }, run.prompt(row)),
        h("td", { class: "num estimate" }, num(run.stat(m, "mean_kl_estimate", row))),
        h("td", { class: "num mean" }, num(run.stat(m, "mean_kl", row))),
        h("td", { class: "num" }, num(run.stat(m, "max_kl", row))),
        h("td", { class: "num" }, num(run.stat(m, "total_kl", row))),
        h("td", { class: "num" }, num(run.stat(m, "mean_normalized_kl", row))),
        h("td", { class: "num" }, count(run.length(row))),
        h("td", { class: "num" }, count(run.stat(m, "outside_topk", row))),
        h("td", {}, flags));
    }));
    byId("table-count").textContent = `${count(this.order.length)} of ${count(run.responses)} responses`;
    byId("page-label").textContent = `page ${this.page + 1} of ${pages}`;
    byId("page-prev").disabled = this.page === 0;
    byId("page-next").disabled = this.page >= pages - 1;
  }

  // -- heat map --

  open(row, position, scroll) {
    const run = this.run;
    if (row < 0 || row >= run.responses) return;
    this.row = row;
    this.errors = run.errorsOf(row);
    for (const tr of document.querySelectorAll("#response-table tbody tr")) {
      tr.classList.toggle("current", Number(tr.dataset.row) === row);
    }
    this.drawHeatHead();
    const start = run.start(row), length = run.length(row);
    const fragment = document.createDocumentFragment();
    for (let p = 0; p < length; p++) {
      fragment.append(h("span", { class: "tok", "data-pos": p, tabindex: "-1" }, showWhitespace(run.token(start + p))));
    }
    const tokens = byId("tokens");
    tokens.replaceChildren(fragment);
    this.spans = tokens.children;
    this.active = -1;
    this.syncThreshold();
    this.paint();
    if (!length) {
      tokens.textContent = "This response has no tokens.";
      byId("token-detail").replaceChildren();
      return;
    }
    const target = position >= 0 && position < length ? position : this.firstHot();
    this.activate(target, false);
    if (scroll) {
      byId("heatmap").scrollIntoView({ block: "start" });
      this.spans[target].focus({ preventScroll: false });
    }
  }

  drawHeatHead() {
    const run = this.run, m = this.model, row = this.row;
    const failed = run.stat(m, "failed", row), unscored = run.stat(m, "unscored", row);
    const notes = [];
    if (!run.matchesText(row)) {
      notes.push(h("p", { class: "note" }, "⚠ Re-tokenization hazard: this response's tokens do not reproduce its text, so the prefills sent to Model 2 differ from what Model 1 produced."));
    }
    if (failed + unscored) notes.push(h("p", { class: "note" }, `✗ ${failed} positions failed and ${unscored} are not scored yet for ${run.models[m]}; they are hatched and left out of every figure.`));
    notes.push(run.hasDetail(row)
      ? h("p", { class: "caption" }, "◆ Full top-k lists and exact values are in this page for this response.")
      : h("p", { class: "note" }, "This page does not carry this response's top-k lists (values shown are quantized, ±5 %). Write a page that does with: ",
        h("code", { class: "command" }, run.command(row))));
    byId("heatmap-head").replaceChildren(
      h("h3", {}, `Response ${run.label(row)}`),
      h("details", {}, h("summary", {}, "Prompt"), h("p", { class: "context" }, run.prompt(row))),
      h("p", {}, `${count(run.length(row))} tokens · ${run.models[m]}: mean kl_estimate ${num(run.stat(m, "mean_kl_estimate", row))}, mean KL ${num(run.stat(m, "mean_kl", row))}, max ${num(run.stat(m, "max_kl", row))}, total ${num(run.stat(m, "total_kl", row))}, same top-1 token ${percent(run.stat(m, "top1_agreement", row), 1)}, Model 1's token outside Model 2's top-k ${count(run.stat(m, "outside_topk", row))} times`),
      ...notes);
  }

  syncThreshold() {
    const slider = byId("threshold");
    const value = this.thresholds[this.score] || (this.score === "logratio" ? 1 : 0.1);
    this.thresholds[this.score] = value;
    slider.min = this.score === "logratio" ? "-4" : "-8";
    slider.max = "2";
    slider.value = String(Math.log10(value));
    this.showThreshold();
  }

  showThreshold() {
    const value = this.thresholds[this.score];
    byId("threshold-value").textContent = (this.score === "logratio" ? "|log-ratio| ≥ " : `${SCORE_NAMES[this.score]} ≥ `) + num(value);
  }

  hot(position) {
    const value = this.run.value(this.model, this.score, position);
    if (isMissing(value)) return false;
    return (this.score === "logratio" ? Math.abs(value) : value) >= this.thresholds[this.score];
  }

  paint() {
    const run = this.run, m = this.model, start = run.start(this.row), length = run.length(this.row);
    const threshold = this.thresholds[this.score];
    let peak = threshold;
    for (let p = 0; p < length; p++) {
      const v = Math.abs(run.value(m, this.score, start + p));
      if (v > peak) peak = v;
    }
    const span = Math.log10(peak) - Math.log10(threshold);
    const missing = run.flags.error | run.flags.unscored;
    let hotCount = 0;
    for (let p = 0; p < length; p++) {
      const node = this.spans[p], at = start + p;
      const value = run.value(m, this.score, at), flag = run.flag(m, at);
      const isHot = this.hot(at);
      node.classList.toggle("hot", isHot);
      node.classList.toggle("nodata", (flag & missing) !== 0);
      node.classList.toggle("out", (flag & run.flags.outside_topk) !== 0);
      if (isHot) {
        hotCount++;
        const t = span > 0 ? 0.25 + 0.75 * (Math.log10(Math.abs(value)) - Math.log10(threshold)) / span : 1;
        const colour = mixColour(this.score === "logratio" ? (value > 0 ? MORE : LESS) : HEAT, t);
        node.style.background = colour.background;
        node.style.color = colour.text;
      } else {
        node.style.background = "";
        node.style.color = "";
      }
    }
    byId("hot-count").textContent = `${count(hotCount)} of ${count(length)} tokens highlighted`;
    this.drawHeatLegend(threshold, peak);
  }

  drawHeatLegend(threshold, peak) {
    const gradient = (stops, id) => svg("linearGradient", { id }, stops.map((c, i) => svg("stop", { offset: i / (stops.length - 1), "stop-color": c })));
    const bar = svg("svg", { width: 180, height: 14, "aria-hidden": "true" });
    if (this.score === "logratio") {
      bar.append(svg("defs", {}, gradient([...LESS].reverse(), "g-less"), gradient(MORE, "g-more")),
        svg("rect", { x: 0, y: 0, width: 90, height: 14, fill: "url(#g-less)" }),
        svg("rect", { x: 90, y: 0, width: 90, height: 14, fill: "url(#g-more)" }));
    } else {
      bar.append(svg("defs", {}, gradient(HEAT, "g-heat")), svg("rect", { x: 0, y: 0, width: 180, height: 14, fill: "url(#g-heat)" }));
    }
    const label = this.score === "logratio"
      ? `−${num(peak)} (Model 2 more sure) … ±${num(threshold)} … +${num(peak)} (Model 1 more sure), ≈ ±5 %`
      : `${num(threshold)} … ${num(peak)} (this response's maximum, ≈ ±5 %)`;
    byId("heat-legend").replaceChildren(bar, h("span", {}, label));
  }

  firstHot() {
    const start = this.run.start(this.row), length = this.run.length(this.row);
    let best = 0, bestValue = -Infinity;
    for (let p = 0; p < length; p++) {
      const v = this.run.value(this.model, "kl", start + p);
      if (v > bestValue) { bestValue = v; best = p; }
    }
    return best;
  }

  activate(position, focus) {
    if (this.active >= 0 && this.spans[this.active]) {
      this.spans[this.active].classList.remove("active");
      this.spans[this.active].setAttribute("tabindex", "-1");
    }
    this.active = position;
    const node = this.spans[position];
    node.classList.add("active");
    node.setAttribute("tabindex", "0");
    if (focus) node.focus();
    this.showToken(position);
  }

  onKey(event) {
    const length = this.run.length(this.row);
    if (!length) return;
    const start = this.run.start(this.row);
    let next = this.active;
    const seek = (step) => {
      for (let p = this.active + step; p >= 0 && p < length; p += step) if (this.hot(start + p)) return p;
      return this.active;
    };
    switch (event.key) {
      case "ArrowRight": next = Math.min(this.active + 1, length - 1); break;
      case "ArrowLeft": next = Math.max(this.active - 1, 0); break;
      case "ArrowDown": next = seek(1); break;
      case "ArrowUp": next = seek(-1); break;
      case "Home": next = 0; break;
      case "End": next = length - 1; break;
      default: return;
    }
    event.preventDefault();
    this.activate(next, true);
  }

  showToken(position) {
    const run = this.run, row = this.row, at = run.start(row) + position;
    const detail = run.detail(row, position);
    const exact = detail !== null;
    const token = run.token(at);
    const flags = [];
    const list = h("ul", { class: "flags-list" });
    run.models.forEach((model, m) => {
      const flag = run.flag(m, at);
      const error = this.errors.get(m * 1e9 + at);
      if (flag & run.flags.error) flags.push(h("li", { class: "bad" }, `${model}: the request failed: ${error || "no reason recorded"}`));
      if (flag & run.flags.unscored) flags.push(h("li", { class: "bad" }, `${model}: not scored yet (resume the run to ask for it)`));
      if (flag & run.flags.outside_topk) flags.push(h("li", {}, `${model}: Model 1's token is not in Model 2's top-k`));
      if (flag & run.flags.top1_differs) flags.push(h("li", {}, `${model}: the two models' most likely tokens differ`));
    });
    if (!run.matchesText(row)) flags.push(h("li", {}, "Re-tokenization hazard: this response's tokens do not reproduce its text"));
    list.append(...flags);

    const total = (m) => run.stat(m, "total_kl", row);
    const estimators = [
      ["KL (floor: the spec's)", (m) => approx(exact ? detail.models[m].kl : run.value(m, "kl", at), exact)],
      ["kl_estimate (recommended)", (m) => approx(exact ? detail.models[m].estimate : run.value(m, "estimate", at), exact)],
      ["KL/(H1+H2)", (m) => {
        if (!exact) return approx(run.value(m, "normalized", at), false);
        const d = detail.models[m], sum = d.entropy1 + d.entropy2;
        return sum > 0 ? num(d.kl / sum) : "n/a";
      }],
      ["share of the response's total KL", (m) => {
        const value = exact ? detail.models[m].kl : run.value(m, "kl", at);
        return total(m) > 0 && !isMissing(value) ? (exact ? "" : "≈ ") + percent(value / total(m)) : "n/a";
      }],
      ["certified lower bound", (m) => (exact ? num(detail.models[m].klLower) : "in detail pages")],
      ["log-ratio (log P − log Q of Model 1's token)", (m) => approx(exact ? detail.models[m].logratio : run.value(m, "logratio", at), exact)],
      ["entropy, Model 1 / Model 2", (m) => (exact ? `${num(detail.models[m].entropy1)} / ${num(detail.models[m].entropy2)}` : "in detail pages")],
    ];
    const table = h("table", { class: "estimators" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Estimator"), run.models.map((model) => h("th", { scope: "col", class: "num" }, model)))),
      h("tbody", {}, estimators.map(([label, show]) => h("tr", {},
        h("th", { scope: "row", title: label.startsWith("kl_estimate") ? ESTIMATE_MEANING : null }, label),
        run.models.map((_, m) => h("td", { class: "num" }, show(m)))))));

    const children = [
      h("h3", {}, `Token ${quotedToken(token)} at position ${position}`),
      h("p", { class: "caption" }, `Response ${run.label(row)}, token ${position + 1} of ${run.length(row)}`),
      table,
      flags.length ? list : null,
    ];
    if (exact) {
      // One table per list, side by side while they fit and wrapping below when not: every
      // Model 2's list stays whole whatever their number and the panel's width.
      const lists = [["Model 1", "m1", detail.m1], ...detail.models.map((d, m) => [run.models[m], `m2-${m}`, d.list])];
      const listTable = ([name, side, entries]) => h("table", { class: "topk", "data-list": side },
        h("caption", {}, entries.length ? name : `${name}: no result`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "#"), h("th", { scope: "col" }, "token"),
          h("th", { scope: "col", class: "num" }, "p"), h("th", { scope: "col", class: "num" }, "logprob"))),
        h("tbody", {}, entries.map((entry, i) => {
          const chosen = entry.token === token ? "chosen" : "";
          return h("tr", {}, h("td", { class: "num rank" }, i + 1),
            h("td", { class: `tk ${chosen}`, "data-list": side }, quotedToken(entry.token)),
            h("td", { class: `num p ${chosen}`, "data-list": side }, probability(entry.logprob)),
            h("td", { class: `num lp ${chosen}`, "data-list": side }, entry.logprob.toFixed(4)));
        })));
      children.push(
        h("p", { class: "caption" }, `Top-k lists, one per model; Model 1's token ${quotedToken(token)} (its logprob ${detail.m1Logprob.toFixed(4)}) is marked ◀ wherever it appears.`),
        h("div", { class: "topk-lists" }, lists.map(listTable)));
    } else {
      children.push(h("p", { class: "note" }, "Top-k lists are not in this page for this response: ", h("code", {}, run.command(row))));
    }
    byId("token-detail").replaceChildren(...children.filter((child) => child !== null));
  }

  // -- highest-KL tokens --

  drawTopTokens() {
    const run = this.run, m = this.model;
    const rows = run.header.top_tokens[m];
    byId("top-note").textContent = `The ${count(rows.length)} positions with the highest KL for ${run.models[m]}, with their context (the same query as klstream top).`;
    const body = document.querySelector("#top-table tbody");
    body.replaceChildren(...rows.map((r, i) => h("tr", {},
      h("td", { class: "num" }, i + 1),
      h("td", { class: "num" }, num(r.kl)),
      h("td", { class: "num" }, num(r.normalized_kl)),
      h("td", { class: "num" }, num(r.kl_estimate)),
      h("td", { class: "num" }, num(r.logratio)),
      h("td", { class: "context" }, showWhitespace(r.before), h("mark", {}, showWhitespace(r.token)), showWhitespace(r.after)),
      h("td", {}, r.row === null
        ? `${r.stem}:${r.response_index} position ${r.position} (not in this page)`
        : h("a", { href: `#response=${r.row}&pos=${r.position}` }, `${r.stem}:${r.response_index} position ${r.position}`)))));
  }
}

(async () => {
  const status = byId("load-status");
  try {
    const run = await loadPayload();
    status.textContent = "";
    status.hidden = true;
    byId("app").hidden = false;
    new Report(run).start();
    document.documentElement.dataset.readyMs = String(performance.now());
    document.documentElement.dataset.ready = "true";
  } catch (error) {
    status.textContent = "The report could not be drawn: " + error.message;
    status.className = "warning";
    throw error;
  }
})();
