// The live dashboard: polls /api/metrics every second and redraws tiles, charts and tables.
"use strict";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const pct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%");
const secs = (ms) => (ms === null || ms === undefined ? "-" : (ms / 1000).toFixed(1));
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

function makeChart(el, series) {
  const opts = {
    width: Math.max(420, el.clientWidth || 440), height: 200,
    series: [{}].concat(series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: true, points: { show: true, size: 4 } }))),
    axes: [{}, {}], scales: { x: { time: true } },
  };
  return new uPlot(opts, [[]].concat(series.map(() => [])), el);
}

const charts = {
  volume: makeChart($("c-volume"), [["calls", "#1f77b4"], ["started", "#2ca02c"], ["ended", "#9467bd"], ["chats", "#8c564b"]]),
  outcomes: makeChart($("c-outcomes"), [["connected", "#2ca02c"], ["not connected", "#d62728"], ["successful", "#17becf"], ["unsuccessful", "#ff7f0e"]]),
  failure: makeChart($("c-failure"), [["failure rate %", "#d62728"]]),
  duration: makeChart($("c-duration"), [["p50", "#1f77b4"], ["p95", "#ff7f0e"]]),
};

function scopeOf(w, scope) { return scope === "*" ? w.overall : (w.agents[scope] || null); }

const SENTIMENT_COLOURS = { Positive: "#2ca02c", Neutral: "#9e9e9e", Negative: "#d62728", Unknown: "#c7c7c7" };
const OTHER_COLOURS = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b"];

// The sentiment counts as a stacked bar over a one-line legend, the height of a number tile.
function sentimentTile(counts) {
  const entries = Object.entries(counts).sort((a, b) => b[1] - a[1]);
  const total = entries.reduce((n, [, v]) => n + v, 0);
  const colour = (k, i) => SENTIMENT_COLOURS[k] || OTHER_COLOURS[i % OTHER_COLOURS.length];
  const bar = entries.map(([k, v], i) =>
    `<span style="flex:${v};background:${colour(k, i)}" title="${esc(k)} ${v}"></span>`).join("");
  const legend = entries.map(([k, v], i) =>
    `<span class="item"><i style="background:${colour(k, i)}"></i>${esc(k)} ${v}</span>`).join("");
  return `<div class="tile wide" data-metric="sentiment"><div class="v">` +
    (total ? `<div class="bar">${bar}</div><div class="legend">${legend}</div>` : "-") +
    `</div><div class="k">sentiment</div></div>`;
}

function tiles(s) {
  const items = [
    ["calls", s.calls], ["active now", s.active_calls], ["started", s.calls_started], ["ended", s.calls_ended],
    ["analyzed", s.calls_analyzed], ["connected", s.connected], ["not connected", s.not_connected],
    ["failure rate", pct(s.failure_rate)], ["success rate", pct(s.success_rate)],
    ["duration p50 s", secs(s.duration_p50_ms)], ["duration p95 s", secs(s.duration_p95_ms)],
    ["e2e latency p50 ms", s.e2e_latency_p50_ms ?? "-"], ["total cost", s.cost_total.toFixed(2)],
    ["transfers started", s.transfers_started], ["bridged", s.transfers_bridged], ["cancelled", s.transfers_cancelled],
    ["chats started", s.chats_started], ["chats ended", s.chats_ended], ["chats successful", s.chats_successful],
  ];
  $("tiles").innerHTML = items.map(([k, v]) =>
    `<div class="tile" data-metric="${esc(k)}"><div class="v">${esc(v)}</div><div class="k">${esc(k)}</div></div>`).join("") +
    sentimentTile(s.sentiment);
}

// One point per minute of the last hour, so that quiet minutes show as zero, not as a gap.
function series(windows, scope, pick, now) {
  const byStart = new Map(windows.map((w) => [w.start, w]));
  const last = now - (now % 60000);
  const xs = [], cols = [];
  for (let t = last - 59 * 60000; t <= last; t += 60000) {
    const w = byStart.get(t);
    const s = w ? scopeOf(w, scope) : null;
    xs.push(t / 1000);
    const vals = pick(s);
    vals.forEach((v, i) => { (cols[i] = cols[i] || []).push(v); });
  }
  return [xs].concat(cols.length ? cols : []);
}

function draw(data) {
  const scope = $("scope").value;
  const sel = $("scope");
  for (const a of Object.keys(data.agents)) {
    if (![...sel.options].some((o) => o.value === a)) sel.add(new Option(a, a));
  }
  const total = scope === "*" ? data.overall : data.agents[scope];
  if (total) tiles(total);
  const W = data.windows, now = data.generated_at;
  const z = (f) => (s) => (s ? f(s) : f(null));
  charts.volume.setData(series(W, scope, z((s) => s ? [s.calls, s.calls_started, s.calls_ended, s.chats_started] : [0, 0, 0, 0]), now));
  charts.outcomes.setData(series(W, scope, z((s) => s ? [s.connected, s.not_connected, s.calls_successful, s.calls_unsuccessful] : [0, 0, 0, 0]), now));
  charts.failure.setData(series(W, scope, z((s) => [s && s.failure_rate !== null ? 100 * s.failure_rate : null]), now));
  charts.duration.setData(series(W, scope, z((s) => s ? [s.duration_p50_ms && s.duration_p50_ms / 1000, s.duration_p95_ms && s.duration_p95_ms / 1000] : [null, null]), now));
  $("agents").tBodies[0].innerHTML = Object.entries(data.agents).map(([a, s]) =>
    `<tr><td>${esc(a)}</td><td>${s.calls}</td><td>${s.active_calls}</td><td>${s.connected}</td><td>${s.not_connected}</td>` +
    `<td>${pct(s.failure_rate)}</td><td>${pct(s.success_rate)}</td><td>${secs(s.duration_p50_ms)}</td>` +
    `<td>${secs(s.duration_p95_ms)}</td><td>${s.cost_total.toFixed(2)}</td></tr>`).join("");
  $("alerts").tBodies[0].innerHTML = data.alerts.filter((a) => scope === "*" || a.agent_id === scope).map((a) =>
    `<tr><td>${new Date(a.at).toLocaleTimeString()}</td><td class="rule">${esc(a.rule)}</td><td>${esc(a.agent_id)}</td>` +
    `<td>${esc(a.text)}</td></tr>`).join("");
  $("status").textContent = `updated ${new Date(data.generated_at).toLocaleTimeString()} - ` +
    `${data.partitions.length} partitions from ${data.workers.length} worker(s)${data.complete ? "" : " (incomplete)"}`;
}

async function poll() {
  try {
    const r = await fetch("/api/metrics?minutes=60", { cache: "no-store" });
    if (r.status === 401) return location.assign("/login"); // logged out, or its token was rotated out
    if (r.ok) draw(await r.json());
    else $("status").textContent = "worker answered " + r.status;
  } catch (e) {
    $("status").textContent = "worker unreachable: " + e;
  }
  setTimeout(poll, POLL_MS);
}
$("scope").addEventListener("change", poll);
poll();
