#!/usr/bin/env python
"""keiryo vs the field's quantizers, same model, data and machine, measured side by side in one run.

- keiryo default PTQ (`int8` recipe) and keiryo's search result (`optimize`, budget: accuracy drop <= 1 pt,
  templates ptq + prune_distill, at most 15 minutes);
- onnxruntime `quantize_static` with default settings; NNCF `nncf.quantize` (defaults) on the same ONNX model;
  PyTorch dynamic quantization (`torch.ao.quantization.quantize_dynamic`, Linear layers, run in torch).

All ONNX files run on onnxruntime in isolated processes, interleaved over several rounds. Prints a markdown table
(accuracy drop, size ratio, p50/p95 ratio vs fp32 onnxruntime) and writes it to --md.

    .venv/bin/python bench/peers.py --reuse keiryo-demo --md docs/peers.md     # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _checks import report

from keiryo.benchmark import BenchConfig, measure_file, run_benchmark
from keiryo.demo import demo_model
from keiryo.evaluate import predict, size_of
from keiryo.export import export
from keiryo.machine import cpu, library_versions
from keiryo.measure import bench_sample
from keiryo.pipeline import RunOptions
from keiryo.runtime import open_session
from keiryo.search import Constraint
from keiryo.search.optimize import OptimizeConfig, optimize

warnings.simplefilter("ignore")


def top1(session: Any, data: Any) -> float:
    """Top-1 accuracy of a session on the test split (the logits are the model's first output)."""
    logits = predict(session, data.test)[0]
    return float((logits.argmax(1) == data.test.targets.numpy()).mean())


def ort_accuracy(path: Path, data: Any) -> float:
    with open_session("onnxruntime", path) as s:
        return top1(s, data)


def calib_feeds(src: Path, data: Any) -> list[dict[str, np.ndarray]]:
    """One feed per calibration sample, keyed by the ONNX file's input names (digits: ``image``)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    calib = data.calib.numpy()
    if set(names) != set(calib):
        if len(names) != len(calib):
            raise SystemExit(f"{src}: ONNX inputs {names} do not match the calibration arrays {sorted(calib)}")
        calib = dict(zip(names, calib.values(), strict=True))  # same order as the model's IOSpec
    return [{k: calib[k][i : i + 1] for k in names} for i in range(len(data.calib))]


def ort_default_static(src: Path, dst: Path, data: Any) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class R(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib_feeds(src, data))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(src), str(dst), R())  # every other argument at its default


def nncf_available() -> bool:
    return importlib.util.find_spec("nncf") is not None


def nncf_quantize(src: Path, dst: Path, data: Any) -> None:
    import nncf
    import onnx

    model = onnx.load(str(src))
    ds = nncf.Dataset(calib_feeds(src, data))
    onnx.save(nncf.quantize(model, ds), str(dst))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, help="a `keiryo demo` output directory (its baseline.safetensors)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=840.0, help="search time limit in seconds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--md", type=Path, help="also write the markdown table here")
    ap.add_argument("--skip-nncf", action="store_true", help="leave out the NNCF row (needs `pip install nncf`)")
    args = ap.parse_args()
    use_nncf = not args.skip_nncf
    if use_nncf and not nncf_available():
        print("NNCF is not installed (`.venv/bin/pip install nncf`); its row is left out of this run")
        use_nncf = False
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-peers-"))
    data, handle, _ = demo_model(args.reuse / "baseline.safetensors" if args.reuse else None)
    fp32 = export(handle, "onnx", work / "fp32.onnx").path

    t0 = time.monotonic()
    cfg = OptimizeConfig(
        constraints=[Constraint(metric="accuracy_drop", op="<=", bound=1.0)],
        trials=args.trials,
        timeout_s=args.timeout,
        templates=["ptq", "prune_distill"],
    )
    res = optimize(handle, data, work / "search", cfg, RunOptions(bench=BenchConfig(threads=1)))
    search_s = time.monotonic() - t0
    cands = {c["name"]: c for c in res["candidates"] if c.get("status") == "ok"}
    if "t0000-ptq" not in cands or res.get("best") is None:
        why = "no search candidate met the budget" if res.get("best") is None else "trial t0000-ptq did not succeed"
        print(f"{why}; see {work / 'search' / 'results.json'}")
        return 2
    files: dict[str, Path] = {
        "fp32 onnxruntime": fp32,
        "keiryo PTQ (int8 recipe)": work / "search" / cands["t0000-ptq"]["artifact"],
        "keiryo search best": work / "search" / res["best_artifact"],
    }
    ort_default_static(fp32, work / "ort_default.onnx", data)
    files["onnxruntime quantize_static (defaults)"] = work / "ort_default.onnx"
    if use_nncf:
        nncf_quantize(fp32, work / "nncf.onnx", data)
        files["NNCF nncf.quantize (defaults)"] = work / "nncf.onnx"

    sample = bench_sample(data)
    bench = BenchConfig(threads=1, iterations=300, warmup=50)
    p50: dict[str, list[float]] = {n: [] for n in files}
    p95: dict[str, list[float]] = {n: [] for n in files}
    for _ in range(args.rounds):
        for n, f in files.items():
            r = measure_file(f, "onnxruntime", sample, bench)
            p50[n].append(r.latency_p50_ms)
            p95[n].append(r.latency_p95_ms)
    rows = {
        n: (ort_accuracy(f, data), size_of(f).size_bytes, statistics.median(p50[n]), statistics.median(p95[n]))
        for n, f in files.items()
    }

    dyn = torch.ao.quantization.quantize_dynamic(handle.module.eval(), {torch.nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as td:
        torch.save(dyn.state_dict(), Path(td) / "dyn.pt")
        dyn_size = (Path(td) / "dyn.pt").stat().st_size
    # the handle's I/O (input named "image" for digits) with the quantized module
    with open_session("torch", dataclasses.replace(handle, module=dyn), 1) as s:
        dyn_acc = top1(s, data)
        r = run_benchmark(s, sample, bench)
    rows["PyTorch quantize_dynamic (Linear, torch runtime)"] = (dyn_acc, dyn_size, r.latency_p50_ms, r.latency_p95_ms)

    base_acc, base_size, base_p50, base_p95 = rows["fp32 onnxruntime"]
    c = cpu()
    versions = library_versions(("nncf",))
    nncf_version = f"NNCF {versions.get('nncf')}" if use_nncf else "NNCF not installed (no row)"
    lines = [
        f"Demo model (zoo MobileNetV2 on digits 16x16), measured on {c['model']} (int8 dot-product: "
        f"{', '.join(c['int8_isa']) or 'none'}), 1 thread, batch 1; onnxruntime {versions.get('onnxruntime')}, "
        f"{nncf_version}, torch {torch.__version__}. Ratios vs fp32 onnxruntime "
        f"(p50 {base_p50:.3f} ms). keiryo's search took {search_s / 60:.1f} min ({res['search']['trials_finished']} trials).",
        "",
        "| method | accuracy % | drop pt | size ratio | p50 ms | p50 speed-up | p95 speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, (acc, size, a, b) in rows.items():
        lines.append(
            f"| {n} | {acc * 100:.2f} | {(base_acc - acc) * 100:.2f} | {base_size / size:.2f}x | {a:.3f} | "
            f"{base_p50 / a:.2f}x | {base_p95 / b:.2f}x |"
        )
    best_recipe = cands[res["best"]]["recipe"]
    lines += [
        "",
        f"keiryo search best: `{res['best']}`, steps: "
        + " -> ".join(f"{s['type']}{s.get('params') or ''}" for s in best_recipe["steps"]),
    ]
    table = "\n".join(lines)
    print("\n" + table + "\n")
    if args.md:
        args.md.write_text(
            "# keiryo vs peers\n\nReproduce: `.venv/bin/python bench/peers.py --reuse keiryo-demo`.\n\n" + table + "\n"
        )
    peers = {n: v for n, v in rows.items() if n not in ("fp32 onnxruntime", "keiryo PTQ (int8 recipe)", "keiryo search best")}
    best = rows["keiryo search best"]
    best_peer_acc = max(v[0] for v in peers.values())
    fastest_peer = min(v[2] for v in peers.values())
    checks = [
        (
            "search best at least as accurate as the best peer PTQ",
            best[0] >= best_peer_acc,
            f"{best[0]:.2%} vs {best_peer_acc:.2%}",
        ),
        ("search best p50 >= 1.5x faster than the fastest peer", fastest_peer / best[2] >= 1.5, f"{fastest_peer / best[2]:.2f}x"),
        ("search finished within 15 minutes", search_s <= 900, f"{search_s / 60:.1f} min"),
    ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
