#!/usr/bin/env python
"""A sensor-series regressor through keiryo: train, int8, measured side by side in one run.

Data: ``sensors`` (generated multichannel windows; the target is the next reading of channel 0).
Model: ``zoo:sensor`` (a dilated residual 1-D CNN). Task: regression (MAE, RMSE, R² with 95% intervals).
Candidates: fp32 ONNX, int8 static, fp16, benchmarked in fresh processes interleaved over rounds.

    .venv/bin/python bench/regression.py        # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _checks import cpu_line, interleaved, report

from keiryo.benchmark import BenchConfig
from keiryo.data import DataSpec, load_data
from keiryo.measure import bench_sample
from keiryo.model import load_model
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    out = Path(tempfile.mkdtemp(prefix="keiryo-bench-regression-"))
    data = load_data(DataSpec(source="sensors", options={"samples": 4000, "channels": 3, "length": 64}, seed=0))
    task = get_task("regression")
    h = load_model("zoo:sensor", data, output_name="prediction", options={"width": 64, "blocks": 4})
    task.bind(h.output_names)
    res = train(h, data, task, TrainConfig(epochs=args.epochs, lr=2e-3, patience=8), progress=True, description="train sensor")
    print(f"trained: test MAE {res.test_metrics['mae']:.4f}, R² {res.test_metrics['r2']:.4f} ({res.seconds:.0f} s)")
    opts = RunOptions(bench=BenchConfig(threads=args.threads, iterations=50, warmup=5, throughput_iterations=3))
    results = compress(h, data, [load_recipe("int8"), load_recipe("fp16")], out / "run", opts=opts, task=task)
    cands = {c["name"]: c for c in results["candidates"] if c["status"] == "ok"}
    names = [n for n in ("fp32", "int8", "fp16") if n in cands]
    cfg = BenchConfig(threads=args.threads, iterations=args.iterations, warmup=30)
    lat = interleaved({n: out / "run" / cands[n]["artifact"] for n in names}, "onnxruntime", bench_sample(data), cfg, args.rounds)
    print("\n" + cpu_line(args.threads))
    print(
        f"{'model':8} {'MAE':>8} {'[95% CI]':>18} {'vs fp32':>8} {'R²':>7} {'size KB':>8} {'x smaller':>9} {'p50 ms':>8} {'x faster':>8}"
    )
    ref = cands["fp32"]["metrics"]
    med = {n: lat[n]["p50"] for n in names}
    for n in names:
        m = cands[n]["metrics"]
        lo, hi = m["mae_ci95"]
        print(
            f"{n:8} {m['mae']:8.4f} [{lo:.4f}, {hi:.4f}] {(m['mae'] / ref['mae'] - 1) * 100:+7.2f}% {m['r2']:7.4f} "
            f"{m['size_bytes'] / 1e3:8.1f} {ref['size_bytes'] / m['size_bytes']:9.2f} {med[n]:8.3f} {med['fp32'] / med[n]:8.2f}"
        )
    i8 = cands["int8"]["metrics"]
    checks = [
        ("the model learned (test R² >= 0.9)", ref["r2"] >= 0.9, f"{ref['r2']:.4f}"),
        ("int8 MAE within 2% of the fp32 model's", i8["mae"] <= ref["mae"] * 1.02, f"{(i8['mae'] / ref['mae'] - 1) * 100:+.2f}%"),
        ("int8 >= 3x smaller", ref["size_bytes"] / i8["size_bytes"] >= 3, f"{ref['size_bytes'] / i8['size_bytes']:.2f}x"),
    ]
    return report(checks, out)


if __name__ == "__main__":
    raise SystemExit(main())
