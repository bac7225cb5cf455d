// keiryo app: draw, upload or film; classify on the server or in the browser; show where the time goes.
import { api, BrowserEngine, HttpError, ServerEngine, Unreachable, wasmFeatures } from "./engines.js";
import { preprocess } from "./preprocess.js";
import { softmax, topk, Window } from "./stats.js";

const $ = (id) => document.getElementById(id);
const MAX_UPLOAD = 25 * 1024 * 1024;

const state = {
  models: [],
  model: null, // the chosen entry of /app/api/models
  engine: null,
  engineName: "server",
  source: null, // what is classified: the pad, an uploaded image or the video
  busy: false,
  dirty: false,
  camera: null,
  modelBytes: new Map(), // "served@version" -> ArrayBuffer, fetched for the in-browser engine
  warm: new Map(), // "served@version" -> Promise<BrowserEngine>, opened ahead so switching engines is instant
  window: new Window(100),
  pollS: 2,
  polling: false,
};
window.keiryoApp = state; // for tests and the curious: read-only use

function status(text, kind = "info", action = null) {
  const el = $("status");
  el.textContent = text;
  el.className = kind === "error" ? "error" : "";
  el.dataset.kind = kind;
  if (action) {
    const b = document.createElement("button");
    b.textContent = action.label;
    b.addEventListener("click", action.run);
    el.appendChild(b);
  }
}

function showLogin(reason) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-reason").textContent = reason;
  status(reason, "error");
}

function handleError(e) {
  if (e instanceof HttpError && e.status === 401) {
    stopCamera();
    showLogin(`Session refused (${e.message}). Sign in again with an API key, or open the link keiryo app printed.`);
  } else if (e instanceof Unreachable && state.engineName === "server") {
    const canLocal = state.model && state.model.browser;
    status(`Server unreachable: ${e.message}.`, "error", canLocal ? { label: "Use the in-browser engine", run: () => setEngine("browser") } : null);
  } else {
    status(e.message || String(e), "error");
  }
}

// ---------- drawing ----------
const pad = $("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  state.source = pad;
  $("video").hidden = true;
  pad.hidden = false;
  $("topk").innerHTML = "";
  $("prediction").dataset.label = "";
}

function point(ev) {
  const r = pad.getBoundingClientRect();
  return [((ev.clientX - r.left) * pad.width) / r.width, ((ev.clientY - r.top) * pad.height) / r.height];
}

let drawing = false;
let last = null;
pad.addEventListener("pointerdown", (ev) => {
  if (state.source !== pad) clearPad();
  drawing = true;
  last = point(ev);
  pad.setPointerCapture(ev.pointerId);
  stroke(last, last);
});
pad.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = point(ev);
  stroke(last, p);
  last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    drawing = false;
    schedule();
  });
}

function stroke(a, b) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = pad.width / 14;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(a[0], a[1]);
  ctx.lineTo(b[0], b[1]);
  ctx.stroke();
  schedule();
}

// ---------- uploads and the camera ----------
$("upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  stopCamera();
  if (file.size > MAX_UPLOAD) return status(`${file.name}: ${(file.size / 1e6).toFixed(1)} MB is over the 25 MB limit`, "error");
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (_) {
    return status(`${file.name}: not an image this browser can read (expected PNG, JPEG, GIF, WebP or BMP)`, "error");
  }
  // shown on the pad (fitted), classified at full resolution: preprocessing resizes it to the model's input
  clearPad();
  const s = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
  const w = bitmap.width * s, h = bitmap.height * s;
  ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  state.source = bitmap;
  status(`${file.name}: ${bitmap.width}x${bitmap.height}, resized to the model's input`);
  schedule();
});

$("camera").addEventListener("click", async () => {
  if (state.camera) return stopCamera();
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false });
  } catch (e) {
    return status(`camera unavailable: ${e.message}`, "error");
  }
  const v = $("video");
  v.srcObject = state.camera;
  v.hidden = false;
  pad.hidden = true;
  state.source = v;
  $("camera").textContent = "Stop camera";
  const loop = () => {
    if (!state.camera) return;
    schedule();
    requestAnimationFrame(loop);
  };
  v.onplaying = loop;
});

function stopCamera() {
  if (!state.camera) return;
  for (const t of state.camera.getTracks()) t.stop();
  state.camera = null;
  $("camera").textContent = "Camera";
  clearPad();
}

$("clear").addEventListener("click", () => {
  stopCamera();
  clearPad();
});

// ---------- the inference loop: latest input wins, one frame in flight ----------
function schedule() {
  if (state.busy) {
    state.dirty = true;
    return;
  }
  state.busy = true;
  requestAnimationFrame(() => frame().finally(() => {
    state.busy = false;
    if (state.dirty) {
      state.dirty = false;
      schedule();
    }
  }));
}

function blank(tensor) {
  for (const v of tensor) if (v !== 0) return false;
  return true;
}

async function frame() {
  const m = state.model;
  const engine = state.engine;
  if (!m || !engine || !state.source) return;
  const t0 = performance.now();
  let tensor;
  try {
    tensor = preprocess(state.source, m.spec, state.source === pad);
  } catch (e) {
    return status(`input refused: ${e.message}`, "error");
  }
  const prep = performance.now() - t0;
  if (m.spec.fit === "bbox" && blank(tensor)) return; // nothing drawn yet
  let res;
  try {
    res = await engine.infer(tensor);
  } catch (e) {
    return handleError(e);
  }
  if (engine !== state.engine) return; // the engine changed meanwhile
  const probs = softmax(res.scores);
  render(topk(probs, m.labels, Math.min(5, probs.length)));
  const total = performance.now() - t0;
  const row = { prep, network: res.timing.network, inference: res.timing.inference, total };
  state.window.push(row);
  showLatency(row);
  if ($("status").dataset.kind === "error") status(`${m.name}@${m.alias} ready`);
}

function render(top) {
  const ol = $("topk");
  ol.innerHTML = "";
  for (const t of top) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = t.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, t.p * 100).toFixed(1)}%`;
    const p = document.createElement("span");
    p.textContent = `${(t.p * 100).toFixed(1)}%`;
    li.append(label, bar, p);
    ol.appendChild(li);
  }
  const pred = $("prediction");
  pred.dataset.label = top.length ? top[0].label : "";
  pred.dataset.frames = String(Number(pred.dataset.frames || 0) + 1);
  pred.dataset.engine = state.engineName;
}

function fmt(x) {
  return x === null || x === undefined ? "-" : x.toFixed(2);
}

function showLatency(row) {
  for (const tr of document.querySelectorAll("#latency tbody tr")) {
    const k = tr.dataset.key;
    const [lastCell, p50, p95] = tr.querySelectorAll("td");
    lastCell.textContent = fmt(row[k]);
    p50.textContent = fmt(state.window.percentile(k, 0.5));
    p95.textContent = fmt(state.window.percentile(k, 0.95));
  }
  $("window-n").textContent = String(state.window.rows.length);
}

// ---------- models and engines ----------
function label(m) {
  return `${m.name}@${m.alias} (${m.version})`;
}

async function refreshModels(first = false) {
  let body;
  try {
    body = await (await api("api/models")).json();
  } catch (e) {
    if (first) throw e;
    return handleError(e);
  }
  state.pollS = body.poll_s || state.pollS;
  state.models = body.models;
  const sel = $("model");
  const chosen = state.model ? state.model.id : null;
  sel.innerHTML = "";
  for (const m of state.models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.eligible ? label(m) : `${label(m)} - ${m.reason}`;
    o.disabled = !m.eligible;
    o.title = m.eligible ? "" : m.reason;
    sel.appendChild(o);
  }
  const next = state.models.find((m) => m.id === chosen && m.eligible) || state.models.find((m) => m.eligible);
  if (!next) {
    status("no image-classification model in the registry; the greyed-out entries say why", "error");
    return;
  }
  sel.value = next.id;
  // a promotion moves the alias: the page follows it without a reload
  if (!state.model || state.model.id !== next.id || state.model.version !== next.version) {
    const moved = state.model && state.model.id === next.id;
    await choose(next);
    if (moved) status(`${next.name}@${next.alias} moved to version ${next.version}`);
  }
}

async function modelBytes(m) {
  const key = `${m.served}@${m.version}`;
  if (!state.modelBytes.has(key)) {
    const resp = await api(`api/models/${encodeURIComponent(m.served)}/versions/${encodeURIComponent(m.version)}/model`);
    state.modelBytes.set(key, await resp.arrayBuffer());
  }
  return state.modelBytes.get(key);
}

function browserEngine(m) {
  const key = `${m.served}@${m.version}`;
  if (!state.warm.has(key)) {
    const p = (async () => {
      const e = new BrowserEngine(m);
      await e.open(new Uint8Array(await modelBytes(m)));
      return e;
    })();
    p.catch(() => state.warm.delete(key)); // a failed warm-up is retried when the engine is chosen
    state.warm.set(key, p);
  }
  return state.warm.get(key);
}

async function makeEngine(m, name) {
  if (name === "browser") {
    if (!m.browser) throw new Error(`${label(m)}: the in-browser engine cannot run it (${m.browser_reason})`);
    return browserEngine(m);
  }
  return new ServerEngine(m);
}

// the in-browser engine of the chosen model is opened in the background (small models only): the wasm is
// compiled and the session made while the server engine already answers, so a switch (or losing the server)
// costs nothing; engines of models no longer chosen are released
const WARM_MAX_BYTES = 32 * 1024 * 1024;
function warmUp(m) {
  const key = `${m.served}@${m.version}`;
  for (const [k, p] of state.warm) {
    if (k !== key) {
      state.warm.delete(k);
      p.then((e) => (e !== state.engine ? e.close() : null), () => {});
    }
  }
  if (!m.browser || (m.size_bytes || 0) > WARM_MAX_BYTES) return;
  browserEngine(m).then(() => (document.body.dataset.warm = key), () => {});
}

async function choose(m) {
  state.model = m;
  $("model-reason").textContent = m.browser ? "" : `in-browser engine: ${m.browser_reason}`;
  $("about-model").textContent = label(m);
  $("about-size").textContent = `${(m.size_bytes / 1024).toFixed(1)} KiB (${m.format})`;
  if (m.spec.fit === "bbox" && state.source !== pad && !state.camera) clearPad();
  await setEngine(m.browser || state.engineName === "server" ? state.engineName : "server");
  warmUp(m); // fetched and opened ahead: the in-browser engine then also works when the server is gone
}

async function setEngine(name) {
  const m = state.model;
  if (!m) return;
  const old = state.engine;
  try {
    status(`loading ${label(m)} on the ${name} engine...`);
    const e = await makeEngine(m, name);
    state.engine = e;
    state.engineName = name;
    if (old && old !== e && !(old instanceof BrowserEngine)) await old.close(); // browser engines stay warm
  } catch (err) {
    return handleError(err);
  }
  for (const r of document.querySelectorAll("input[name=engine]")) r.checked = r.value === name;
  state.window.clear();
  $("about-engine").textContent = state.engine.describe();
  status(`${label(m)} ready on the ${name} engine`);
  document.body.dataset.ready = `${m.id}:${m.version}:${name}`;
  schedule();
}

for (const r of document.querySelectorAll("input[name=engine]")) {
  r.addEventListener("change", () => setEngine(r.value));
}
$("model").addEventListener("change", (ev) => {
  const m = state.models.find((x) => x.id === ev.target.value);
  if (m) choose(m);
});

// ---------- session ----------
$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("login-key").value;
  $("login-key").value = "";
  try {
    await api("api/session", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key }) });
  } catch (e) {
    return showLogin(e instanceof HttpError && e.status === 401 ? "That key was refused. Try again." : e.message);
  }
  start();
});

async function start() {
  let s;
  try {
    s = await (await api("api/session")).json();
  } catch (e) {
    return status(`cannot start: ${e.message}`, "error");
  }
  if (s.auth && !s.authenticated) return showLogin("This server needs an API key; it is exchanged for a short-lived session cookie.");
  $("login").hidden = true;
  $("main").hidden = false;
  document.body.dataset.wasm = JSON.stringify(wasmFeatures());
  clearPad();
  try {
    await refreshModels(true);
  } catch (e) {
    return handleError(e);
  }
  if (state.polling) return; // signed in again: the one poll loop is still running
  state.polling = true;
  const poll = async () => {
    if (!$("main").hidden) await refreshModels(); // not while the sign-in form is up
    setTimeout(poll, state.pollS * 1000);
  };
  setTimeout(poll, state.pollS * 1000);
}

start();
