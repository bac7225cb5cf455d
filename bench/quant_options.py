#!/usr/bin/env python
"""Where int8 loses fidelity on a pretrained CNN: agreement with fp32 of each int8 static option, and of the weights
alone on the int8 grid (activations float), on EfficientNet-Lite (bench/models/efficientnet_lite.py) over natural-image
crops labelled by the fp32 model (bench/models/natural_images.py). Accuracy only: no latency here.

    nice -n 5 .venv/bin/python bench/quant_options.py --model lite0     # ~15 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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
}  # fmt: skip
WEIGHTS_ONLY = {"nearest": ("nearest", "off"), "nearest + bias": ("nearest", "weights"), "gptq": ("gptq", "off"),
                "gptq + bias": ("gptq", "weights")}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--test", type=int, default=1000)
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

    with open_session("onnxruntime", pre, 2) as s:
        logits = predict(s, data.test)[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = np.sort(e / e.sum(1, keepdims=True), 1)
    print(f"EfficientNet-{args.model}, {len(y)} test crops; top-1 margin < 0.05 on {np.mean(p[:, -1] - p[:, -2] < 0.05):.0%}")
    print("| int8 static options | agreement % | seconds |\n|---|---:|---:|")
    for name, kw in OPTIONS.items():
        t0 = time.monotonic()
        try:
            quantize_int8_static(pre, work / "q.onnx", cal, Int8StaticConfig(**kw))
        except Exception as e:  # a calibrator's crash is a row
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
            continue
        print(f"| {name} | {agree(work / 'q.onnx') * 100:.1f} | {time.monotonic() - t0:.0f} |", flush=True)
    for name, (rounding, bc) in WEIGHTS_ONLY.items():
        few = {k: v[:128] for k, v in cal.items()}  # what quantize_int8_static's rounding_samples reads
        round_weights(pre, work / "w.onnx", few, rounding=rounding, bias_correction=bc, per_channel=True)
        print(f"| weights only on the int8 grid, {name} | {agree(work / 'w.onnx') * 100:.1f} | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
