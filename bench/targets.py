#!/usr/bin/env python
"""TFLite / Core ML figures (issue: targets), measured side by side in one run.

Exports the demo model with every TFLite variant (fp32, fp16, dynamic-range int8, full-integer
int8 with per-channel and per-tensor weight scales) and the ONNX fp32/int8 pair, measures
accuracy on each file's own runtime and p50 at batch 1 in fresh processes, interleaved over
several rounds. Core ML packages (fp32, fp16, int8 weights, 4-bit palettes, 16-cluster palettes)
are validated structurally and their weight sizes compared; Core ML cannot predict on Linux.

    .venv/bin/python bench/targets.py --reuse keiryo-demo     # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _checks import report

from keiryo.benchmark import BenchConfig, measure_file
from keiryo.demo import demo_model
from keiryo.machine import cpu
from keiryo.measure import bench_sample
from keiryo.pipeline import RunOptions, load_recipe
from keiryo.pipeline.runner import export_variant

RUNTIME_VARIANTS = [
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("tflite", "fp32"),
    ("tflite", "fp16"),
    ("tflite", "int8-dynamic"),
    ("tflite", "int8"),
    ("tflite", "int8-tensorwise"),
]
COREML_VARIANTS = ["fp32", "fp16", "int8", "palettize4", "cluster16-palettize"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, help="a `keiryo demo` output directory (its baseline.safetensors)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    weights = args.reuse / "baseline.safetensors" if args.reuse else None
    data, handle, _ = demo_model(weights)
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-targets-"))
    opts = RunOptions(progress=False)
    suffix = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
    files: dict[tuple[str, str], dict] = {}
    for fmt, v in RUNTIME_VARIANTS + [("coreml", v) for v in COREML_VARIANTS]:
        rep = export_variant(load_recipe(v, target=fmt), handle, data, work / f"{fmt}-{v}{suffix[fmt]}", opts)
        files[(fmt, v)] = rep
        print(f"exported {fmt} {v}", flush=True)

    sample = bench_sample(data)
    cfg = BenchConfig(threads=args.threads, iterations=args.iterations, warmup=50)
    p50: dict[tuple[str, str], list[float]] = {k: [] for k in RUNTIME_VARIANTS}
    for _ in range(args.rounds):
        for k in RUNTIME_VARIANTS:
            rep = files[k]
            p50[k].append(measure_file(rep["artifact"].path, rep["artifact"].runtime, sample, cfg).latency_p50_ms)
    med = {k: statistics.median(v) for k, v in p50.items()}

    c = cpu()
    print(
        f"\nCPU: {c['model']} ({c['arch']}), int8 dot-product: {', '.join(c['int8_isa']) or 'none'}; "
        f"{args.threads} thread(s); median of {args.rounds} interleaved rounds x {args.iterations} runs at batch 1\n"
    )
    torch_acc = files[("onnx", "fp32")]["torch_metrics"]["accuracy"]
    print(f"torch fp32 test accuracy {torch_acc:.2%}\n")
    print(
        f"{'format':7} {'variant':16} {'acc %':>7} {'drop pt':>8} {'size MB':>8} {'x smaller':>9} {'p50 ms':>8} {'x faster':>9}"
    )
    size = {k: files[k]["artifact"].size_bytes for k in files if k[0] != "coreml"}
    for k in RUNTIME_VARIANTS:
        fmt, v = k
        ref = (fmt, "fp32")
        acc = files[k]["metrics"]["accuracy"]
        print(
            f"{fmt:7} {v:16} {acc * 100:7.2f} {(files[ref]['metrics']['accuracy'] - acc) * 100:8.2f} {size[k] / 1e6:8.2f} "
            f"{size[ref] / size[k]:9.2f} {med[k]:8.3f} {med[ref] / med[k]:9.2f}"
        )
    print(f"\n{'Core ML':16} {'weights MB':>10} {'x smaller':>9}  compressed weight ops (validated structurally)")
    cw = {v: files[("coreml", v)]["info"]["weights_bytes"] for v in COREML_VARIANTS}
    for v in COREML_VARIANTS:
        info = files[("coreml", v)]["info"]
        extra = (
            f", {info['weights_with_cluster_centroids']} weights stored with the cluster centroids"
            if "weights_with_cluster_centroids" in info
            else ""
        )
        print(f"{v:16} {cw[v] / 1e6:10.2f} {cw['fp32'] / cw[v]:9.2f}  {info['compressed_weight_ops'] or '-'}{extra}")

    t32, t8c, t8t = (("tflite", "fp32"), ("tflite", "int8"), ("tflite", "int8-tensorwise"))

    def drop(k: tuple[str, str]) -> float:
        return (files[(k[0], "fp32")]["metrics"]["accuracy"] - files[k]["metrics"]["accuracy"]) * 100

    best8 = t8t if size[t32] / size[t8t] >= size[t32] / size[t8c] else t8c
    checks = [
        (
            f"TFLite full-int8 ({best8[1]}) >= 3.5x smaller than TFLite fp32",
            size[t32] / size[best8] >= 3.5,
            f"{size[t32] / size[best8]:.2f}x (per-channel int8: {size[t32] / size[t8c]:.2f}x)",
        ),
        (f"TFLite full-int8 ({best8[1]}) drop <= 0.5 pt", drop(best8) <= 0.5, f"{drop(best8):.2f} pt"),
        ("TFLite full-int8 (per-channel) drop <= 0.5 pt", drop(t8c) <= 0.5, f"{drop(t8c):.2f} pt"),
        (
            "TFLite full-int8 p50 faster than TFLite fp32",
            med[t32] > med[best8] and med[t32] > med[t8c],
            f"{med[t32] / med[best8]:.2f}x ({best8[1]}), {med[t32] / med[t8c]:.2f}x (per-channel)",
        ),
        (
            "TFLite int8 vs ONNX int8 p50, side by side (informational)",
            True,
            f"LiteRT {med[t8c]:.3f} ms vs onnxruntime {med[('onnx', 'int8')]:.3f} ms: {med[('onnx', 'int8')] / med[t8c]:.2f}x",
        ),
        (
            "Core ML 4-bit palettized weights >= 6x smaller than fp32",
            cw["fp32"] / cw["palettize4"] >= 6,
            f"{cw['fp32'] / cw['palettize4']:.2f}x (cluster16-palettize: {cw['fp32'] / cw['cluster16-palettize']:.2f}x)",
        ),
    ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
