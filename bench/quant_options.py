#!/usr/bin/env python
"""Where int8 loses fidelity on a pretrained CNN: agreement with fp32 of each int8 static option, and of the weights
alone on the int8 grid (activations float), on EfficientNet-Lite (bench/models/efficientnet_lite.py) over natural-image
crops labelled by the fp32 model (bench/models/natural_images.py). Accuracy only: no latency here.

    nice -n 5 .venv/bin/python bench/quant_options.py --model lite0     # ~15 min on 2 busy cores

``--ladder`` runs the ``quantize.int8_auto`` ladder instead (``--rungs``, default all, QAT with distillation last;
``--qat '{"epochs": 2}'`` sets the qat rung's options) at ``--budget`` (validation agreement points below fp32) and
prints each rung's record and the result on the test crops: agreement, size ratio, p50 speed-up (1 thread,
in-process, indicative) and the ladder's wall time.

    nice -n 5 .venv/bin/python bench/quant_options.py --model lite0 --ladder --budget 2
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent / "models"))

from keiryo.data import DataSpec, load_data  # noqa: E402
from keiryo.evaluate import predict  # noqa: E402
from keiryo.export import export  # noqa: E402
from keiryo.model import load_model  # noqa: E402
from keiryo.passes.quantize_ort import Int8StaticConfig, preprocess, quantize_int8_static  # noqa: E402
from keiryo.passes.quantize_rounding import round_weights  # noqa: E402
from keiryo.runtime import open_session  # noqa: E402

MODELS = Path(__file__).parent / "models"
OPTIONS = {
    "minmax, nearest (`int8`)": {},
    "percentile 99.999": {"calibration": "percentile"},
    "entropy": {"calibration": "entropy"},
    "mse": {"calibration": "mse"},
    "mse + bias correction (full)": {"calibration": "mse", "bias_correction": "full"},
    "mse + gptq + bias correction (`int8-gptq`)": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full"},
    "`int8-gptq` + float outputs": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full", "float_outputs": True},
    "`int8-gptq` + float outputs + 1 wide activation": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full",
                                                        "float_outputs": True, "wide_activations": 1},
    "`int8-gptq` + float outputs + 2 wide activations": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full",
                                                         "float_outputs": True, "wide_activations": 2},
    "mse + granularity measured": {"calibration": "mse", "granularity": "measured"},
    "`int8-gptq` + float outputs + granularity measured": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full",
                                                           "float_outputs": True, "granularity": "measured"},
}  # fmt: skip
WEIGHTS_ONLY = {"nearest": ("nearest", "off"), "nearest + bias": ("nearest", "weights"), "gptq": ("gptq", "off"),
                "gptq + bias": ("gptq", "weights")}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--ladder", action="store_true", help="run the int8-auto ladder instead of the option table")
    ap.add_argument("--rungs", default="", help="comma-separated int8-auto rungs (default: all)")
    ap.add_argument("--budget", type=float, default=2.0, help="int8-auto max_accuracy_drop (validation points)")
    ap.add_argument("--qat", default="{}", help="JSON options of the qat rung (QatDistillConfig)")
    ap.add_argument("--only", default="", help="only the option rows whose name matches this regex (no weights-only rows)")
    args = ap.parse_args()
    data = load_data(
        DataSpec(
            source=f"{MODELS / 'natural_images.py'}:crops",
            options={"model": args.model, "test": args.test},
            eval_size=args.test,
            calib_size=256,
            seed=0,
        )
    )
    y = data.test.targets.numpy()
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-qopt-"))
    h = load_model(f"{MODELS / 'efficientnet_lite.py'}:{args.model}", data, output_name="logits")
    pre = preprocess(export(h, "onnx", work / "fp32.onnx").path, work / "pre.onnx")
    cal = data.calib.numpy()

    def agree(path: Path) -> float:
        with open_session("onnxruntime", path, 2) as s:
            return float((predict(s, data.test)[0].argmax(1) == y).mean())

    if args.ladder:
        return ladder(args, data, h, export(h, "onnx", work / "src.onnx"), agree, work)
    with open_session("onnxruntime", pre, 2) as s:
        logits = predict(s, data.test)[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = np.sort(e / e.sum(1, keepdims=True), 1)
    print(f"EfficientNet-{args.model}, {len(y)} test crops; top-1 margin < 0.05 on {np.mean(p[:, -1] - p[:, -2] < 0.05):.0%}")
    print("| int8 static options | agreement % | seconds |\n|---|---:|---:|")
    for name, kw in OPTIONS.items():
        if not re.search(args.only, name):
            continue
        t0 = time.monotonic()
        report: dict[str, Any] = {}
        try:
            quantize_int8_static(pre, work / "q.onnx", cal, Int8StaticConfig(**kw), report=report)
        except Exception as e:  # a calibrator's crash is a row
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
            continue
        print(f"| {name} | {agree(work / 'q.onnx') * 100:.1f} | {time.monotonic() - t0:.0f} |", flush=True)
        if "granularity" in report:
            print("  granularity:", {k: v for k, v in report["granularity"].items() if k not in ("weights", "activations")})
    for name, (rounding, bc) in WEIGHTS_ONLY.items():
        if args.only:
            break
        few = {k: v[:128] for k, v in cal.items()}  # what quantize_int8_static's rounding_samples reads
        round_weights(pre, work / "w.onnx", few, rounding=rounding, bias_correction=bc, per_channel=True)
        print(f"| weights only on the int8 grid, {name} | {agree(work / 'w.onnx') * 100:.1f} | |", flush=True)
    return 0


def ladder(args: argparse.Namespace, data: Any, h: Any, fp32: Any, agree: Any, work: Path) -> int:
    """The int8-auto ladder on the fp32 file, with the torch model as the qat rung's source; the chosen file on test."""
    import json

    from keiryo.evaluate import size_of
    from keiryo.passes import PassContext, apply, get_pass

    params: dict[str, Any] = {"max_accuracy_drop": args.budget, "qat": json.loads(args.qat)}
    if args.rungs:
        params["rungs"] = args.rungs.split(",")
    cfg = get_pass("quantize.int8_auto").config.parse(params)
    ctx = PassContext(data=data, workdir=work / "ladder", threads=1, progress=True, source=h)
    t0 = time.monotonic()
    res = apply(fp32, cfg, ctx)
    wall = time.monotonic() - t0
    info = res.info
    print(f"EfficientNet-{args.model}: int8-auto at {args.budget} pt on {len(data.val)} validation crops; "
          f"ladder {wall / 60:.1f} min; fp32 p50 {info['fp32_latency_p50_ms']} ms (1 thread)")  # fmt: skip
    print("| rung | val drop pt | size | p50 ms | speed-up | seconds | notes |\n|---|---:|---:|---:|---:|---:|---|")
    fp32_size = size_of(fp32.path).size_bytes
    for r in info["ladder"]:
        if r["status"] != "ok":
            print(f"| {r['rung']} | failed: {r['error'][:100]} | | | | {r['seconds']} | |")
            continue
        notes = json.dumps(r.get("qat") or r.get("float_layers") or r.get("wide_activations") or r.get("refit") or "")
        print(f"| {r['rung']} | {r['val_drop']} | {fp32_size / r['size_bytes']:.2f}x | {r['latency_p50_ms']} | "
              f"{info['fp32_latency_p50_ms'] / r['latency_p50_ms']:.2f}x | {r['seconds']} | {notes} |", flush=True)  # fmt: skip
    chosen = next(r for r in info["ladder"] if r["rung"] == info["chosen"] and r["status"] == "ok")
    print(f"chosen {info['chosen']} (budget met: {info['budget_met']}): agreement on {args.test} test crops "
          f"{agree(res.model.path) * 100:.1f}%, {fp32_size / chosen['size_bytes']:.2f}x smaller, "
          f"{info['fp32_latency_p50_ms'] / chosen['latency_p50_ms']:.2f}x faster p50, ladder {wall / 60:.1f} min")  # fmt: skip
    (work / "ladder.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"ladder record: {work / 'ladder.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
