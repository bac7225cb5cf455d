// Build the page into keiryo/app/static (package data): the page's plain ES modules as they are, and the
// onnxruntime-web files the WebAssembly engine needs (its ESM entry, the SIMD+threads wasm and its loader).
// Run by scripts/setup; `node web/build.mjs` by hand. Needs `npm ci` in web/ first.
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "keiryo", "app", "static");
const ort = join(here, "node_modules", "onnxruntime-web");
if (!existsSync(ort)) {
  console.error("web/build.mjs: node_modules/onnxruntime-web is missing; run `npm ci` in web/ first");
  process.exit(2);
}
const version = JSON.parse(readFileSync(join(ort, "package.json"), "utf8")).version;
rmSync(out, { recursive: true, force: true });
mkdirSync(join(out, "vendor"), { recursive: true });
cpSync(join(here, "src"), out, { recursive: true });
for (const f of ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]) {
  cpSync(join(ort, "dist", f), join(out, "vendor", f));
}
writeFileSync(join(out, "vendor", "VERSION.json"), JSON.stringify({ "onnxruntime-web": version }) + "\n");
console.log(`web/build.mjs: page and onnxruntime-web ${version} -> ${out}`);
