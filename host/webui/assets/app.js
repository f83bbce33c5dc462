// oxtune web-ui, browser side: plain ES2020, no framework, no build step.
// Chat talks to the OpenAI-compatible API (/v1/models, /v1/chat/completions,
// streamed as server-sent events); Train builds a command through
// /api/command and launches it with /api/runs; Runs polls /api/runs and
// draws each run's metrics as inline SVG charts.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
};

// ---------- API ----------

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// Throws an Error with the server's {"error":{"message"}} on a non-2xx answer.
async function checked(res) {
  if (res.ok) return res;
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && body.error) message = body.error.message || message;
  } catch (_) { /* not JSON */ }
  throw new Error(message);
}

async function api(path, body) {
  const init = body === undefined
    ? {headers: headers(false)}
    : {method: "POST", headers: headers(true), body: JSON.stringify(body)};
  const res = await checked(await fetch(path, init));
  return res.json();
}

// ---------- tabs ----------

let activeTab = "chat";
function showTab(name) {
  activeTab = name;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === `panel-${name}`);
  if (name === "runs") refreshRuns();
}

// ---------- header ----------

async function loadInfo() {
  try {
    const info = await api("/api/info");
    $("#workspace").textContent = info.workspace || "?";
    $("#version").textContent = info.version ? `v${info.version}` : "";
  } catch (e) {
    $("#workspace").textContent = `(${e.message})`;
  }
}

// ---------- chat ----------

const conversation = [];   // OpenAI messages sent with every request
let pendingImage = null;   // data: URL of the image attached to the next message
let streaming = false;

async function loadModels(select) {
  const box = $("#chat-model");
  const keep = select || box.value;
  try {
    const list = await api("/v1/models");
    box.replaceChildren(...(list.data || []).map((m) =>
      el("option", {value: m.id}, m.parent ? `${m.id}  (adapter on ${m.parent})` : m.id)));
    if (keep && [...box.options].some((o) => o.value === keep)) box.value = keep;
  } catch (e) {
    box.replaceChildren();
    addMessage("assistant", `Could not load models: ${e.message}`, {error: true, done: true});
  }
}

function addMessage(role, text, {image, error, done} = {}) {
  const bubble = el("div", {class: `msg ${role}${error ? " error" : ""}`});
  const log = $("#chat-log");
  if (image) log.append(el("div", {class: `msg-image ${role}`}, el("img", {src: image, alt: "attached image"})));
  bubble.textContent = text;
  if (done) bubble.dataset.done = "true";
  log.append(bubble);
  log.scrollTop = log.scrollHeight;
  return bubble;
}

// Reads an SSE body: events are separated by blank lines, each `data:` line
// holds a JSON chunk or [DONE]. Calls onDelta with each piece of content.
async function readEvents(res, onDelta) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (value) buffer += decoder.decode(value, {stream: true});
    if (done) buffer += "\n\n";
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data.trim() === "[DONE]") { reader.cancel().catch(() => {}); return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "stream error");
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) onDelta(delta.content);
    }
    if (done) return;
  }
}

async function sendChat() {
  const input = $("#chat-input");
  const text = input.value.trim();
  if (streaming || (!text && !pendingImage)) return;
  const image = pendingImage;
  const content = image
    ? [{type: "text", text}, {type: "image_url", image_url: {url: image}}]
    : text;
  conversation.push({role: "user", content});
  addMessage("user", text, {image});
  input.value = "";
  setImage(null);

  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  streaming = true;
  $("#chat-send").disabled = true;
  let answer = "";
  try {
    const res = await checked(await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({
        model: $("#chat-model").value,
        messages: conversation,
        stream: true,
        temperature: Number($("#chat-temperature").value || 0),
        max_tokens: Number($("#chat-max-tokens").value || 64),
        seed: 0,
      }),
    }));
    await readEvents(res, (piece) => {
      answer += piece;
      bubble.textContent = answer;
      $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
    });
    conversation.push({role: "assistant", content: answer});
  } catch (e) {
    conversation.pop(); // the failed turn is not part of the conversation
    bubble.classList.add("error");
    bubble.textContent = answer ? `${answer}\n[error: ${e.message}]` : `Error: ${e.message}`;
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    streaming = false;
    $("#chat-send").disabled = false;
  }
}

function setImage(dataUrl) {
  pendingImage = dataUrl;
  const box = $("#chat-image-preview");
  box.replaceChildren();
  if (!dataUrl) { $("#chat-image").value = ""; return; }
  box.append(el("img", {src: dataUrl, alt: "image to send"}),
    el("button", {type: "button", class: "secondary small", title: "remove image", onclick: () => setImage(null)}, "×"));
}

function readImage() {
  const file = $("#chat-image").files[0];
  if (!file) return setImage(null);
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.readAsDataURL(file);
}

// ---------- train ----------

const FIELDS = ["model", "dataset", "output_dir", "config", "tuner", "lora_rank", "lora_alpha",
  "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length",
  "save_steps", "eval_steps", "rlhf_type"];

// The body of /api/command and /api/runs. Empty fields are left out; lines of
// the extra box are `name = value` (a bare `name` gives an empty value).
function trainBody() {
  const subcommand = $("#f-subcommand").value;
  const flags = {};
  for (const name of FIELDS) {
    if (name === "rlhf_type" && subcommand !== "rlhf") continue;
    const value = $(`#f-${name}`).value.trim();
    if (value !== "") flags[name] = value;
  }
  for (const raw of $("#f-extra").value.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const eq = line.indexOf("=");
    const name = (eq < 0 ? line : line.slice(0, eq)).trim().replace(/^-+/, "").replace(/-/g, "_");
    if (name) flags[name] = eq < 0 ? "" : line.slice(eq + 1).trim();
  }
  return {subcommand, flags};
}

let previewSeq = 0;
let previewTimer = null;
function schedulePreview() {
  $("#rlhf-type-field").hidden = $("#f-subcommand").value !== "rlhf";
  clearTimeout(previewTimer);
  previewTimer = setTimeout(updatePreview, 200);
}

async function updatePreview() {
  const seq = ++previewSeq;
  const pre = $("#command-preview");
  try {
    const out = await api("/api/command", trainBody());
    if (seq !== previewSeq) return; // a newer edit answered first
    pre.classList.remove("error");
    pre.textContent = out.command_line;
  } catch (e) {
    if (seq !== previewSeq) return;
    pre.classList.add("error");
    pre.textContent = e.message;
  }
}

async function launch() {
  const button = $("#launch");
  button.disabled = true;
  try {
    const out = await api("/api/runs", trainBody());
    selectedRun = out.id;
    showTab("runs");
  } catch (e) {
    const pre = $("#command-preview");
    pre.classList.add("error");
    pre.textContent = `Launch failed: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---------- runs ----------

let runs = [];
let selectedRun = null;
let detailKey = "";   // run id + status + step the detail was last drawn for
let polling = false;

function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${pad(Math.floor(s / 60) % 60)}m`;
}

async function refreshRuns() {
  if (polling) return;
  polling = true;
  try {
    runs = (await api("/api/runs")).runs || [];
    renderRuns();
    const run = runs.find((r) => r.id === selectedRun);
    if (run) await refreshDetail(run);
  } catch (e) {
    $("#runs").replaceChildren(el("p", {class: "error"}, `Could not list runs: ${e.message}`));
  } finally {
    polling = false;
  }
}

// Updates the list in place so that a click never lands on a replaced node.
function renderRuns() {
  const box = $("#runs");
  if (!runs.length) { box.replaceChildren(el("p", {class: "empty"}, "No runs yet.")); return; }
  const old = new Map([...box.querySelectorAll(".run")].map((n) => [n.dataset.id, n]));
  box.querySelectorAll(".empty, .error").forEach((n) => n.remove());
  for (const run of runs) {
    let node = old.get(run.id);
    old.delete(run.id);
    if (!node) {
      node = el("div", {class: "run", "data-id": run.id, onclick: () => selectRun(run.id)},
        el("div", {class: "run-head"}, el("span", {class: "id"}), el("span", {class: "sub"}), el("span", {class: "status"})),
        el("div", {class: "bar"}, el("div")),
        el("div", {class: "run-foot"}, el("span", {class: "steps"}), el("span", {class: "times"})));
    }
    const total = run.total_steps || 0;
    $(".id", node).textContent = run.id;
    $(".sub", node).textContent = run.subcommand;
    const status = $(".status", node);
    status.textContent = run.status;
    status.className = `status ${run.status}`;
    $(".bar > div", node).style.width = `${total ? Math.min(100, 100 * run.step / total) : 0}%`;
    $(".steps", node).textContent = `step ${run.step ?? 0}/${total || "?"}`;
    $(".times", node).textContent = run.status === "running"
      ? `${fmtDuration(run.elapsed_s)} elapsed · ${fmtDuration(run.remaining_s)} left`
      : `${fmtDuration(run.elapsed_s)}${run.exit_code != null ? ` · exit ${run.exit_code}` : ""}`;
    let stop = $("button.stop", node);
    if (run.status === "running" && !stop) {
      stop = el("button", {type: "button", class: "stop secondary small", onclick: (ev) => { ev.stopPropagation(); stopRun(run.id); }}, "Stop");
      $(".run-foot", node).append(stop);
    } else if (run.status !== "running" && stop) stop.remove();
    node.classList.toggle("selected", run.id === selectedRun);
    box.append(node); // appending moves existing nodes into the server's order
  }
  for (const gone of old.values()) gone.remove();
}

function selectRun(id) {
  selectedRun = id;
  detailKey = "";
  renderRuns();
  const run = runs.find((r) => r.id === id);
  if (run) refreshDetail(run);
}

async function stopRun(id) {
  try { await api(`/api/runs/${encodeURIComponent(id)}/stop`, {}); } catch (e) { alert(`Stop failed: ${e.message}`); }
  refreshRuns();
}

// Redraws the detail when the run is running or changed since last time;
// #run-detail[data-status] says which status the shown data belongs to.
async function refreshDetail(run) {
  const key = `${run.id}|${run.status}|${run.step}|${(run.checkpoints || []).join(",")}`;
  if (key === detailKey && run.status !== "running") return;
  const id = encodeURIComponent(run.id);
  const [metrics, log] = await Promise.all([
    api(`/api/runs/${id}/metrics`).catch(() => ({records: []})),
    api(`/api/runs/${id}/log`).catch((e) => ({text: `(${e.message})`})),
  ]);
  if (run.id !== selectedRun) return;
  const detail = $("#run-detail");
  detail.hidden = false;
  detail.dataset.id = run.id;
  $("#run-title").textContent = `${run.id} — ${run.status}`;
  $("#run-command").textContent = run.command_line || "";
  renderCharts(metrics.records || []);
  if (key !== detailKey) renderCheckpoints(run);
  const pre = $("#run-log");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = log.text || "(no output yet)";
  if (atEnd) pre.scrollTop = pre.scrollHeight;
  detailKey = key;
  detail.dataset.status = run.status;
}

function renderCheckpoints(run) {
  const box = $("#checkpoints");
  const names = run.checkpoints || [];
  if (!names.length) { box.replaceChildren(el("p", {class: "empty"}, "None yet.")); return; }
  const dir = (run.output_dir || "").replace(/\/+$/, "");
  box.replaceChildren(...names.map((name) => {
    const path = dir ? `${dir}/${name}` : name;
    const kind = el("select", {class: "export-kind"}, el("option", {value: "merge-lora"}, "merge-lora"), el("option", {value: "gguf"}, "gguf"));
    const note = el("span", {class: "note"});
    return el("div", {class: "checkpoint", "data-name": name},
      el("code", {}, name),
      el("button", {type: "button", class: "chat small", onclick: () => chatWith(run, name, path, note)}, "Chat with it"),
      kind,
      el("button", {type: "button", class: "export small secondary", onclick: () => exportCheckpoint(path, kind.value, note)}, "Export"),
      note);
  }));
}

async function chatWith(run, name, path, note) {
  try {
    const out = await api("/api/adapters", {name: `${run.id}/${name}`, path});
    await loadModels(out.id);
    showTab("chat");
  } catch (e) { note.textContent = e.message; note.className = "note error"; }
}

async function exportCheckpoint(path, kind, note) {
  try {
    const out = await api("/api/export", {checkpoint: path, kind});
    selectedRun = out.id;
    detailKey = "";
    await refreshRuns();
  } catch (e) { note.textContent = e.message; note.className = "note error"; }
}

// ---------- charts (inline SVG) ----------

const CHARTS = [
  {id: "loss", title: "Loss", series: ["loss", "eval_loss"]},
  {id: "lr", title: "Learning rate", series: ["lr"]},
  {id: "grad_norm", title: "Gradient norm", series: ["grad_norm"]},
  {id: "reward", title: "Reward", series: ["reward", "kl"]},
];
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

// About n round tick values covering [lo, hi].
function ticks(lo, hi, n) {
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmtNum(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1).replace("e+", "e");
  return String(+v.toPrecision(3));
}

function renderCharts(records) {
  const box = $("#charts");
  const shown = [];
  for (const spec of CHARTS) {
    const series = spec.series
      .map((name) => ({name, points: records.filter((r) => typeof r[name] === "number" && isFinite(r[name]) && typeof r.step === "number").map((r) => [r.step, r[name]])}))
      .filter((s) => s.points.length);
    if (series.length) shown.push(drawChart(spec, series));
  }
  if (!shown.length) shown.push(el("p", {class: "empty"}, "No metrics yet."));
  box.replaceChildren(...shown);
}

// One chart: a polyline per series (polyline[data-series=NAME]), axes with
// tick labels, and a legend.
function drawChart(spec, series) {
  const W = 400, H = 230, L = 56, R = 12, T = 28, B = 38;
  const all = series.flatMap((s) => s.points);
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);

  const root = svg("svg", {id: `chart-${spec.id}`, class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title});
  root.append(svg("text", {x: L, y: 16, class: "title"}, spec.title));
  for (const v of ticks(y0, y1, 4)) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "grid"}));
    root.append(svg("text", {x: L - 6, y: sy(v) + 4, class: "tick", "text-anchor": "end"}, fmtNum(v)));
  }
  for (const v of ticks(x0, x1, 5).filter(Number.isInteger)) {
    root.append(svg("line", {x1: sx(v), x2: sx(v), y1: H - B, y2: H - B + 4, class: "axis"}));
    root.append(svg("text", {x: sx(v), y: H - B + 16, class: "tick", "text-anchor": "middle"}, String(v)));
  }
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 4, class: "tick", "text-anchor": "middle"}, "step"));
  root.append(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  root.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));

  const width = (s) => s.name.length * 6.5 + 18;
  let lx = W - R - series.reduce((sum, s) => sum + width(s) + 10, 0);
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    root.append(svg("polyline", {"data-series": s.name, fill: "none", stroke: color, "stroke-width": 2,
      points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ")}));
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      root.append(svg("circle", {cx: sx(x), cy: sy(y), r: 3, fill: color}));
    }
    root.append(svg("rect", {x: lx, y: 7, width: 10, height: 10, fill: color, rx: 2}));
    root.append(svg("text", {x: lx + 14, y: 16, class: "legend"}, s.name));
    lx += width(s) + 10;
  });
  return root;
}

// ---------- wiring ----------

function init() {
  const key = $("#api-key");
  key.value = localStorage.getItem("oxtune-api-key") || "";
  key.addEventListener("change", () => { localStorage.setItem("oxtune-api-key", key.value.trim()); loadModels(); });

  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));

  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); sendChat(); }
  });
  $("#chat-image").addEventListener("change", readImage);
  $("#chat-clear").addEventListener("click", () => {
    if (streaming) return;
    conversation.length = 0;
    $("#chat-log").replaceChildren();
  });

  const form = $("#train-form");
  form.addEventListener("input", schedulePreview);
  form.addEventListener("change", schedulePreview);
  form.addEventListener("submit", (ev) => ev.preventDefault());
  $("#launch").addEventListener("click", launch);

  // Poll while the Runs tab is in view or anything is running.
  setInterval(() => {
    const visible = activeTab === "runs" && document.visibilityState === "visible";
    if (visible || runs.some((r) => r.status === "running")) refreshRuns();
  }, 1000);

  loadInfo();
  loadModels();
  refreshRuns();
  schedulePreview();
}

init();
