// End-to-end check of `oxtune web-ui` in headless Chromium (the system
// browser, /usr/bin/chromium or $CHROMIUM, driven by puppeteer-core; nothing
// is downloaded). Installed with package.json into target/webui-test/ by
// .ci/fetch-chromium.
//
// usage: node browser.mjs --url http://127.0.0.1:PORT --model-dir PATH --dataset PATH
//                         --screenshot OUT.png [--message TEXT] [--output-dir runs/ui-run]
//                         [--max-steps N] [--timeout SECONDS]
//
// Steps: (a) waits for #chat-model to list a model; (b) sends a chat message
// and waits for the last .msg.assistant bubble to hold text and data-done="true",
// counting how often its text changed while it streamed; (c) fills the Train
// form (sft, --max-steps N (6), --save-steps N/2), checks #command-preview, clicks
// #launch, and follows the new run: the loss curve is
// `#chart-loss polyline[data-series="loss"]`, its point count is the number of
// "x,y" pairs in its `points` attribute; counted once it has >= 2 points and
// again once the run is finished (#run-detail[data-status="finished"]); then a
// full-page screenshot.
// Prints one JSON line on stdout:
//   {"chat_answer", "chat_updates", "chat_request", "models", "command_preview",
//    "run_id", "run_status", "loss_points_first", "loss_points_last",
//    "loss_points_seen", "checkpoints", "console_errors", "screenshot"}
// and exits 0; on any failure prints `browser.mjs: FAIL: why` on stderr and exits 1.
import fs from "node:fs";
import path from "node:path";
import puppeteer from "puppeteer-core";

const args = {message: "Hello! Who are you?", "output-dir": "runs/ui-run", timeout: "240", "max-steps": "6"};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  if (!argv[i].startsWith("--") || argv[i + 1] === undefined) usage(`bad argument ${argv[i]}`);
  args[argv[i].slice(2)] = argv[i + 1];
}
for (const need of ["url", "model-dir", "dataset", "screenshot"]) if (!args[need]) usage(`--${need} is required`);

function usage(why) {
  console.error(`browser.mjs: ${why}\nusage: node browser.mjs --url URL --model-dir PATH --dataset PATH --screenshot OUT.png [--message TEXT] [--output-dir DIR] [--max-steps N] [--timeout S]`);
  process.exit(2);
}

let browser = null;
const log = (...m) => console.error("browser.mjs:", ...m);
function fail(why) {
  console.error(`browser.mjs: FAIL: ${why}`);
  try { browser?.process()?.kill("SIGKILL"); } catch (_) { /* already gone */ }
  process.exit(1);
}
const deadline = Date.now() + Number(args.timeout) * 1000;
const left = () => Math.max(1, (deadline - Date.now()) / 1000 - 1); // seconds the long waits may take
const overall = setTimeout(() => fail(`timed out after ${args.timeout}s`), Number(args.timeout) * 1000);
process.on("unhandledRejection", (e) => fail(e?.stack || String(e)));

// Waits for fn(...params) in the page to return a truthy value, naming the step on timeout.
async function waitFor(page, what, fn, timeoutS, ...params) {
  try {
    const handle = await page.waitForFunction(fn, {timeout: timeoutS * 1000, polling: 100}, ...params);
    return await handle.jsonValue();
  } catch (e) {
    fail(`${what}: ${e.message.split("\n")[0]}`);
  }
}

async function fill(page, selector, value) {
  await page.$eval(selector, (el) => { el.value = ""; });
  await page.type(selector, String(value));
}

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!fs.existsSync(executablePath)) fail(`no browser at ${executablePath} (run .ci/fetch-chromium or set CHROMIUM)`);
browser = await puppeteer.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--headless=new", "--disable-dev-shm-usage", "--disable-gpu"],
  defaultViewport: {width: 1280, height: 900},
});
const page = await browser.newPage();
const pageErrors = [];
const consoleErrors = [];
page.on("pageerror", (e) => pageErrors.push(e.message));
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
let chatRequest = null;
page.on("request", (r) => {
  if (r.method() === "POST" && r.url().endsWith("/v1/chat/completions")) {
    try { chatRequest = JSON.parse(r.postData() || "null"); } catch (_) { chatRequest = r.postData(); }
  }
});

// (a) the page and its model list
log(`opening ${args.url}`);
const res = await page.goto(args.url, {waitUntil: "domcontentloaded", timeout: 30000}).catch((e) => fail(`open ${args.url}: ${e.message}`));
if (!res || !res.ok()) fail(`open ${args.url}: HTTP ${res && res.status()}`);
await waitFor(page, "model list (#chat-model options)", () => document.querySelectorAll("#chat-model option").length >= 1, 30);
const models = await page.$$eval("#chat-model option", (os) => os.map((o) => o.value));
log(`models: ${models.join(", ")}`);

// (b) a streamed chat answer
await page.click("#tab-chat");
await page.evaluate(() => {
  const st = window.__chatWatch = {updates: 0, el: null, last: ""};
  new MutationObserver(() => {
    const bubble = [...document.querySelectorAll("#chat-log .msg.assistant")].pop();
    if (!bubble) return;
    if (bubble !== st.el) { st.el = bubble; st.last = ""; st.updates = 0; }
    if (bubble.textContent !== st.last) { st.last = bubble.textContent; st.updates++; }
  }).observe(document.querySelector("#chat-log"), {childList: true, subtree: true, characterData: true});
});
await fill(page, "#chat-input", args.message);
await page.click("#chat-send");
log("chat sent, waiting for the answer");
await waitFor(page, "chat answer (last .msg.assistant with data-done=true)", () => {
  const bubble = [...document.querySelectorAll("#chat-log .msg.assistant")].pop();
  return bubble && bubble.dataset.done === "true" && (bubble.textContent !== "" || bubble.classList.contains("error"));
}, left());
const chat = await page.evaluate(() => {
  const bubble = [...document.querySelectorAll("#chat-log .msg.assistant")].pop();
  return {text: bubble.textContent, error: bubble.classList.contains("error"), updates: window.__chatWatch.updates};
});
if (chat.error) fail(`chat answered with an error: ${chat.text}`);
log(`chat answer (${chat.updates} updates): ${JSON.stringify(chat.text)}`);

// (c) the training form, the command preview, the launch
await page.click("#tab-train");
await page.select("#f-subcommand", "sft");
await fill(page, "#f-model", args["model-dir"]);
await fill(page, "#f-dataset", args.dataset);
await fill(page, "#f-output_dir", args["output-dir"]);
const maxSteps = Number(args["max-steps"]);
const saveSteps = Math.max(1, Math.floor(maxSteps / 2));
await fill(page, "#f-max_steps", maxSteps);
await fill(page, "#f-save_steps", saveSteps);
const preview = await waitFor(page, `#command-preview with sft --max-steps ${maxSteps} --save-steps ${saveSteps}`, (maxSteps, saveSteps) => {
  const pre = document.querySelector("#command-preview");
  const text = pre.textContent;
  // An error counts once it has stood for 2 s (a half-typed path may fail on the way).
  if (!pre.classList.contains("error") || !text) { window.__previewError = null; } else {
    const seen = window.__previewError;
    if (!seen || seen.text !== text) window.__previewError = {text, since: Date.now()};
    else if (Date.now() - seen.since > 2000) return {error: text};
    return false;
  }
  return text.includes("sft") && text.includes(`--max-steps ${maxSteps}`) && text.includes(`--save-steps ${saveSteps}`) && {text};
}, 20, maxSteps, saveSteps);
if (preview.error) fail(`command preview shows an error: ${preview.error}`);
log(`command: ${preview.text}`);

const launched = page.waitForResponse((r) => r.request().method() === "POST" && new URL(r.url()).pathname === "/api/runs", {timeout: 30000});
await page.click("#launch");
const launchRes = await launched.catch((e) => fail(`POST /api/runs: ${e.message}`));
if (!launchRes.ok()) fail(`POST /api/runs: HTTP ${launchRes.status()} ${await launchRes.text()}`);
const runId = (await launchRes.json()).id;
if (!runId) fail("POST /api/runs answered without an id");
log(`launched ${runId}`);

// Keeps the distinct loss point counts the page showed, as they come.
await page.evaluate(() => {
  const seen = window.__lossSeen = [];
  const count = () => {
    const line = document.querySelector('#chart-loss polyline[data-series="loss"]');
    const n = line ? line.getAttribute("points").trim().split(/\s+/).filter(Boolean).length : 0;
    if (n && seen[seen.length - 1] !== n) seen.push(n);
  };
  new MutationObserver(count).observe(document.querySelector("#charts"), {childList: true, subtree: true, attributes: true});
  count();
});

const runState = (id) => {
  const run = document.querySelector(`#runs .run[data-id="${CSS.escape(id)}"]`);
  const detail = document.querySelector("#run-detail");
  const line = document.querySelector('#chart-loss polyline[data-series="loss"]');
  return {
    listed: !!run,
    status: run ? run.querySelector(".status").textContent.trim() : null,
    shown: !!detail && !detail.hidden && detail.dataset.id === id,
    detailStatus: detail ? detail.dataset.status || null : null,
    points: line ? line.getAttribute("points").trim().split(/\s+/).filter(Boolean).length : 0,
  };
};
await page.evaluate(`window.__runState = ${runState.toString()}`);
const logTail = () => page.$eval("#run-log", (p) => p.textContent.slice(-2000)).catch(() => "");

const first = await waitFor(page, `run ${runId} listed with a loss curve of >= 2 points`, (id) => {
  const s = window.__runState(id);
  return s.listed && s.shown && (s.points >= 2 || ["failed", "stopped"].includes(s.status)) && s;
}, left(), runId);
if (first.points < 2) fail(`run ${runId} ended ${first.status} before its loss curve had 2 points; log:\n${await logTail()}`);
log(`loss curve: ${first.points} points (status ${first.status})`);

const last = await waitFor(page, `run ${runId} finished`, (id) => {
  const s = window.__runState(id);
  return ["finished", "failed", "stopped"].includes(s.status) && s.shown && s.detailStatus === s.status && s;
}, left(), runId);
if (last.status !== "finished") fail(`run ${runId} ended ${last.status}; log:\n${await logTail()}`);
const checkpoints = await page.$$eval("#checkpoints .checkpoint", (cs) => cs.map((c) => c.dataset.name));
const lossSeen = await page.evaluate(() => window.__lossSeen);
log(`finished: ${last.points} loss points, checkpoints ${checkpoints.join(", ") || "none"}`);

fs.mkdirSync(path.dirname(path.resolve(args.screenshot)), {recursive: true});
await page.screenshot({path: args.screenshot, fullPage: true});
if (pageErrors.length) fail(`uncaught errors in the page: ${pageErrors.join(" | ")}`);

console.log(JSON.stringify({
  chat_answer: chat.text,
  chat_updates: chat.updates,
  chat_request: chatRequest,
  models,
  command_preview: preview.text,
  run_id: runId,
  run_status: last.status,
  loss_points_first: first.points,
  loss_points_last: last.points,
  loss_points_seen: lossSeen,
  checkpoints,
  console_errors: consoleErrors,
  screenshot: args.screenshot,
}));
clearTimeout(overall);
await browser.close();
