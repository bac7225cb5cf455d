// The two engines: the server (OIP v2 REST with binary tensors, same-origin session cookie) and the
// browser (onnxruntime-web, WebAssembly with SIMD; threads when the page is cross-origin isolated).
// Both answer infer(tensor) -> {scores, timing: {network, inference}} (milliseconds).

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Unreachable extends Error {}

async function errorOf(resp) {
  let msg = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) msg = body.error;
  } catch (_) {
    /* not JSON */
  }
  return new HttpError(resp.status, msg);
}

export async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { credentials: "same-origin", ...options });
  } catch (e) {
    throw new Unreachable(`the server at ${location.origin} cannot be reached (${e.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

function serverTiming(resp, name) {
  const h = resp.headers.get("Server-Timing") || "";
  for (const part of h.split(",")) {
    const [n, ...params] = part.trim().split(";");
    if (n === name) {
      for (const p of params) {
        const [k, v] = p.trim().split("=");
        if (k === "dur") return parseFloat(v);
      }
    }
  }
  return null;
}

export class ServerEngine {
  constructor(model) {
    this.model = model;
    this.name = "server";
  }

  describe() {
    return "server (OIP v2, binary tensors)";
  }

  async infer(tensor) {
    const m = this.model;
    const header = JSON.stringify({
      inputs: [{ name: m.input.name, shape: m.input.shape, datatype: "FP32", parameters: { binary_data_size: tensor.byteLength } }],
      outputs: [{ name: m.output.name, parameters: { binary_data: true } }],
    });
    const head = new TextEncoder().encode(header);
    const body = new Uint8Array(head.length + tensor.byteLength);
    body.set(head, 0);
    body.set(new Uint8Array(tensor.buffer, tensor.byteOffset, tensor.byteLength), head.length);
    const t0 = performance.now();
    const resp = await api(`/v2/models/${encodeURIComponent(m.served)}/versions/${encodeURIComponent(m.version)}/infer`, {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(head.length) },
      body,
    });
    const buf = await resp.arrayBuffer();
    const total = performance.now() - t0;
    const n = parseInt(resp.headers.get("Inference-Header-Content-Length") || "", 10);
    let scores;
    if (Number.isFinite(n)) {
      const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 0, n)));
      const out = meta.outputs[0];
      const size = out.parameters && out.parameters.binary_data_size;
      scores = new Float32Array(buf.slice(n, n + size));
    } else {
      scores = Float32Array.from(JSON.parse(new TextDecoder().decode(buf)).outputs[0].data);
    }
    const inference = serverTiming(resp, "infer");
    return { scores, timing: { network: inference === null ? total : Math.max(0, total - inference), inference: inference ?? 0 } };
  }

  async close() {}
}

let ortModule = null;

async function loadOrt() {
  if (!ortModule) {
    ortModule = await import("./vendor/ort.wasm.min.mjs");
    const ort = ortModule;
    ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
    const cores = navigator.hardwareConcurrency || 1;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, cores) : 1;
    ort.env.wasm.simd = true;
    ort.env.logLevel = "error";
  }
  return ortModule;
}

// what the WebAssembly engine runs with here: recorded beside every in-browser figure
export function wasmFeatures() {
  // the smallest module using a v128 instruction: validates only where SIMD is supported
  const simdProbe = new Uint8Array([
    0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11,
  ]);
  return {
    simd: WebAssembly.validate(simdProbe),
    threads_available: self.crossOriginIsolated === true && typeof SharedArrayBuffer !== "undefined",
    cross_origin_isolated: self.crossOriginIsolated === true,
    hardware_concurrency: navigator.hardwareConcurrency || null,
  };
}

export class BrowserEngine {
  constructor(model) {
    this.model = model;
    this.name = "browser";
    this.session = null;
  }

  describe() {
    const f = wasmFeatures();
    const threads = ortModule ? ortModule.env.wasm.numThreads : 1;
    return `in-browser (onnxruntime-web, wasm${f.simd ? " SIMD" : ""}, ${threads} thread${threads === 1 ? "" : "s"})`;
  }

  async open(bytes) {
    const ort = await loadOrt();
    this.ort = ort;
    this.session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  }

  async infer(tensor) {
    const m = this.model;
    const t0 = performance.now();
    const feeds = { [m.input.name]: new this.ort.Tensor("float32", tensor, m.input.shape) };
    const out = await this.session.run(feeds);
    const inference = performance.now() - t0;
    const scores = Float32Array.from(out[m.output.name].data);
    return { scores, timing: { network: 0, inference } };
  }

  async close() {
    if (this.session) await this.session.release();
    this.session = null;
  }
}
