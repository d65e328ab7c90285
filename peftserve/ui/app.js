// The peftserve page: adapters, rollouts over time, and admin controls.
//
// It reads the admin JSON API (GET ../admin/overview, GET ../admin/rollouts/{task}/timeline)
// every POLL_MS and steers rollouts with POST ../admin/rollouts/{task}/{action}. The admin
// token is kept in sessionStorage (this tab only) and sent as an Authorization header; it
// never appears in a URL. GET session says whether the caller passes the admin rule (the
// token, or loopback on a server without one) before anything else is asked. Every string
// from the server is written with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const TIMELINE_MS = 10000;
const TOKEN_KEY = "peftserve.adminToken";
const CONFIRM_MS = 4000;
const COLORS = {
  weight: "#1d4ed8", score: "#15803d", stable: "#475569", candidate: "#ea580c",
  estimate: "#7c3aed", band: "rgba(124,58,237,0.15)", margin: "#b91c1c", other: "#0891b2",
};

const page = {
  token: sessionStorage.getItem(TOKEN_KEY),
  session: null,
  overview: null,
  timelines: {},   // task -> the last timeline read
  charts: {},      // "task/name" -> uPlot
  cards: {},       // task -> card elements
  timer: null,
};
window.peftservePage = page;  // for people (and tests) poking at the page from the console

// ---- small helpers ----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "-";
}

function dateTime(t) {
  return t ? new Date(t * 1000).toLocaleString([], { hour12: false }) : "-";
}

function num(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(digits));
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function inSeconds(t, now) {
  const s = Math.max(0, Math.round(t - now));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function badge(value, prefix) {
  return h("span", { class: `badge ${prefix}-${value}`, text: value ?? "-" });
}

function notice(text) {
  $("notice").textContent = text || "";
}

// ---- the API ----------------------------------------------------------------------------------

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (page.token) headers.Authorization = `Bearer ${page.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `${response.status} ${response.statusText}`;
    throw new APIError(response.status, message);
  }
  return data;
}

// ---- session ----------------------------------------------------------------------------------

async function checkSession() {
  const session = await api("session");
  page.session = session;
  $("model").textContent = `${session.model} · peftserve ${session.version}`;
  $("signout").hidden = !(session.token_required && page.token);
  if (session.admin) {
    $("login-section").hidden = true;
    return true;
  }
  showSignedOut(session.message);
  if (session.token_required) $("login-section").hidden = false;
  return false;
}

function showSignedOut(message) {
  $("rollouts-section").hidden = true;
  $("adapters-section").hidden = true;
  $("live").textContent = "";
  notice(message);
}

function forgetToken() {
  page.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  page.token = input.value.trim();
  input.value = "";
  let admin = false;
  try {
    admin = await checkSession();
  } catch (e) {
    notice(`could not reach the server: ${e.message}`);
  }
  if (!admin) {
    forgetToken();
    $("signout").hidden = true;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, page.token);
  notice("");
  await refresh();
}

function signOut() {
  forgetToken();
  for (const task of Object.keys(page.cards)) dropCard(task);
  checkSession().catch((e) => notice(`could not reach the server: ${e.message}`));
}

// ---- polling ----------------------------------------------------------------------------------

async function refresh() {
  if (!page.session || !page.session.admin) return;
  try {
    const overview = await api("../admin/overview");
    page.overview = overview;
    renderHeader(overview);
    renderAdapters(overview);
    await renderRollouts(overview);
    $("live").textContent = `live · updated ${clock(overview.time)}`;
    if ($("notice").dataset.kind === "stale") { notice(""); delete $("notice").dataset.kind; }
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      forgetToken();
      await checkSession();
      notice(`signed out: ${e.message}`);
      return;
    }
    $("live").textContent = "not updating";
    notice(`the page could not refresh (${e.message}); it keeps trying every ${POLL_MS / 1000} s`);
    $("notice").dataset.kind = "stale";
  }
}

function schedule() {
  clearTimeout(page.timer);
  page.timer = setTimeout(async () => {
    if (!document.hidden) await refresh();
    schedule();
  }, POLL_MS);
}

// ---- header and adapters ----------------------------------------------------------------------

function renderHeader(o) {
  const e = o.engine || {};
  const parts = [`device ${e.device} (${e.dtype})`];
  if (e.gpu_slots_total !== undefined) parts.push(`adapter slots ${e.gpu_slots_used}/${e.gpu_slots_total} on ${e.device}`);
  if (e.cpu_cache_total !== undefined) parts.push(`CPU cache ${e.cpu_cache_used}/${e.cpu_cache_total}`);
  if (e.num_running !== undefined) parts.push(`running ${e.num_running}, waiting ${e.num_waiting}`);
  $("engine").textContent = parts.join(" · ");
}

function where(view, device) {
  if (view.tier === "slot") return `slot (${device})`;
  if (view.tier === "cpu_cache") return "CPU cache";
  return view.tier || view.status || "-";
}

function requestCells(r) {
  const out = r.by_outcome || {};
  const arms = Object.entries(r.by_arm || {}).map(([arm, n]) => `${arm} ${n}`).join(", ");
  return [
    h("td", { class: "num", title: arms ? `by arm: ${arms}` : null, text: String(r.total || 0) }),
    h("td", { text: `${out.client_error || 0} / ${out.server_error || 0}` }),
  ];
}

function renderAdapters(o) {
  $("adapters-section").hidden = false;
  const body = $("adapters").querySelector("tbody");
  const device = (o.engine || {}).device || "?";
  const rows = [];
  let lastTask = null;
  for (const v of o.adapters) {
    rows.push(h("tr", { class: v.task !== lastTask ? "task-first" : null, "data-adapter": `${v.task}@${v.version}` },
      h("td", { text: v.task !== lastTask ? v.task : "" }),
      h("td", { text: v.version }),
      h("td", { text: v.stable ? "stable" : "" }),
      h("td", { text: where(v, device) }),
      h("td", { text: String(v.rank ?? "-") }),
      h("td", { class: "num", text: bytes(v.size_bytes) }),
      ...requestCells(v.requests || {}),
      h("td", { class: "muted", title: v.sha256, text: (v.sha256 || "").slice(0, 12) }),
      h("td", { class: "muted", text: dateTime(v.created_at) }),
    ));
    lastTask = v.task;
  }
  rows.push(h("tr", { class: "task-first" },
    h("td", { text: o.model }), h("td", { text: "base" }), h("td", { class: "muted", text: "no adapter" }),
    h("td", { text: "-" }), h("td", { text: "-" }), h("td", { text: "" }),
    ...requestCells(o.base_requests || {}), h("td", { text: "" }), h("td", { text: "" }),
  ));
  body.replaceChildren(...rows);
}

// ---- rollouts ---------------------------------------------------------------------------------

async function renderRollouts(o) {
  $("rollouts-section").hidden = false;
  $("no-rollouts").hidden = o.rollouts.length > 0;
  const seen = new Set();
  for (const status of o.rollouts) {
    seen.add(status.task);
    const known = page.timelines[status.task];
    // A timeline is read again when the rollout changed (a judgment, a transition, a new
    // rollout) and, while it is active, at least every TIMELINE_MS (its weight runs to now).
    const judged = (s) => (s.last_judgment ? s.last_judgment.at : null);
    const stale = !known || known.rollout_id !== status.rollout_id || known.status.updated_at !== status.updated_at
      || known.status.state !== status.state || judged(known.status) !== judged(status)
      || (status.active && o.time - known.time > TIMELINE_MS / 1000);
    if (stale) {
      page.timelines[status.task] = await api(`../admin/rollouts/${encodeURIComponent(status.task)}/timeline`);
    }
    renderRollout(page.timelines[status.task], o.time);
  }
  for (const task of Object.keys(page.cards)) if (!seen.has(task)) dropCard(task);
}

function dropCard(task) {
  const card = page.cards[task];
  if (!card) return;
  for (const key of Object.keys(page.charts)) {
    if (key.startsWith(`${task}/`)) { page.charts[key].destroy(); delete page.charts[key]; }
  }
  card.root.remove();
  delete page.cards[task];
  delete page.timelines[task];
}

function card(task) {
  if (page.cards[task]) return page.cards[task];
  const c = {
    head: h("div", { class: "rollout-head" }),
    summary: h("p", { class: "muted" }),
    next: h("p", { class: "next" }),
    controls: h("div", { class: "controls" }),
    charts: h("div", { class: "charts" }),
    judgment: h("div", {}),
    events: h("div", {}),
  };
  c.root = h("article", { class: "rollout", "data-task": task },
    c.head, c.summary, c.next, c.controls,
    h("h4", { text: "Over time" }), c.charts,
    h("h4", { text: "Latest judgment" }), c.judgment,
    h("h4", { text: "Audit history (latest events, newest first)" }), c.events);
  c.reason = h("input", { type: "text", placeholder: "reason (recorded in the audit history)", "aria-label": "reason" });
  c.message = h("span", { class: "message muted", role: "status" });
  c.buttons = {};
  for (const action of ["pause", "resume", "promote", "rollback", "retry"]) {
    const danger = action === "promote" || action === "rollback";
    c.buttons[action] = h("button", {
      type: "button", "data-action": action, class: danger ? "danger" : null,
      onclick: () => steer(task, action, c),
      text: action,
    });
  }
  c.controls.append(c.reason, ...Object.values(c.buttons), c.message);
  $("rollouts").append(c.root);
  page.cards[task] = c;
  return c;
}

const ALLOWED = {
  shadow: ["pause", "rollback"],
  ramping: ["pause", "promote", "rollback"],
  paused: ["resume", "promote", "rollback"],
  rolled_back: ["retry"],
  promoted: [],
};

async function steer(task, action, c) {
  const button = c.buttons[action];
  if ((action === "promote" || action === "rollback") && !button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = `confirm ${action}`;
    setTimeout(() => { button.classList.remove("confirm"); button.textContent = action; }, CONFIRM_MS);
    return;
  }
  button.classList.remove("confirm");
  button.textContent = action;
  const reason = c.reason.value.trim();
  for (const b of Object.values(c.buttons)) b.disabled = true;
  try {
    const status = await api(`../admin/rollouts/${encodeURIComponent(task)}/${action}`, {
      method: "POST", body: reason ? { reason } : {},
    });
    c.reason.value = "";
    c.message.className = "message muted";
    c.message.textContent = `${action}: done, now ${status.state} at ${num(status.weight)} %`;
  } catch (e) {
    c.message.className = "message error";
    c.message.textContent = `${action} refused: ${e.message}`;
    if (e.status === 401 || e.status === 403) { forgetToken(); await checkSession(); return; }
  }
  await refresh();
}

function renderRollout(tl, now) {
  const s = tl.status;
  const c = card(s.task);
  c.root.dataset.state = s.state;
  c.root.dataset.weight = s.weight;
  c.head.replaceChildren(
    h("h3", { text: `${s.task}: ${s.stable} → ${s.candidate}` }),
    badge(s.state, "s"),
    h("span", { class: "weight-value", "data-weight": s.weight, text: `${num(s.weight)} %` }),
    h("span", { class: "muted", text: `${s.step} · steps ${s.steps.map((x) => `${num(x)} %`).join(", ")} · rollout #${s.rollout_id}` }),
  );
  c.summary.textContent = s.summary;
  c.next.textContent = nextDecision(tl, now);
  const allowed = ALLOWED[s.state] || [];
  for (const [action, button] of Object.entries(c.buttons)) {
    button.hidden = !allowed.includes(action);
    button.disabled = false;
  }
  c.reason.hidden = allowed.length === 0;
  renderCharts(tl, c);
  renderJudgment(tl, c);
  renderEvents(tl, c);
}

function nextDecision(tl, now) {
  const s = tl.status;
  if (s.state === "paused") return "Paused: the controller waits for a person (resume, promote or roll back).";
  if (!s.active) {
    const last = s.last_decision;
    return `Finished: ${s.state} at ${dateTime(s.updated_at)}${last ? ` (${last.reason})` : ""}.`;
  }
  const parts = [];
  if (tl.next_judgment_at) parts.push(`next judgment in about ${inSeconds(tl.next_judgment_at, now)} (every ${num(tl.interval_s)} s)`);
  if (tl.step_due_at && tl.step_due_at > now) {
    parts.push(`the step's interval ends in ${inSeconds(tl.step_due_at, now)}: the first judgment that passes after it `
      + (s.state === "shadow" ? "starts the first step" : (s.step_index === s.steps.length - 1 ? "promotes" : "advances")));
  } else if (tl.step_due_at) {
    parts.push("the step's interval has elapsed: the next judgment that passes "
      + (s.state === "shadow" ? "starts the first step" : (s.step_index === s.steps.length - 1 ? "promotes" : "advances")));
  }
  return parts.length ? `Next decision: ${parts.join("; ")}.` : "";
}

// ---- charts -----------------------------------------------------------------------------------

function join(xs, columns) {
  // Align columns given as {t: [...], values: [...]} on the sorted union of their times.
  const times = [...new Set([...xs, ...columns.flatMap((c) => c.t)])].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  return [times, ...columns.map((c) => {
    const out = new Array(times.length).fill(null);
    c.t.forEach((t, i) => { out[index.get(t)] = c.values[i] ?? null; });
    return out;
  })];
}

function hasData(data) {
  return data.slice(1).some((col) => col.some((v) => v !== null && v !== undefined));
}

function chartWidth(el) {
  return Math.max(320, Math.floor(el.getBoundingClientRect().width || 420));
}

function chartBox(c, key, title, wide = false) {
  let box = c.charts.querySelector(`[data-chart="${CSS.escape(key)}"]`);
  if (!box) {
    box = h("div", { class: wide ? "chart wide" : "chart", "data-chart": key },
      h("div", { class: "chart-title" }), h("div", { class: "plot" }));
    c.charts.append(box);
  }
  box.querySelector(".chart-title").textContent = title;
  return box;
}

function dropChart(c, key) {
  const id = `${c.root.dataset.task}/${key}`;
  if (page.charts[id]) { page.charts[id].destroy(); delete page.charts[id]; }
}

function placeholder(c, key, title, text) {
  // A chart's place while its metric has no numbers to draw yet.
  dropChart(c, key);
  const box = chartBox(c, key, title);
  box.querySelector(".plot").replaceChildren(h("p", { class: "muted", text }));
  box.dataset.points = "0";
  return box;
}

function drawChart(c, key, title, series, data, extra = {}) {
  // One uPlot per (task, key): new data goes through setData; a new set of series rebuilds it.
  const id = `${c.root.dataset.task}/${key}`;
  if (!hasData(data)) return placeholder(c, key, title, "no data yet");
  const box = chartBox(c, key, title, extra.wide);
  const plot = box.querySelector(".plot");
  const signature = series.map((s) => s.label).join("|");
  let chart = page.charts[id];
  if (chart && chart.peftserveSignature !== signature) { chart.destroy(); chart = null; }
  if (!chart) {
    plot.replaceChildren();
    const opts = {
      width: chartWidth(box), height: extra.wide ? 220 : 200,
      // Every chart of a rollout spans the same time: from its start to now (or its end).
      scales: { x: { time: true, range: (u, lo, hi) => span(c, lo, hi) }, ...(extra.scales || {}) },
      series: [{}, ...series],
      axes: [{}, { size: 60, ...(extra.yAxis || {}) }],
      bands: extra.bands || [],
      legend: { live: true },
    };
    chart = new uPlot(opts, data, plot);
    chart.peftserveSignature = signature;
    page.charts[id] = chart;
  } else {
    chart.setData(data);
  }
  box.dataset.points = String(data[0].length);
  return box;
}

const points = () => null;  // a series drawn as points only

function span(c, lo, hi) {
  const [start, end] = c.xRange || [lo, hi];
  const from = Math.min(lo ?? start, start);
  const to = Math.max(hi ?? end, end);
  return to > from ? [from, to] : [from - 1, from + 1];
}

function renderCharts(tl, c) {
  const s = tl.status;
  c.xRange = [s.started_at, s.active ? tl.time : s.updated_at];
  const w = tl.weight;
  const sc = tl.score;
  const judged = sc.t;
  const data = join(w.t, [{ t: w.t, values: w.weight }, { t: sc.t, values: sc.score }]);
  const box = drawChart(c, "weight", "Candidate weight (%) and progress toward the next decision (%)", [
    { label: "weight %", stroke: COLORS.weight, width: 2, fill: "rgba(29,78,216,0.08)", paths: uPlot.paths.stepped({ align: 1 }), spanGaps: true, points: { show: false } },
    { label: "progress %", stroke: COLORS.score, paths: points, points: { show: true, size: 7, fill: COLORS.score } },
  ], data, { scales: { y: { range: [0, 100] } }, wide: true });
  // What the browser test reads: the judgments drawn and the time of the latest one.
  box.dataset.judgments = String(judged.length);
  box.dataset.lastJudgment = judged.length ? String(judged[judged.length - 1]) : "";
  const names = Object.keys(tl.metrics);
  for (const name of names) renderMetric(c, name, tl.metrics[name]);
  for (const el of c.charts.querySelectorAll("[data-chart]")) {
    const key = el.dataset.chart;
    if (key !== "weight" && !names.some((n) => key === `${n}:arms` || key === `${n}:diff`)) {
      dropChart(c, key);
      el.remove();
    }
  }
}

const ARM_KEY = /(^|_)(stable|candidate)(_|$)/;

function renderMetric(c, name, m) {
  const latest = m.classification[m.classification.length - 1];
  const label = `${name}${m.critical ? " (critical)" : ""}: ${latest || "-"}`;
  // Per arm: every number the judge records for one arm (counts of samples aside).
  const armKeys = Object.keys(m.series).filter((k) => ARM_KEY.test(k) && !k.startsWith("n_"));
  const armBands = Object.keys(m.bands).filter((k) => ARM_KEY.test(k));
  const armSeries = [];
  const armCols = [];
  const armBandDefs = [];
  for (const key of armKeys) {
    const color = key.includes("candidate") ? COLORS.candidate : COLORS.stable;
    armSeries.push({ label: key, stroke: color, width: 2, points: { show: true, size: 4 }, spanGaps: true });
    armCols.push({ t: m.t, values: m.series[key] });
  }
  for (const key of armBands) {
    const color = key.includes("candidate") ? COLORS.candidate : COLORS.stable;
    const at = armSeries.length + 1;
    armSeries.push({ label: `${key} high`, stroke: color, width: 1, dash: [2, 3], points: { show: false } });
    armSeries.push({ label: `${key} low`, stroke: color, width: 1, dash: [2, 3], points: { show: false } });
    armCols.push({ t: m.t, values: m.bands[key].hi }, { t: m.t, values: m.bands[key].lo });
    armBandDefs.push({ series: [at, at + 1], fill: `${color}22` });
  }
  if (armSeries.length) {
    drawChart(c, `${name}:arms`, `${label} · per arm`, armSeries, join(m.t, armCols), { bands: armBandDefs });
  } else {
    const counts = Object.keys(m.series).filter((k) => k.startsWith("n_"))
      .map((k) => `${k.slice(2)} ${num(m.series[k][m.series[k].length - 1])}`).join(", ");
    placeholder(c, `${name}:arms`, `${label} · per arm`, `no verdict yet${counts ? ` (samples: ${counts})` : ""}`);
  }
  // The comparison: candidate - stable with its interval, against the judge's margin.
  const diffSeries = [];
  const diffCols = [];
  const diffBands = [];
  for (const key of Object.keys(m.bands).filter((k) => !ARM_KEY.test(k))) {
    const at = diffSeries.length + 1;
    diffSeries.push({ label: `${key} high`, stroke: COLORS.estimate, width: 1, points: { show: false } });
    diffSeries.push({ label: `${key} low`, stroke: COLORS.estimate, width: 1, points: { show: false } });
    diffCols.push({ t: m.t, values: m.bands[key].hi }, { t: m.t, values: m.bands[key].lo });
    diffBands.push({ series: [at, at + 1], fill: COLORS.band });
  }
  if (m.series.estimate) {
    diffSeries.push({ label: "estimate", stroke: COLORS.estimate, width: 2, points: { show: true, size: 5 } });
    diffCols.push({ t: m.t, values: m.series.estimate });
  }
  if (m.series.margin) {
    diffSeries.push({ label: "margin (harmful beyond)", stroke: COLORS.margin, width: 2, dash: [6, 4], points: { show: false }, spanGaps: true });
    diffCols.push({ t: m.t, values: m.series.margin });
  }
  const direction = m.direction ? `, harmful ${m.direction}` : "";
  const diffTitle = `${name}: candidate − stable with its interval vs the margin${direction}`;
  if (diffSeries.length) drawChart(c, `${name}:diff`, diffTitle, diffSeries, join(m.t, diffCols), { bands: diffBands });
  else placeholder(c, `${name}:diff`, diffTitle, "no comparison yet");
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(page.charts)) {
    const box = chart.root.closest("[data-chart]");
    if (box) chart.setSize({ width: chartWidth(box), height: box.classList.contains("wide") ? 220 : 200 });
    else delete page.charts[id];
  }
});

// ---- judgments and events ---------------------------------------------------------------------

const KNOWN = new Set(["name", "classification", "status", "test", "critical", "required", "detail", "kind", "direction", "weight"]);

function renderJudgment(tl, c) {
  const j = tl.events.find((e) => e.kind === "judgment");
  if (!j) {
    c.judgment.replaceChildren(h("p", { class: "muted", text: "No judgment yet." }));
    return;
  }
  const p = j.payload || {};
  const metrics = Array.isArray(p.metrics) ? p.metrics
    : Object.entries(p.metrics || {}).map(([name, m]) => ({ name, ...m }));
  const rows = metrics.map((m) => {
    const numbers = Object.entries(m).filter(([k, v]) => !KNOWN.has(k) && v !== null && v !== undefined)
      .map(([k, v]) => `${k} ${Array.isArray(v) ? `[${v.map((x) => num(x)).join(", ")}]` : num(v)}`);
    return h("tr", {},
      h("td", { text: `${m.name}${m.critical ? " (critical)" : ""}` }),
      h("td", {}, badge(m.classification || m.status || m.verdict, "c")),
      h("td", { class: "muted", text: numbers.join(" · ") }),
      h("td", { text: m.detail || "" }));
  });
  c.judgment.replaceChildren(
    h("p", {}, `${clock(j.at)} `, badge(p.result, "r"), p.progress != null ? ` progress ${num(100 * p.progress)} %: ` : ` score ${num(p.score)}: `, p.reason || ""),
    h("table", {}, h("thead", {}, h("tr", {}, ...["metric", "verdict", "numbers", "detail"].map((t) => h("th", { text: t })))),
      h("tbody", {}, ...rows)),
  );
}

function what(e) {
  if (e.kind === "state") return [`${e.state_from || "-"} → ${e.state_to}`, e.weight !== undefined ? ` (${num(e.weight)} %)` : ""];
  if (e.kind === "decision") return [badge(e.action, "a"), e.result ? ` on ${e.result}` : ""];
  if (e.kind === "judgment") return [badge(e.result, "r"), e.score !== null && e.score !== undefined ? ` score ${num(e.score)}` : ""];
  return [e.kind];
}

function grouped(events) {
  // Newest first. Judgments are left out (each decision carries its judgment's result and
  // reason) and a run of decisions with the same action and result shows as one row, x N.
  const out = [];
  for (const e of events) {
    if (e.kind === "judgment") continue;
    const last = out[out.length - 1];
    if (last && e.kind === "decision" && last.event.kind === "decision" && last.event.action === e.action
        && last.event.result === e.result) {
      last.count += 1;
      last.since = e.at;
    } else {
      out.push({ event: e, count: 1, since: e.at });
    }
  }
  return out;
}

function renderEvents(tl, c) {
  // Records a person opened, and the choice of view, stay across refreshes.
  const open = new Set([...c.events.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.id));
  if (!c.everyEvent) {
    c.everyEvent = h("input", { type: "checkbox", onchange: () => renderEvents(page.timelines[c.root.dataset.task], c) });
    c.eventsView = h("label", { class: "muted" }, c.everyEvent, " every event (judgments and each hold)");
  }
  const items = c.everyEvent.checked ? tl.events.map((e) => ({ event: e, count: 1, since: e.at })) : grouped(tl.events);
  const rows = items.map(({ event: e, count, since }) => h("tr", { "data-kind": e.kind, "data-id": e.id },
    h("td", { text: count > 1 ? `${clock(since)} – ${clock(e.at)}` : clock(e.at), title: e.time || "" }),
    h("td", { text: e.kind }),
    h("td", { text: e.actor || "" }),
    h("td", {}, ...what(e), count > 1 ? ` ×${count}` : ""),
    h("td", {}, e.reason || "", h("details", { open: open.has(String(e.id)) },
      h("summary", { text: count > 1 ? "latest record" : "record" }),
      h("pre", { text: JSON.stringify(e.payload, null, 2) }))),
  ));
  c.events.replaceChildren(c.eventsView, h("table", { class: "events" },
    h("thead", {}, h("tr", {}, ...["time", "kind", "actor", "what", "reason"].map((t) => h("th", { text: t })))),
    h("tbody", {}, ...rows)));
}

// ---- start ------------------------------------------------------------------------------------

async function start() {
  $("login").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  try {
    if (await checkSession()) await refresh();
  } catch (e) {
    notice(`could not reach the server: ${e.message}`);
  }
  schedule();
}

start();
