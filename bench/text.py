#!/usr/bin/env python
"""A user's BERT-style encoder (>= 20 M parameters) through keiryo, measured side by side in one run.

The encoder is a model factory file (bench/models/minilm.py, MiniLM-L6 shape, 22.7 M parameters) with
weights in safetensors: random weights (nothing may be downloaded here), so fidelity is measured against
its own fp32 outputs: mean cosine of the sentence embeddings and retrieval recall@1 against them (the
``embedding`` task). Inputs: input_ids + attention_mask (int64), sequence length 64, batch 1, 1 thread.
Candidates: fp32 ONNX, dynamic int8 (weights and the embedding table int8, activations at run time) and
static int8 (calibrated), each benchmarked in fresh processes interleaved over several rounds.

    .venv/bin/python bench/text.py            # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _checks import cpu_line, interleaved, report

from keiryo.benchmark import BenchConfig
from keiryo.data import DataSpec, load_data
from keiryo.measure import bench_sample
from keiryo.model import load_model, save_weights
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.tasks import get_task

FACTORY = str(Path(__file__).parent / "models" / "minilm.py") + ":build"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="keiryo-bench-text-"))
    spec = DataSpec(
        source="tokens", options={"samples": 1000, "vocab": 30522, "seq": args.seq}, eval_size=200, calib_size=64, seed=0
    )
    data = load_data(spec)
    task = get_task("embedding")
    weights = out / "minilm.safetensors"
    if not weights.exists():
        save_weights(load_model(FACTORY, data, output_name="embedding", seed=0).module, weights)
    h = load_model(FACTORY, data, output_name="embedding", weights=weights)
    task.bind(h.output_names)
    params = h.num_params()
    print(f"model {FACTORY}: {params / 1e6:.1f} M parameters, I/O {h.io.describe()}")
    opts = RunOptions(bench=BenchConfig(threads=args.threads, iterations=50, warmup=5, throughput_iterations=3))
    recipes = [load_recipe("int8-dynamic"), load_recipe("int8")]
    results = compress(h, data, recipes, out / "run", opts=opts, overwrite=True, task=task)
    cands = {c["name"]: c for c in results["candidates"] if c["status"] == "ok"}
    failed = [c for c in results["candidates"] if c["status"] != "ok"]
    for c in failed:
        print(f"FAILED {c['name']} at {c.get('failed_step')}: {c.get('error')}")
    names = [n for n in ("fp32", "int8-dynamic", "int8") if n in cands]
    cfg = BenchConfig(threads=args.threads, iterations=args.iterations, warmup=30)
    lat = interleaved({n: out / "run" / cands[n]["artifact"] for n in names}, "onnxruntime", bench_sample(data), cfg, args.rounds)
    print("\n" + cpu_line(args.threads, f", seq {args.seq}"))
    print(
        f"{'model':14} {'cosine':>8} {'[95% CI]':>18} {'recall@1':>9} {'size MB':>8} {'x smaller':>9} {'p50 ms':>8} {'p95 ms':>8} {'x faster':>8}"
    )
    ref = cands["fp32"]["metrics"]
    med = {n: lat[n]["p50"] for n in names}
    for n in names:
        m = cands[n]["metrics"]
        lo, hi = m["cosine_ci95"]
        print(
            f"{n:14} {m['cosine']:8.4f} [{lo:.4f}, {hi:.4f}] {m['recall_at_1']:9.3f} {m['size_bytes'] / 1e6:8.2f} "
            f"{ref['size_bytes'] / m['size_bytes']:9.2f} {med[n]:8.3f} {lat[n]['p95']:8.3f} {med['fp32'] / med[n]:8.2f}"
        )
    dyn = cands.get("int8-dynamic", {}).get("metrics", {})
    checks = [
        ("encoder has >= 20 M parameters", params >= 20e6, f"{params / 1e6:.1f} M"),
        ("no candidate failed", not failed, ", ".join(c["name"] for c in failed) or "none"),
        ("dynamic int8 mean cosine to fp32 >= 0.99", dyn.get("cosine", 0) >= 0.99, f"{dyn.get('cosine', float('nan')):.4f}"),
    ]
    if "int8-dynamic" in cands:
        ratio = ref["size_bytes"] / dyn["size_bytes"]
        speed = med["fp32"] / med["int8-dynamic"]
        checks += [
            ("dynamic int8 weights >= 3.5x smaller", ratio >= 3.5, f"{ratio:.2f}x"),
            ("dynamic int8 p50 >= 1.8x faster than fp32 onnxruntime", speed >= 1.8, f"{speed:.2f}x"),
        ]
    if "int8" in cands:
        checks.append(("static int8 measured beside it", True, f"cosine {cands['int8']['metrics']['cosine']:.4f}, "
                       f"{med['fp32'] / med['int8']:.2f}x faster, {ref['size_bytes'] / cands['int8']['metrics']['size_bytes']:.2f}x smaller"))  # fmt: skip
    return report(checks, out)


if __name__ == "__main__":
    raise SystemExit(main())
