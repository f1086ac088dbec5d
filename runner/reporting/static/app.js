// The sweep dashboard: polls the JSON API and redraws in place (no reload, no network
// beyond this server). Every value from the API is inserted as text, never as HTML.
"use strict";

const STATES = ["pending", "running", "succeeded", "failed", "cancelled"];
const COLORS = { gpt2: "#1f77b4", lowrank_gpt2: "#ff7f0e" };
let refreshMs = 3000;
let selected = null;        // the job whose detail is open
let lastResults = null;     // the /api/results text last drawn
let figureVersion = 0;
let status = null, latest = null;

// --- small helpers --------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
  return node;
}
const $ = (id) => document.getElementById(id);
const pct = (x, d = 1) => (x === null || x === undefined ? "–" : (100 * x).toFixed(d));
const num = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

function duration(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor(s % 86400 / 3600)).padStart(2, "0")}h`;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const err = new Error((body && body.error) || `${url}: HTTP ${response.status}`);
    err.status = response.status;
    throw err;
  }
  return body;
}

function banner(message) {
  const b = $("banner");
  b.hidden = !message;
  b.textContent = message ? `${message} — still retrying every ${refreshMs / 1000}s` : "";
}

// --- progress ---------------------------------------------------------------------------

function drawProgress(doc) {
  const counts = $("counts");
  counts.replaceChildren();
  const total = Object.values(doc.counts).reduce((a, b) => a + b, 0);
  counts.append(el("span", { class: "chip", style: "background:#24292f" }, `${total} jobs`));
  for (const [state, n] of Object.entries(doc.counts)) {
    counts.append(el("span", { class: `chip state-${state}`, "data-state": state },
      `${state} ${n}`));
  }
  const p = doc.progress;
  const frac = p.steps_total ? p.steps_done / p.steps_total : 0;
  $("sweepbar-fill").style.width = `${(100 * frac).toFixed(2)}%`;
  $("sweepbar-text").textContent =
    `${p.steps_done} / ${p.steps_total} steps (${(100 * frac).toFixed(1)}%)`;
  // status's own words (runner.progress.eta_line): "nothing left to run but N job(s)
  // failed", never "finished", while failures wait.
  $("eta").textContent = p.summary;
}

// --- the jobs table ---------------------------------------------------------------------

function fillSelect(select, values) {
  const keep = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"));
  for (const v of values) select.append(el("option", { value: String(v) }, String(v)));
  select.value = values.map(String).includes(keep) ? keep : "";
}

function drawFilters(jobs) {
  const uniq = (key) => [...new Set(jobs.map((j) => j[key]))];
  fillSelect($("f-v"), uniq("v").sort((a, b) => a - b));
  fillSelect($("f-n"), uniq("n").sort((a, b) => a - b));
  fillSelect($("f-model"), uniq("model"));
  const states = uniq("state");
  fillSelect($("f-state"), STATES.filter((s) => states.includes(s)).concat(
    states.filter((s) => !STATES.includes(s))));
}

function visible(job) {
  for (const id of ["f-v", "f-n", "f-model", "f-state"]) {
    const select = $(id);
    if (select.value && String(job[select.dataset.key]) !== select.value) return false;
  }
  const text = $("f-text").value.trim();
  return !text || job.name.includes(text);
}

function stateCell(job, extra) {
  const stale = extra && extra.stale;
  const label = stale ? "running (stale)" : job.state;
  return el("td", {}, el("span", {
    class: `state state-${stale ? "stale" : job.state}`, "data-state": job.state,
    title: stale ? "no heartbeat for longer than the lease: its worker may be gone" : "",
  }, label));
}

function progressCell(job) {
  const frac = job.total_steps ? Math.min(1, job.step / job.total_steps) : 0;
  const kind = job.state === "succeeded" ? "done" : job.state === "failed" ? "failed" : "";
  const bar = el("span", { class: `bar ${kind}` }, el("span", { style: `width:${(100 * frac).toFixed(1)}%` }));
  return el("td", {}, bar, `${job.step}/${job.total_steps}`);
}

// A worker's name, with its SLURM task (and GPUs) when it runs in one.
function workerCell(name) {
  const w = name && status.workers.find((x) => x.name === name);
  if (!w || !w.slurm_array) return el("td", { class: "wrap" }, name || "–");
  return el("td", { class: "wrap", title: `SLURM job ${w.slurm_job_id}, restart ${w.slurm_restarts}` },
    `${name} (SLURM ${w.slurm_array}${w.gpus ? `, GPU ${w.gpus}` : ""})`);
}

// The table shows a page of the jobs that pass the filters: a sweep of 10,000 jobs stays a
// table of PAGE_ROWS rows, however many the queue holds.
const PAGE_ROWS = 200;
let page = 0;

function drawJobs() {
  if (!status) return;
  const tbody = $("jobs").tBodies[0];
  const rows = [];
  const matching = status.jobs.filter(visible);
  const pages = Math.max(1, Math.ceil(matching.length / PAGE_ROWS));
  page = Math.min(page, pages - 1);
  for (const job of matching.slice(page * PAGE_ROWS, (page + 1) * PAGE_ROWS)) {
    const extra = (latest && latest.jobs[job.name]) || null;
    const ev = extra && extra.eval;
    const acc = job.test_accuracy ?? (ev ? ev.test_accuracy : null);
    const bal = job.balanced_accuracy ?? (ev ? ev.test_balanced_accuracy : null);
    const evalNote = job.test_accuracy !== null && job.test_accuracy !== undefined
      ? "final evaluation" : ev ? `evaluated after ${ev.step} steps` : "not evaluated yet";
    const age = job.heartbeat_age;
    const stale = extra && extra.stale;
    const tr = el("tr", { "data-name": job.name, "data-state": job.state },
      el("td", {}, job.name),
      stateCell(job, extra),
      progressCell(job),
      el("td", { class: "num" }, num(job.loss)),
      el("td", { class: "num", title: evalNote }, pct(acc)),
      el("td", { class: "num", title: evalNote }, pct(bal)),
      workerCell(job.worker),
      el("td", { class: "num" }, String(job.attempts)),
      el("td", { class: stale ? "num stale" : "num" },
        age === null || age === undefined || job.state !== "running" ? "–"
          : (stale ? `stale ${duration(age)}` : duration(age))),
      el("td", { class: "error", title: job.error || "" },
        el("div", {}, job.error ? job.error.split("\n")[0] : "")),
    );
    if (job.name === selected) tr.classList.add("selected");
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  const first = matching.length ? page * PAGE_ROWS + 1 : 0;
  $("shown").textContent = `(${matching.length} of ${status.jobs.length} shown)`;
  $("page-text").textContent = matching.length > PAGE_ROWS
    ? `rows ${first}–${first + rows.length - 1} of ${matching.length}, page ${page + 1} of ${pages}` : "";
  $("page-prev").hidden = $("page-next").hidden = matching.length <= PAGE_ROWS;
  $("page-prev").disabled = page === 0;
  $("page-next").disabled = page >= pages - 1;
}

function turnPage(by) {
  page = Math.max(0, page + by);
  drawJobs();
}

// --- results and the figure ---------------------------------------------------------------

function spread(s) {
  if (!s.n) return "–";
  return `${pct(s.mean)} ± ${pct(s.std)} (${pct(s.min)}–${pct(s.max)})`;
}

function drawResults(doc, text) {
  const tbody = $("results").tBodies[0];
  // jobs planned with different configs: a row per config, never one mean (results --by)
  const split = doc.rows.some((r) => r.group);
  $("results").classList.toggle("split", split);
  tbody.replaceChildren(...doc.rows.map((r) => el("tr", {},
    el("td", { class: "group" }, r.group || ""),
    el("td", { class: "num" }, String(r.V)), el("td", {}, r.model), el("td", { class: "num" }, String(r.N)),
    el("td", { class: "num" }, `${r.runs_finished}/${r.runs_planned}` + (r.runs_failed ? ` (${r.runs_failed} failed)` : "")),
    el("td", {}, spread(r.accuracy)), el("td", {}, spread(r.balanced_accuracy)),
    el("td", { class: "num" }, pct(r.majority_rate.mean)))));
  $("notes").replaceChildren(...doc.notes.map((n) => el("li", {}, n)));
  if (text === lastResults) return;
  lastResults = text;
  const finished = doc.rows.some((r) => r.runs_finished > 0);
  const img = $("figure");
  if (!finished) {
    img.hidden = true;
    $("figure-note").textContent = "No job has finished yet: the figure appears with the first result.";
    return;
  }
  figureVersion += 1;
  img.src = `/figures/sample_complexity.png?v=${figureVersion}`;
  img.hidden = false;
  $("figure-note").textContent = "";
}

// --- one job: curves, config, events, log -------------------------------------------------

function chart(title, series, opts) {
  // series: [{label, color, dash, points: [[x, y], ...]}]; opts: {percent, refs: [{y, label, color}]}
  const W = 700, H = 210, L = 56, R = 12, T = 22, B = 34;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", "100%");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
  add("text", { x: L, y: 14, "font-weight": "600" }, title);
  if (!pts.length) {
    add("text", { x: L, y: H / 2 }, "no points yet");
    return svg;
  }
  // x: steps done, from 0 to the job's total (a one-point curve keeps a real axis)
  const x0 = 0, x1 = Math.max(1, opts.xmax || 0, ...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  for (const r of opts.refs || []) { y0 = Math.min(y0, r.y); y1 = Math.max(y1, r.y); }
  if (opts.percent) {
    y0 = Math.floor(Math.min(y0, 0.4) * 10) / 10; y1 = 1.0;
  } else {
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    if (opts.nonNegative) y0 = Math.max(0, y0);  // a loss is never below 0
  }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    add("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" });
    add("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" },
      opts.percent ? `${(100 * y).toFixed(0)}%` : y.toPrecision(3));
  }
  for (const x of integerTicks(x1)) {
    add("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle" }, String(x));
  }
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "training steps done");
  for (const r of opts.refs || []) {
    add("line", { x1: L, x2: W - R, y1: sy(r.y), y2: sy(r.y), stroke: r.color,
      "stroke-dasharray": "5 4", "stroke-width": 1 });
  }
  for (const s of series) {
    const good = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
    if (!good.length) continue;
    add("polyline", { points: good.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.color, "stroke-width": 1.6, "stroke-dasharray": s.dash || "" });
    if (good.length < 60) for (const p of good) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: s.color });
  }
  return svg;
}

// Whole steps from 0 to `top`, at most six, each once: 1, 2 or 5 times a power of ten apart.
function integerTicks(top) {
  let step = 1;
  for (let scale = 1; ; scale *= 10) {
    const fit = [1, 2, 5].map((m) => m * scale).find((s) => top / s <= 5);
    if (fit) { step = fit; break; }
  }
  const ticks = [];
  for (let x = 0; x <= top; x += step) ticks.push(x);
  return ticks;
}

function legend(items) {
  return el("div", { class: "legend" }, ...items.map((i) =>
    el("span", {}, el("i", { style: `background:${i.color}` }), i.label)));
}

function drawCurves(metrics, totalSteps) {
  const train = metrics.map((r) => [r.step + 1, r.loss]);
  const trainAcc = metrics.map((r) => [r.step + 1, r.train_accuracy]);
  const evals = metrics.filter((r) => r.test_accuracy !== undefined);
  const majority = evals.length ? evals[evals.length - 1].test_majority_rate : null;
  const box = $("curves");
  const refs = [{ y: 0.5, color: "#57606a", label: "50 %" }];
  if (majority !== null && majority !== undefined) refs.push({ y: majority, color: "#cf222e", label: "majority rate" });
  box.replaceChildren(
    chart("training loss (BCE)", [{ label: "loss", color: "#1f6feb", points: train }],
      { nonNegative: true, xmax: totalSteps }),
    chart("train accuracy (batch)", [{ label: "train accuracy", color: "#8250df", points: trainAcc }],
      { percent: true, xmax: totalSteps }),
    chart("test set", [
      { label: "accuracy", color: "#1a7f37", points: evals.map((r) => [r.step + 1, r.test_accuracy]) },
      { label: "balanced accuracy", color: "#bc4c00", points: evals.map((r) => [r.step + 1, r.test_balanced_accuracy]) },
    ], { percent: true, refs, xmax: totalSteps }),
    legend([{ label: "test accuracy", color: "#1a7f37" }, { label: "test balanced accuracy", color: "#bc4c00" },
      { label: "majority-class rate (dashed)", color: "#cf222e" }, { label: "50 % (dashed)", color: "#57606a" }]),
  );
}

async function drawDetail() {
  if (!selected) return;
  const name = selected;
  let doc;
  try {
    doc = await getJSON(`/api/jobs/${encodeURIComponent(name)}`);
  } catch (e) {
    if (e.status === 404) { closeDetail(); return; }
    throw e;
  }
  if (name !== selected) return;
  $("detail").hidden = false;
  $("detail-name").textContent = doc.name;
  const j = doc.job;
  const finalEval = j.test_accuracy !== null ? `test accuracy ${pct(j.test_accuracy)} %, balanced ${pct(j.balanced_accuracy)} %, majority ${pct(j.majority_rate)} %` : "";
  $("detail-summary").replaceChildren(
    el("div", {}, el("span", { class: `state state-${j.state}` }, j.state),
      ` step ${j.step}/${j.total_steps} · attempts ${j.attempts} · folder `, el("code", {}, doc.files.folder || "–")),
    el("div", {}, finalEval),
    j.error ? el("pre", { class: "error" }, j.error) : "");
  drawCurves(doc.metrics, j.total_steps);
  $("detail-config").textContent = doc.config_yaml;
  const when = (at) => (at === null ? "–" : new Date(at * 1000).toLocaleString());
  $("detail-claims").tBodies[0].replaceChildren(...doc.claims.map((c) => el("tr", {},
    el("td", {}, String(c.claim)), el("td", {}, when(c.started_at)), el("td", {}, when(c.ended_at)),
    el("td", {}, c.worker || ""), el("td", {}, c.slurm_task || "–"), el("td", {}, c.outcome),
    el("td", {}, c.step === null ? "" : String(c.step)), el("td", {}, c.why || ""))));
  $("detail-events").tBodies[0].replaceChildren(...doc.events.map((ev) => el("tr", {},
    el("td", {}, new Date(ev.at * 1000).toLocaleString()), el("td", {}, ev.kind),
    el("td", {}, ev.attempt === null ? "" : String(ev.attempt)), el("td", {}, ev.worker || ""),
    el("td", {}, ev.detail === null ? "" : JSON.stringify(ev.detail)))));
  $("detail-log").textContent = doc.log_tail || "(no log yet)";
  $("detail-log-note").textContent = doc.log_truncated ? "(last part)" : "";
}

function openDetail(name) {
  selected = name;
  history.replaceState(null, "", `#job=${encodeURIComponent(name)}`);
  drawJobs();
  drawDetail().catch((e) => banner(e.message));
}

function closeDetail() {
  selected = null;
  $("detail").hidden = true;
  history.replaceState(null, "", location.pathname);
  drawJobs();
}

// --- the refresh loop ---------------------------------------------------------------------

async function refresh() {
  try {
    const [st, lt, res] = await Promise.all([
      getJSON("/api/status"), getJSON("/api/latest"),
      fetch("/api/results", { cache: "no-store" }).then(async (r) => {
        const text = await r.text();
        if (!r.ok) { let m; try { m = JSON.parse(text).error; } catch (e) { m = null; } throw new Error(m || `HTTP ${r.status}`); }
        return text;
      }),
    ]);
    status = st; latest = lt;
    drawProgress(st);
    drawFilters(st.jobs);
    drawJobs();
    drawResults(JSON.parse(res), res);
    if (selected) await drawDetail();
    banner(null);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (e) {
    banner(`Cannot read the queue: ${e.message}`);
    $("updated").textContent = `last try ${new Date().toLocaleTimeString()} failed`;
  } finally {
    setTimeout(refresh, refreshMs);
  }
}

async function start() {
  try {
    const info = await getJSON("/api/info");
    $("queue").textContent = info.queue;
    refreshMs = Math.max(500, 1000 * info.refresh_seconds);
  } catch (e) { /* the refresh loop reports it */ }
  for (const id of ["f-v", "f-n", "f-model", "f-state", "f-text"]) {
    $(id).addEventListener("input", () => { page = 0; drawJobs(); });
  }
  $("page-prev").addEventListener("click", () => turnPage(-1));
  $("page-next").addEventListener("click", () => turnPage(1));
  $("jobs").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-name]");
    if (tr) openDetail(tr.dataset.name);
  });
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && selected) closeDetail(); });
  $("figure").addEventListener("error", () => { $("figure").hidden = true; });
  const m = location.hash.match(/^#job=(.+)$/);
  if (m) selected = decodeURIComponent(m[1]);
  refresh();
}

start();
