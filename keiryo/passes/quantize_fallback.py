"""``quantize.int8_fallback``: int8 static PTQ with per-layer sensitivity analysis and float fallback.

1. Quantize everything; measure the accuracy drop on the **validation** split
   (never test) against the fp32 file, both run on onnxruntime.
2. If it exceeds ``max_accuracy_drop``: measure each layer's sensitivity (the drop
   when only that layer is quantized; calibration ranges are computed once and cached),
3. and keep the most sensitive layers in float, one at a time, until the budget is met
   (or ``max_float_layers`` is reached, which is reported, not hidden).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.quantize_ort import Int8StaticConfig, calibration_data, finish, preprocess, quantize_int8_static

QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


class Int8FallbackConfig(KeiryoConfig):
    max_accuracy_drop: float = Field(0.5, ge=0.0, description="budget in accuracy points on the validation split")
    max_float_layers: int = Field(8, ge=0, description="stop after keeping this many layers in float")
    quant: Int8StaticConfig = Field(default_factory=Int8StaticConfig)


def _val_accuracy(path: Path, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    from keiryo.evaluate import accuracy, predict
    from keiryo.runtime import open_session

    with open_session("onnxruntime", path, threads) as s:
        return accuracy(predict(s, x), y)


def quantizable_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE]


@register_pass(
    "quantize.int8_fallback",
    Int8FallbackConfig,
    stage="onnx",
    summary="int8 static PTQ + per-layer sensitivity, worst layers kept float until the budget is met",
)
def int8_fallback(model: Artifact, cfg: Int8FallbackConfig, ctx: PassContext) -> PassResult:
    x_cal = calibration_data(ctx, cfg.quant, "quantize.int8_fallback")
    xv, yv = ctx.data.val.x.numpy(), ctx.data.val.y.numpy()
    out = ctx.out_path("int8_fallback", ".onnx")
    name = model.input_names[0]
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(model.path, tdp / "pre.onnx") if cfg.quant.preprocess else model.path
        cache = tdp / "calib.json"
        ref = _val_accuracy(src, xv, yv, ctx.threads)

        def drop_with(exclude: list[str] | None = None, include: list[str] | None = None, tag: str = "q") -> float:
            dst = tdp / f"{tag}.onnx"
            quantize_int8_static(src, dst, name, x_cal, cfg.quant, exclude=exclude, include=include, cache=cache)
            return (ref - _val_accuracy(dst, xv, yv, ctx.threads)) * 100

        full_drop = drop_with(tag="full")
        float_layers: list[str] = []
        sensitivity: dict[str, float] = {}
        trail: list[dict[str, Any]] = [{"float_layers": 0, "val_drop_pt": round(full_drop, 3)}]
        drop = full_drop
        if full_drop > cfg.max_accuracy_drop:
            for node in quantizable_nodes(src):
                sensitivity[node] = round(drop_with(include=[node], tag="one"), 3)
            ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
            for node in ranked[: cfg.max_float_layers]:
                float_layers.append(node)
                drop = drop_with(exclude=float_layers, tag="fb")
                trail.append({"float_layers": len(float_layers), "added": node, "val_drop_pt": round(drop, 3)})
                if drop <= cfg.max_accuracy_drop:
                    break
        quantize_int8_static(src, out, name, x_cal, cfg.quant, exclude=float_layers, cache=cache)
    info: dict[str, Any] = {
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "val_drop_all_int8_pt": round(full_drop, 3),
        "val_drop_pt": round(drop, 3),
        "float_layers": float_layers,
        "sensitivity_pt": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])),
        "trail": trail,
        "budget_met": drop <= cfg.max_accuracy_drop,
    }
    if not info["budget_met"]:
        info["warning"] = f"budget not met after keeping {len(float_layers)} layers in float (max_float_layers)"
    return finish(model, out, info)
