// Latency over the last N frames: p50 / p95 of each stage.

export class Window {
  constructor(size = 100) {
    this.size = size;
    this.rows = [];
  }

  push(row) {
    this.rows.push(row);
    if (this.rows.length > this.size) this.rows.shift();
  }

  clear() {
    this.rows = [];
  }

  percentile(key, q) {
    const v = this.rows.map((r) => r[key]).filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
    if (!v.length) return null;
    const pos = (v.length - 1) * q;
    const lo = Math.floor(pos);
    const hi = Math.ceil(pos);
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
  }
}

export function softmax(x) {
  let sum = 0;
  let allProb = true;
  for (const v of x) {
    sum += v;
    if (v < 0 || v > 1) allProb = false;
  }
  if (allProb && Math.abs(sum - 1) < 1e-3) return Float32Array.from(x); // already probabilities
  const m = Math.max(...x);
  const e = x.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

export function topk(probs, labels, k) {
  return Array.from(probs, (p, i) => ({ label: labels[i] ?? String(i), index: i, p }))
    .sort((a, b) => b.p - a.p)
    .slice(0, k);
}
