"""``quantize.int8_fallback``: int8 static PTQ with per-layer sensitivity analysis and float fallback.

1. Quantize everything; measure the task's drop (accuracy points for classification, MAE
   increase for regression, cosine for embeddings) on the **validation** split (never test)
   against the fp32 file, both run on onnxruntime.
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
    max_accuracy_drop: float = Field(
        0.5, ge=0.0, description="budget on the validation split, in the task's drop unit (accuracy points for classification)"
    )
    max_float_layers: int = Field(8, ge=0, description="stop after keeping this many layers in float")
    quant: Int8StaticConfig = Field(default_factory=Int8StaticConfig)


def _val_metrics(path: Path, val: Any, task: Any, reference: list[np.ndarray] | None, threads: int) -> tuple[dict[str, Any], Any]:
    from keiryo.evaluate import predict_with_targets
    from keiryo.runtime import open_session

    with open_session("onnxruntime", path, threads) as s:
        outs, y = predict_with_targets(s, val)
    return task.metrics(outs, y, reference if reference is not None else outs), outs


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
    out = ctx.out_path("int8_fallback", ".onnx")
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(model.path, tdp / "pre.onnx") if cfg.quant.preprocess else model.path
        info = fallback_search(src, out, x_cal, cfg, ctx, tdp)
    return finish(model, out, info)


def fallback_search(
    src: Path, out: Path, x_cal: dict[str, np.ndarray], cfg: Int8FallbackConfig, ctx: PassContext, tdp: Path
) -> dict[str, Any]:
    """Quantize ``src`` into ``out`` keeping the most sensitive layers float until the validation budget is met."""
    val, task = ctx.data.val, ctx.get_task()
    cache = tdp / "calib.json"
    ref, ref_outs = _val_metrics(src, val, task, None, ctx.threads)

    def drop_with(exclude: list[str] | None = None, include: list[str] | None = None, tag: str = "q") -> tuple[float, float]:
        """The task's drop, and the outputs' squared error relative to the fp32 outputs' (a continuous measure:
        on a few hundred samples many layers tie at the same drop)."""
        dst = tdp / f"{tag}.onnx"
        quantize_int8_static(src, dst, x_cal, cfg.quant, exclude=exclude, include=include, cache=cache)
        metrics, outs = _val_metrics(dst, val, task, ref_outs, ctx.threads)
        err = sum(float(np.mean((o - r) ** 2) / max(np.mean(r**2), 1e-12)) for o, r in zip(outs, ref_outs, strict=True))
        return float(task.drop(ref, metrics)), err

    full_drop = drop_with(tag="full")[0]
    float_layers: list[str] = []
    sensitivity: dict[str, float] = {}
    error: dict[str, float] = {}
    trail: list[dict[str, Any]] = [{"float_layers": 0, "val_drop_pt": round(full_drop, 3)}]
    drop = full_drop
    if full_drop > cfg.max_accuracy_drop:
        for node in quantizable_nodes(src):
            d, e = drop_with(include=[node], tag="one")
            sensitivity[node], error[node] = round(d, 3), e
        ranked = sorted(sensitivity, key=lambda n: (-sensitivity[n], -error[n]))
        for node in ranked[: cfg.max_float_layers]:
            float_layers.append(node)
            drop = drop_with(exclude=float_layers, tag="fb")[0]
            trail.append({"float_layers": len(float_layers), "added": node, "val_drop_pt": round(drop, 3)})
            if drop <= cfg.max_accuracy_drop:
                break
    quantize_int8_static(src, out, x_cal, cfg.quant, exclude=float_layers, cache=cache)
    info: dict[str, Any] = {
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "drop_metric": task.drop_name,
        "val_drop_all_int8_pt": round(full_drop, 3),
        "val_drop_pt": round(drop, 3),
        "float_layers": float_layers,
        "sensitivity_pt": {n: sensitivity[n] for n in sorted(sensitivity, key=lambda n: (-sensitivity[n], -error[n]))},
        "sensitivity_output_error": {n: float(f"{error[n]:.4g}") for n in sorted(error, key=lambda n: -error[n])},
        "trail": trail,
        "budget_met": drop <= cfg.max_accuracy_drop,
    }
    if not info["budget_met"]:
        info["warning"] = f"budget not met after keeping {len(float_layers)} layers in float (max_float_layers)"
    return info
