#!/usr/bin/env python
"""Privacy figures (issue 15), side by side in one run: DP-SGD accuracy at epsilon 3 and 8 (delta 1e-5) against
non-DP training on the same schedule (mean of 3 seeds), time per epoch, and the DP model then int8 (calibrated
on the private calibration split, and on synthetic inputs that the DP guarantee still covers).

Model: the zoo MLP (one hidden layer of 64) on digits 8x8, 30 epochs, batch 256, lr 0.05, clipping norm 0.5
(the same schedule with and without DP). One thread, so the time per epoch compares like with like.

    nice -n 5 .venv/bin/python bench/privacy.py            # ~6 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from keiryo.benchmark import BenchConfig
from keiryo.data import load_data
from keiryo.data.splits import MemorySplit
from keiryo.machine import cpu
from keiryo.model import load_model
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.privacy.dp import DPConfig, noise_multiplier_for
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train

MODEL, OPTIONS = "zoo:mlp", {"hidden": [64]}


def run(data, seed: int, epsilon: float | None, epochs: int):
    """(model, result, seconds per epoch of training: the one-off noise calibration of a DP run is not counted)."""
    h = load_model(MODEL, data, options=OPTIONS, seed=seed, output_name="logits")
    task = get_task("classification").bind(h.output_names)
    dp = DPConfig(target_epsilon=epsilon, delta=1e-5, max_grad_norm=0.5) if epsilon else None
    cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=256, patience=epochs, seed=seed, threads=1, dp=dp)
    calibration = 0.0
    if dp is not None:  # the noise search (PRV accountant) runs once per run, before the first step: time it apart
        batches = -(-len(data.train) // 256)
        t0 = time.perf_counter()
        noise_multiplier_for(dp, 1 / batches, epochs * batches, 1e-5, "bench")
        calibration = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train(h, data, task, cfg, progress=False)
    return h, res, (time.perf_counter() - t0 - calibration) / res.epochs_run


def int8_accuracy(h, data, calib: MemorySplit, out: Path) -> tuple[float, float]:
    """(fp32 ONNX accuracy, int8 static accuracy), both measured on onnxruntime."""
    d = dataclasses.replace(data, calib=calib)
    opts = RunOptions(bench=BenchConfig(iterations=10, warmup=2, throughput_iterations=2), progress=False)
    res = compress(h, d, [load_recipe("int8")], out, opts=opts, overwrite=True)
    by = {c["name"]: c["metrics"]["accuracy"] for c in res["candidates"] if c.get("status") == "ok"}
    return by["fp32"], by["int8"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    print(f"CPU: {cpu()}; digits train {len(data.train)}, test {len(data.test)}; {MODEL} {OPTIONS}, {args.epochs} epochs")
    rows = {}
    keep = {}
    for eps in (None, 8.0, 3.0):
        accs, times, eps_spent = [], [], []
        for seed in range(args.seeds):
            h, res, per_epoch = run(data, seed, eps, args.epochs)
            accs.append(100 * res.test_metrics["accuracy"])
            times.append(per_epoch)
            if res.privacy:
                eps_spent.append(res.privacy["epsilon"])
            if seed == 0:
                keep[eps] = (h, res)
        name = "non-DP" if eps is None else f"DP eps={eps:g}"
        rows[eps] = (statistics.mean(accs), statistics.pstdev(accs), statistics.mean(times))
        spent = f", epsilon spent {statistics.mean(eps_spent):.3f} (PRV)" if eps_spent else ""
        print(
            f"{name:12s} accuracy {rows[eps][0]:.2f} ± {rows[eps][1]:.2f} % ({args.seeds} seeds), {rows[eps][2]:.3f} s/epoch{spent}",
            flush=True,
        )
    base = rows[None]
    for eps in (8.0, 3.0):
        p = keep[eps][1].privacy
        print(
            f"  eps={eps:g}: {base[0] - rows[eps][0]:+.2f} pt below non-DP, time/epoch {rows[eps][2] / base[2]:.2f}x; "
            f"noise {p['noise_multiplier']:.3f}, sampling rate {p['sample_rate']:.3f}, {p['steps']} steps, RDP eps {p['epsilon_by_accountant']['rdp']}"
        )
    h8 = keep[8.0][0]
    g = torch.Generator().manual_seed(0)
    synthetic = MemorySplit({"image": torch.rand((256, *data.calib.inputs["image"].shape[1:]), generator=g)}, None)
    with tempfile.TemporaryDirectory() as td:
        fp32, priv = int8_accuracy(h8, data, data.calib, Path(td) / "private")
        _, syn = int8_accuracy(h8, data, synthetic, Path(td) / "synthetic")
    print(
        f"DP eps=8 (seed 0) then int8: fp32 ONNX {100 * fp32:.2f} %, int8 calibrated on private data {100 * priv:.2f} % "
        f"({100 * (priv - fp32):+.2f} pt; not covered by the DP guarantee), on synthetic uniform inputs {100 * syn:.2f} % "
        f"({100 * (syn - fp32):+.2f} pt; covered)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
