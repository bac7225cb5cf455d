#!/usr/bin/env python
"""Compression-technique figures (issue: compression techniques), measured side by side in one run.

On the demo model (zoo MobileNetV2 on digits 16x16; trained here, or reused from a
`keiryo demo` output with --reuse DIR) it runs, through `keiryo.compress` so every
candidate is measured on onnxruntime:

- structured pruning (30% channels, >= 50% of MACs) + distillation, fp32 and int8 static;
- 16-cluster weight sharing; 80% unstructured sparsity with gradual fine-tuning;

then interleaved latency rounds for fp32 / pruned / pruned+int8, a width-0.25 student
distilled vs trained from labels alone (3 seeds, same schedule), and QAT vs PTQ on an MLP
with activation outliers (3 seeds). Prints the figures and which targets are met.

    .venv/bin/python bench/techniques.py --reuse keiryo-demo     # ~15 min on 2 cores
    .venv/bin/python bench/techniques.py --reuse keiryo-demo --quick --seeds 1 --student-epochs 1 --rounds 1  # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

from _checks import report

from keiryo.benchmark import BenchConfig, measure_file
from keiryo.data import load_data
from keiryo.demo import demo_model
from keiryo.evaluate import predict
from keiryo.export import export
from keiryo.machine import cpu
from keiryo.measure import bench_sample
from keiryo.model import ModelSpec, load_model
from keiryo.passes import PassContext, apply, get_pass
from keiryo.passes._state import FinetuneConfig, finetune
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.runtime import open_session
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, evaluate_torch, train

warnings.simplefilter("ignore")

RECIPES: list[dict[str, Any]] = [
    {"name": "fp32", "steps": []},
    {"name": "int8", "steps": [{"type": "quantize.int8_static"}]},
    {
        "name": "prune-distill",
        "steps": [
            {"type": "prune.structured", "params": {"ratio": 0.3}},
            {"type": "distill", "params": {"train": {"epochs": 12, "lr": 2e-3}}},
        ],
    },
    {
        "name": "prune-distill-int8",
        "steps": [
            {"type": "prune.structured", "params": {"ratio": 0.3}},
            {"type": "distill", "params": {"train": {"epochs": 12, "lr": 2e-3}}},
            {"type": "quantize.int8_static"},
        ],
    },
    {"name": "cluster16", "steps": [{"type": "cluster", "params": {"clusters": 16, "finetune": {"epochs": 2, "lr": 5e-4}}}]},
    {
        "name": "sparse80",
        "steps": [
            {
                "type": "prune.unstructured",
                "params": {"sparsity": 0.8, "schedule": "gradual", "steps": 5, "finetune": {"epochs": 4, "lr": 2e-3}},
            }
        ],
    },
]


def quick(obj: Any) -> Any:
    """A copy of recipe steps with one epoch per training step and at most two pruning steps (--quick)."""
    if isinstance(obj, dict):
        out = {k: quick(v) for k, v in obj.items()}
        if "epochs" in out:
            out["epochs"] = 1
        if isinstance(out.get("steps"), int):
            out["steps"] = min(out["steps"], 2)
        return out
    if isinstance(obj, list):
        return [quick(v) for v in obj]
    return obj


def classification(handle: Any) -> Any:
    """The classification task bound to the model's outputs (the logits are its first output)."""
    return get_task("classification").bind(handle.output_names)


def ort_accuracy(path: Path, data: Any) -> float:
    """Top-1 accuracy of an ONNX file on onnxruntime, on the test split."""
    with open_session("onnxruntime", path) as s:
        logits = predict(s, data.test)[0]
    return float((logits.argmax(1) == data.test.targets.numpy()).mean())


def latency_rounds(out: Path, cands: dict[str, Any], names: list[str], sample: Any, rounds: int) -> dict[str, float]:
    cfg = BenchConfig(threads=1, iterations=300, warmup=50)
    p50: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            p50[n].append(measure_file(out / cands[n]["artifact"], "onnxruntime", sample, cfg).latency_p50_ms)
    return {n: statistics.median(v) for n, v in p50.items()}


def distill_vs_labels(
    data: Any, teacher: Any, seeds: int, epochs: int, resolution: float = 1.0
) -> tuple[list[float], list[float]]:
    """A width-0.25 MobileNetV2 student (computing at ``resolution`` of the input), from labels vs distilled."""
    import torch

    from keiryo.model import ModelHandle
    from keiryo.model.zoo import build
    from keiryo.passes.slim import ResizeInput

    c, h, w = data.input_shape
    inner = (c, round(h * resolution), round(w * resolution))
    labels, distilled = [], []
    sched = FinetuneConfig(epochs=epochs, lr=3e-3, patience=1000)
    for seed in range(seeds):
        for kind in ("labels", "distilled"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = build("mobilenetv2", inner, 10, {"width": 0.25})
            module = ResizeInput(net, inner[1:]) if inner != data.input_shape else net
            s = ModelHandle(module, teacher.io, ModelSpec(source="zoo:mobilenetv2", options={"width": 0.25}))
            task = classification(s)
            ctx = PassContext(data=data, teacher=teacher, seed=seed, task=task)
            if kind == "labels":
                finetune(s, ctx, sched, description="student from labels")
                labels.append(evaluate_torch(s, data.test, task)["accuracy"])
            else:
                cfg = get_pass("distill").config.parse({"train": sched.model_dump(), "alpha": 0.9, "temperature": 4.0})
                r = apply(s, cfg, ctx)
                distilled.append(evaluate_torch(r.model, data.test, task)["accuracy"])
    return labels, distilled


def qat_vs_ptq(seeds: int, work: Path, epochs: int = 20, qat_epochs: int = 10) -> list[tuple[float, float, float]]:
    from keiryo.testing import inject_activation_outliers

    data = load_data("digits")
    rows = []
    for seed in range(seeds):
        h = load_model("zoo:mlp", data, options={"hidden": [256, 128], "dropout": 0.0}, seed=seed, output_name="logits")
        task = classification(h)
        train(h, data, task, TrainConfig(epochs=epochs, seed=seed), progress=False)
        inject_activation_outliers(h.module.net[1], h.module.net[4], channels=2, factor=500.0)
        ctx = PassContext(data=data, workdir=work / f"qat{seed}", seed=seed, task=task)

        def ort(path: Path) -> float:
            return ort_accuracy(path, data)

        fp32 = export(h, "onnx", ctx.workdir / "fp32.onnx")
        ptq = apply(fp32, get_pass("quantize.int8_static").config(), ctx).model
        q = apply(h, get_pass("quantize.qat").config.parse({"train": {"epochs": qat_epochs, "lr": 2e-3}}), ctx).model
        ctx.step_index = 9
        qq = apply(export(q, "onnx", ctx.workdir / "qat.onnx"), get_pass("quantize.int8_static").config(), ctx).model
        rows.append((ort(fp32.path), ort(ptq.path), ort(qq.path)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, help="a `keiryo demo` output directory (its baseline.safetensors)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke test: one epoch per training step (figures not meaningful)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-techniques-"))
    data, handle, _ = demo_model(args.reuse / "baseline.safetensors" if args.reuse else None)
    out = work / "compress"
    recipes = [load_recipe(quick(r) if args.quick else r) for r in RECIPES]
    results = compress(handle, data, recipes, out, opts=RunOptions(bench=BenchConfig(threads=1)))
    failed = [c for c in results["candidates"] if c.get("status") == "failed"]
    for c in failed:
        print(f"candidate {c['name']} failed at {c.get('failed_step')}: {c.get('error')}")
    if failed:
        print(f"{len(failed)} candidate(s) failed; the figures need all of {[r['name'] for r in RECIPES]} (artefacts: {out})")
        return 2
    cands = {c["name"]: c for c in results["candidates"]}
    lat = latency_rounds(out, cands, ["fp32", "prune-distill", "prune-distill-int8", "int8"], bench_sample(data), args.rounds)
    labels, distilled = distill_vs_labels(data, handle, args.seeds, args.student_epochs)
    labels_half, distilled_half = distill_vs_labels(data, handle, args.seeds, args.student_epochs, resolution=0.5)
    qat = qat_vs_ptq(args.seeds, work, *((2, 1) if args.quick else (20, 10)))

    c = cpu()
    base = results["baseline"]["metrics"]
    m = {n: cands[n]["metrics"] for n in cands}
    ref = m["fp32"]
    print(
        f"\nCPU: {c['model']}, int8 dot-product: {', '.join(c['int8_isa']) or 'none'}; 1 thread, batch 1; "
        f"p50 = median of {args.rounds} interleaved rounds x 300 runs\n"
    )
    print(
        f"{'candidate':20} {'acc %':>6} {'drop pt':>7} {'MACs M':>7} {'size MB':>8} {'gzip MB':>8} {'x smaller':>9} "
        f"{'x gzip':>7} {'p50 ms':>7} {'x faster':>8}"
    )
    for n in cands:
        mm = m[n]
        p50 = lat.get(n, mm["latency_p50_ms"])
        print(
            f"{n:20} {mm['accuracy'] * 100:6.2f} {mm['accuracy_drop']:7.2f} {mm['macs'] / 1e6:7.2f} {mm['size_bytes'] / 1e6:8.2f} "
            f"{mm['size_gzip_bytes'] / 1e6:8.2f} {ref['size_bytes'] / mm['size_bytes']:9.2f} "
            f"{ref['size_gzip_bytes'] / mm['size_gzip_bytes']:7.2f} {p50:7.3f} {lat['fp32'] / p50 if n in lat else float('nan'):8.2f}"
        )
    sparse = next(s for s in cands["sparse80"]["steps"] if s["type"] == "prune.unstructured")["info"]["sparsity"]
    print(f"\nsparse80: measured sparsity {sparse:.1%} (no latency gain with dense kernels: gzip is the gain)")
    ml, md = statistics.mean(labels), statistics.mean(distilled)
    hl, hd = statistics.mean(labels_half), statistics.mean(distilled_half)
    for what, lab, dis in (("16x16", labels, distilled), ("8x8 (resolution 0.5)", labels_half, distilled_half)):
        print(
            f"width-0.25 student at {what}, {args.seeds} seeds x {args.student_epochs} epochs: labels only "
            f"{[round(a * 100, 2) for a in lab]} mean {statistics.mean(lab):.2%}; distilled "
            f"{[round(a * 100, 2) for a in dis]} mean {statistics.mean(dis):.2%}"
        )
    for i, (f32, ptq, q) in enumerate(qat):
        print(f"QAT vs PTQ, MLP with 500x activation outliers, seed {i}: fp32 {f32:.2%}  PTQ int8 {ptq:.2%}  QAT int8 {q:.2%}")
    ptq_loss = statistics.mean(f - p for f, p, _ in qat)
    qat_loss = statistics.mean(f - q for f, _, q in qat)
    macs_removed = 1 - m["prune-distill"]["macs"] / ref["macs"]
    checks = [
        ("structured prune removes >= 50% MACs", macs_removed >= 0.5, f"{macs_removed:.1%}"),
        (
            "prune+distill within 1 pt of baseline",
            base["accuracy"] - m["prune-distill"]["accuracy"] <= 0.01,
            f"{(base['accuracy'] - m['prune-distill']['accuracy']) * 100:.2f} pt",
        ),
        (
            "prune+distill fp32 ORT p50 >= 1.5x faster",
            lat["fp32"] / lat["prune-distill"] >= 1.5,
            f"{lat['fp32'] / lat['prune-distill']:.2f}x",
        ),
        (
            "prune+distill+int8 >= 6x smaller",
            ref["size_bytes"] / m["prune-distill-int8"]["size_bytes"] >= 6,
            f"{ref['size_bytes'] / m['prune-distill-int8']['size_bytes']:.2f}x",
        ),
        (
            "prune+distill+int8 >= 3x faster",
            lat["fp32"] / lat["prune-distill-int8"] >= 3,
            f"{lat['fp32'] / lat['prune-distill-int8']:.2f}x",
        ),
        (
            "prune+distill+int8 within 1.5 pt",
            base["accuracy"] - m["prune-distill-int8"]["accuracy"] <= 0.015,
            f"{(base['accuracy'] - m['prune-distill-int8']['accuracy']) * 100:.2f} pt",
        ),
        (
            "distilled width-0.25 student beats labels-only by >= 1 pt (mean), at 16x16",
            md - ml >= 0.01,
            f"{(md - ml) * 100:+.2f} pt",
        ),
        ("... and at resolution 0.5 (8x8)", hd - hl >= 0.01, f"{(hd - hl) * 100:+.2f} pt"),
        (
            "cluster16 gzip >= 3x smaller than fp32 gzip",
            ref["size_gzip_bytes"] / m["cluster16"]["size_gzip_bytes"] >= 3,
            f"{ref['size_gzip_bytes'] / m['cluster16']['size_gzip_bytes']:.2f}x",
        ),
        (
            "cluster16 within 1 pt",
            base["accuracy"] - m["cluster16"]["accuracy"] <= 0.01,
            f"{(base['accuracy'] - m['cluster16']['accuracy']) * 100:.2f} pt",
        ),
        (
            "sparse80 within 1 pt",
            base["accuracy"] - m["sparse80"]["accuracy"] <= 0.01,
            f"{(base['accuracy'] - m['sparse80']['accuracy']) * 100:.2f} pt, gzip {ref['size_gzip_bytes'] / m['sparse80']['size_gzip_bytes']:.2f}x smaller",
        ),
        (
            "QAT recovers >= half of the PTQ loss",
            qat_loss <= ptq_loss / 2,
            f"PTQ loss {ptq_loss * 100:.2f} pt, QAT loss {qat_loss * 100:.2f} pt",
        ),
    ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
