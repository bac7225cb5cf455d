// The in-browser half of keiryo's `web` runtime (keiryo/runtime/web.py drives it with Playwright): open an
// ONNX model in onnxruntime-web, run named inputs, time batch-1 runs inside the page with performance.now().
// Tensors cross the Playwright boundary as {type, dims, b64} (little-endian raw bytes, base64).
import * as ort from "./vendor/ort.wasm.min.mjs";
import { wasmFeatures } from "./engines.js";

ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
ort.env.logLevel = "error";

const ARRAYS = { float32: Float32Array, float16: Uint16Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array,
  int8: Int8Array, bool: Uint8Array, float64: Float64Array };

function decode(t) {
  const bin = atob(t.b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const A = ARRAYS[t.type];
  if (!A) throw new Error(`tensor type ${t.type} is not supported by the web runtime`);
  return new ort.Tensor(t.type, new A(bytes.buffer), t.dims);
}

function encode(t) {
  const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return { type: t.type, dims: Array.from(t.dims), b64: btoa(bin) };
}

let session = null;
let threads = 1;

function feeds(named) {
  const out = {};
  for (const [k, v] of Object.entries(named)) out[k] = decode(v);
  return out;
}

window.keiryoBench = {
  async open(modelB64, wantThreads) {
    if (!session) {
      threads = self.crossOriginIsolated ? Math.max(1, wantThreads) : 1;
      ort.env.wasm.numThreads = threads;
    }
    const bin = atob(modelB64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    if (session) await session.release();
    session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    return { inputs: session.inputNames, outputs: session.outputNames };
  },
  async run(named) {
    const res = await session.run(feeds(named));
    return session.outputNames.map((n) => encode(res[n]));
  },
  async timed(named, warmup, n) {
    const f = feeds(named);
    for (let i = 0; i < warmup; i++) await session.run(f);
    const ms = [];
    for (let i = 0; i < n; i++) {
      const t = performance.now();
      await session.run(f);
      ms.push(performance.now() - t);
    }
    return ms;
  },
  info() {
    return { user_agent: navigator.userAgent, onnxruntime_web: ort.env.versions.web, ...wasmFeatures(), wasm_threads: threads };
  },
};
document.getElementById("state").textContent = "ready";
