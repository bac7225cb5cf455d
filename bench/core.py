#!/usr/bin/env python
"""Core-loop figures (issue: core loop), measured side by side in one run.

Trains the demo model (or reuses a `keiryo demo` output with --reuse DIR), then
benchmarks fp32 ONNX, int8 static and fp16 in fresh processes, interleaved over
several rounds so drift on a noisy machine hits every candidate alike. Prints the
figures, the ratios against fp32 onnxruntime, and whether each target is met.

    .venv/bin/python bench/core.py                 # ~4 min on 2 cores
    .venv/bin/python bench/core.py --reuse keiryo-demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _checks import report

from keiryo.benchmark import BenchConfig, measure_file
from keiryo.data import load_data
from keiryo.demo import DEMO_DATA, run_demo
from keiryo.machine import cpu
from keiryo.measure import bench_sample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, help="an existing `keiryo demo` output directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    out = args.reuse or Path(tempfile.mkdtemp(prefix="keiryo-bench-core-")) / "demo"
    results = json.loads((out / "results.json").read_text()) if args.reuse else run_demo(out)
    if results.get("schema_version", 1) < 2:
        print(f"{out}: results.json schema {results.get('schema_version', 1)} is older than 2; rerun `keiryo demo`")
        return 2
    sample = bench_sample(load_data(DEMO_DATA))
    cands = {c["name"]: c for c in results["candidates"] if c.get("status", "ok") == "ok"}
    for c in results["candidates"]:
        if c.get("status") == "failed":
            print(f"candidate {c['name']} failed at {c.get('failed_step')}: {c.get('error')}")
    missing = [n for n in ("fp32", "int8", "fp16") if n not in cands]
    if missing:
        print(f"{out}: no successful {', '.join(missing)} candidate(s) to measure")
        return 2
    names = ["fp32", "int8", "fp16"]
    cfg = BenchConfig(threads=args.threads, iterations=args.iterations, warmup=50)
    p50: dict[str, list[float]] = {n: [] for n in names}
    p95: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            r = measure_file(out / cands[n]["artifact"], "onnxruntime", sample, cfg)
            p50[n].append(r.latency_p50_ms)
            p95[n].append(r.latency_p95_ms)
    c = cpu()
    print(
        f"\nCPU: {c['model']} ({c['arch']}), int8 dot-product: {', '.join(c['int8_isa']) or 'none'}; "
        f"{args.threads} thread(s); median of {args.rounds} interleaved rounds x {args.iterations} runs at batch 1\n"
    )
    base = results["baseline"]["metrics"]
    ref = cands["fp32"]["metrics"]
    ref_p50 = statistics.median(p50["fp32"])

    def ci(m: dict, key: str) -> str:
        lo, hi = m.get(f"{key}_ci95") or (float("nan"), float("nan"))
        return f"{lo * 100:.1f}-{hi * 100:.1f}"

    print(f"test samples: {base.get('samples', '?')}; accuracy 95% intervals (Wilson) in the 'acc CI95' column\n")
    cols = ("acc %", 7), ("acc CI95", 11), ("drop pt", 8), ("fidelity %", 10), ("size MB", 8), ("x smaller", 9)
    cols += ("p50 ms", 8), ("p95 ms", 8)
    print(f"{'model':8} " + " ".join(f"{c:>{w}}" for c, w in cols) + f" {'x faster p50':>12}")
    print(f"{'torch':8} {base['accuracy'] * 100:7.2f} {ci(base, 'accuracy'):>11}")
    for n in names:
        m = cands[n]["metrics"]
        print(
            f"{n:8} {m['accuracy'] * 100:7.2f} {ci(m, 'accuracy'):>11} {(ref['accuracy'] - m['accuracy']) * 100:8.2f} "
            f"{m['fidelity'] * 100:10.2f} {m['size_bytes'] / 1e6:8.2f} {ref['size_bytes'] / m['size_bytes']:9.2f} "
            f"{statistics.median(p50[n]):8.3f} {statistics.median(p95[n]):8.3f} {ref_p50 / statistics.median(p50[n]):12.2f}"
        )
    i8, f16 = cands["int8"]["metrics"], cands["fp16"]["metrics"]
    checks = [
        ("baseline test accuracy >= 97%", base["accuracy"] >= 0.97, f"{base['accuracy']:.2%}"),
        (
            "int8 file >= 3.5x smaller than fp32 ONNX",
            ref["size_bytes"] / i8["size_bytes"] >= 3.5,
            f"{ref['size_bytes'] / i8['size_bytes']:.2f}x",
        ),
        (
            "int8 accuracy drop <= 0.5 pt",
            (ref["accuracy"] - i8["accuracy"]) * 100 <= 0.5,
            f"{(ref['accuracy'] - i8['accuracy']) * 100:.2f} pt",
        ),
        (
            "int8 p50 >= 2x faster (1 thread)",
            ref_p50 / statistics.median(p50["int8"]) >= 2.0,
            f"{ref_p50 / statistics.median(p50['int8']):.2f}x",
        ),
        (
            "fp16 about 2x smaller",
            1.8 <= ref["size_bytes"] / f16["size_bytes"] <= 2.1,
            f"{ref['size_bytes'] / f16['size_bytes']:.2f}x",
        ),
        ("fp16 fidelity >= 99.5%", f16["fidelity"] >= 0.995, f"{f16['fidelity']:.2%}"),
    ]
    return report(checks, out)


if __name__ == "__main__":
    raise SystemExit(main())
