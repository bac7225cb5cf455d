#!/usr/bin/env python
"""What top-1 agreement with fp32 measures on the natural-image crops: how far from 100% perturbations that are not
int8 already take it, and how an int8 file's disagreements compare with Gaussian noise of its own logit error.

Rows, on EfficientNet-Lite (bench/models/efficientnet_lite.py) over the test crops of bench/models/natural_images.py
(labelled by the fp32 model): the fp32 weights cast to float16 and back; the 8-bit crops re-encoded as JPEG; each
int8 file given (``--files``, or ``--build-refit``: the refit with the stem and first depthwise conv float, built
here from the 256 calibration crops), with its logit error (relative L2, mean KL to fp32) and the agreement of the
fp32 logits plus Gaussian noise of ``--noise-scales`` times that file's error. Logit errors move little between
files whose agreement differs by chance; agreement near 97% moves by about a point.

    .venv/bin/python bench/agreement_floor.py --model lite0 --build-refit     # ~8 min on 2 cores

``--calib`` (crops the refit is built from, 256) and ``--refit-columns`` (positions each layer is solved on, 8,192)
show what more data buys the refit.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent / "models"))

from keiryo.data import DataSpec, load_data  # noqa: E402
from keiryo.export import export  # noqa: E402
from keiryo.model import load_model  # noqa: E402
from keiryo.passes.quantize_ort import preprocess  # noqa: E402

MODELS = Path(__file__).parent / "models"


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The first output of ``path`` over the images ``x``, on onnxruntime with every usable core (a fidelity
    figure, not a latency)."""
    from keiryo.evaluate import predict
    from keiryo.machine import usable_cores
    from keiryo.runtime import open_session

    with open_session("onnxruntime", path, usable_cores()) as s:
        return predict(s, {"image": x})[0]


def errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(agreement %, relative L2 logit error, mean KL(fp32 || out))."""

    def logp(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = logp(ref), logp(out)
    kl = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    return float((out.argmax(1) == ref.argmax(1)).mean() * 100), float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), kl


def fp16_weights(path: Path, out: Path) -> Path:
    """``path`` with every fp32 weight cast to float16 and back, written to ``out``."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), init.name))
    onnx.save(m, str(out))
    return out


def jpeg(x: np.ndarray, quality: int, mean: float, std: float) -> np.ndarray:
    """The normalized crops ``x`` back to 8 bits, through JPEG at ``quality``, normalized again."""
    from PIL import Image

    u8 = np.clip(np.round((x * std + mean) * 255), 0, 255).astype(np.uint8)
    out = []
    for a in u8:
        buf = io.BytesIO()
        Image.fromarray(a.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf), dtype=np.float32).transpose(2, 0, 1) / 255)
    return ((np.stack(out) - mean) / std).astype(np.float32)


def build_refit(pre: Path, out: Path, calib: dict[str, np.ndarray], columns: int | None = None) -> Path:
    """The ``refit`` rung's file with the stem and the first depthwise conv (the first two layers) float; ``columns``:
    the positions each layer is solved on (the refit's ``max_columns``, 8,192 by default; not a pass option)."""
    import functools

    import onnx

    import keiryo.passes.quantize_refit as quantize_refit
    from keiryo.passes.quantize_auto import RUNGS
    from keiryo.passes.quantize_ort import Int8StaticConfig, quantize_int8_static

    layers = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in ("Conv", "Gemm")]
    opts = {**RUNGS["refit"], "float_when_free": 0}
    real = quantize_refit.refit_sequentially
    if columns:
        quantize_refit.refit_sequentially = functools.partial(real, max_columns=columns)
    try:
        quantize_int8_static(pre, out, calib, Int8StaticConfig(**opts), exclude=layers[:2])
    finally:
        quantize_refit.refit_sequentially = real
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--files", nargs="*", type=Path, default=[], help="int8 ONNX files of this model to measure")
    ap.add_argument("--build-refit", action="store_true", help="also build and measure the refit, first 2 layers float")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops the refit is built from")
    ap.add_argument("--refit-columns", type=int, default=None, help="positions each layer is refitted on (8192)")
    ap.add_argument("--jpeg", nargs="*", type=int, default=[95, 90])
    ap.add_argument("--noise-scales", nargs="*", type=float, default=[0.5, 0.7, 1.0])
    args = ap.parse_args()
    import efficientnet_lite

    spec = DataSpec(
        source=f"{MODELS / 'natural_images.py'}:crops",
        options={"model": args.model, "test": args.test},
        eval_size=args.test,
        calib_size=args.calib,
        seed=0,
    )
    data = load_data(spec)
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-floor-"))
    h = load_model(f"{MODELS / 'efficientnet_lite.py'}:{args.model}", data, output_name="logits")
    pre = preprocess(export(h, "onnx", work / "fp32.onnx").path, work / "pre.onnx")
    x = data.test.numpy()["image"]
    ref = logits(pre, x)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p = np.sort(p / p.sum(1, keepdims=True), 1)
    margin = p[:, -1] - p[:, -2]
    print(f"EfficientNet-{args.model}, {len(x)} test crops: top-1 margin < 0.05 on {np.mean(margin < 0.05) * 100:.1f}%, "
          f"< 0.01 on {np.mean(margin < 0.01) * 100:.1f}%\n")  # fmt: skip
    rows = [("fp16 weights (activations fp32)", errors(logits(fp16_weights(pre, work / "fp16.onnx"), x), ref))]
    mean, std = efficientnet_lite.MEAN[0], efficientnet_lite.STD[0]
    rows += [(f"crops re-encoded as JPEG, quality {q}", errors(logits(pre, jpeg(x, q, mean, std)), ref)) for q in args.jpeg]
    files = list(args.files)
    if args.build_refit:
        t0 = time.monotonic()
        files.append(build_refit(pre, work / "refit-f2.onnx", data.calib.numpy(), args.refit_columns))
        print(f"refit (first 2 layers float) built from {args.calib} crops in {time.monotonic() - t0:.0f} s")
    rng = np.random.default_rng(0)
    for f in files:
        out = logits(f, x)
        rows.append((f"int8 file {f.name}", errors(out, ref)))
        sd = float((out - ref).std())
        for k in args.noise_scales:  # mean of 5 draws
            draws = [errors(ref + rng.normal(0, k * sd, ref.shape), ref) for _ in range(5)]
            rows.append((f"fp32 logits + Gaussian noise, {k:g}x the std of {f.name}'s error", tuple(np.mean(draws, 0))))
    print("| perturbation | agreement % | logit error (rel. L2) | KL |\n|---|---:|---:|---:|")
    for name, (a, e, kl) in rows:
        print(f"| {name} | {a:.1f} | {e * 100:.2f}% | {kl:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
