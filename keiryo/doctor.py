"""``keiryo doctor``: a pre-flight check before any training or compression.

For each technique, which layers it can handle (and why not the others); for each
export target, whether the model exports and which op types it uses; and warnings
about what predicts "compressed but not faster".
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from keiryo.errors import KeiryoError
from keiryo.machine import cpu
from keiryo.passes._state import output_layer, prunable_layers


def _channels(m: Any) -> int:
    return int(m.out_channels if isinstance(m, (nn.Conv1d, nn.Conv2d)) else m.out_features)


def technique_coverage(handle: Any) -> dict[str, dict[str, Any]]:
    layers = prunable_layers(handle.module)
    out = output_layer(handle.module, handle.head_width)
    grouped = {n for n, m in layers.items() if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1}
    other = sorted(
        {type(m).__name__ for m in handle.module.modules() if len(list(m.children())) == 0} - {"Conv1d", "Conv2d", "Linear"}
    )
    from keiryo.passes.cluster import ClusterConfig

    min_params = ClusterConfig().min_params
    cov: dict[str, dict[str, Any]] = {
        "prune.unstructured": {"layers": list(layers), "not": {}},
        "prune.structured": {
            "layers": [n for n in layers if n != out],
            "not": {out: "output layer: the class count is fixed"} if out else {},
        },
        "cluster": {
            "layers": [n for n in layers if layers[n].weight.numel() >= min_params],
            "not": {n: f"fewer than {min_params} weights" for n in layers if layers[n].weight.numel() < min_params},
        },
        "factorize.lowrank": {
            "layers": [n for n in layers if n not in grouped and n != out],
            "not": {
                **{n: "grouped/depthwise conv" for n in grouped},
                **({out: "output layer (left whole by default)"} if out else {}),
            },
        },
        "quantize.qat": {"layers": list(layers), "not": {}},
        "distill / slim": {
            "layers": ["(whole model)"],
            "not": {} if handle.spec.source.startswith("zoo:") else {"slim": "needs a zoo student: set model: zoo:NAME"},
        },
    }
    cov["_other_layer_types"] = {"layers": other, "not": {}}
    return cov


def export_coverage(handle: Any) -> dict[str, dict[str, Any]]:
    """Export to every registered target with the same exporters ``keiryo export`` uses; name the op that fails."""
    from keiryo.export import EXPORTERS, export, get_exporter

    get_exporter("onnx")  # registers the built-in exporters
    res: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as td:
        for target in EXPORTERS.names():
            exp = EXPORTERS.get(target)
            try:
                art = export(handle, target, Path(td) / f"m{exp.suffix}")
            except KeiryoError as e:
                res[target] = {"ok": False, "error": str(e), "op": getattr(e, "op", None), "layer": getattr(e, "layer", None)}
                continue
            ops = art.info.get("op_census") or {}
            if target == "onnx":
                import onnx

                ops = dict(Counter(n.op_type for n in onnx.load(str(art.path)).graph.node))
            quantizable = QUANTIZABLE_OPS.get(target, set())
            res[target] = {
                "ok": True,
                "op_types": ops,
                "int8_quantizable_ops": sum(v for k, v in ops.items() if k in quantizable),
            }
            if target == "coreml":
                res[target]["validated"] = art.info.get("validated")
    return res


# Op types whose weights the target's int8 passes quantize.
QUANTIZABLE_OPS = {
    "onnx": {"Conv", "Gemm", "MatMul", "ConvTranspose"},
    "tflite": {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"},
    "coreml": {"conv", "linear", "matmul", "conv_transpose"},
}


def warnings_for(handle: Any, batch_size: int = 1) -> list[str]:
    w: list[str] = []
    layers = prunable_layers(handle.module)
    out = output_layer(handle.module, handle.head_width)
    odd = [f"{n} ({_channels(m)})" for n, m in layers.items() if n != out and _channels(m) % 8]
    if odd:
        w.append(
            f"{len(odd)} layer(s) have channel counts that are not multiples of 8 (slower int8/fp16 kernels): "
            + ", ".join(odd[:6])
            + (" ..." if len(odd) > 6 else "")
            + "; use prune.structured with round_to=8"
        )
    c = cpu()
    if not c["int8_dot_product"]:
        w.append(
            f"this CPU ({c['model']}) has no int8 dot-product instructions (VNNI / ARM dotprod): int8 may be no faster "
            "than fp32 (about 1.3x at best, sometimes slower); measure before shipping"
        )
    w.append("unstructured sparsity below ~80% gives no latency gain with dense CPU kernels: expect a smaller gzip, not speed")
    if any(isinstance(m, nn.Linear) for m in layers.values()) and batch_size > 8:
        w.append(
            f"weight-only low-bit (int8 dynamic) pays off for memory-bound batch-1 Linear layers; at batch {batch_size} "
            "they become compute-bound and gain little"
        )
    return w


def diagnose(handle: Any, batch_size: int = 1) -> dict[str, Any]:
    return {
        "model": handle.spec.source,
        "params": handle.num_params(),
        "macs": handle.macs(),
        "techniques": technique_coverage(handle),
        "exports": export_coverage(handle),
        "warnings": warnings_for(handle, batch_size),
        "cpu": cpu(),
    }


def quant_sensitivity(handle: Any, data: Any, task: Any, outlier_ratio: float = 4.0) -> dict[str, Any]:
    """``doctor --quant``: the fidelity each layer loses when only it is int8 (onnxruntime, test split), activation
    ranges with outliers (observed range > ``outlier_ratio`` x the least-error range), and which method should fix them."""
    import numpy as np
    from onnxruntime.quantization.calibrate import load_tensors_data

    from keiryo.export import export
    from keiryo.passes.quantize_fallback import quantizable_nodes, scored
    from keiryo.passes.quantize_ort import Int8StaticConfig, preprocess, quantize_int8_static
    from keiryo.passes.quantize_ranges import mse_ranges

    x = data.calib.numpy()
    cfg = Int8StaticConfig()
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(export(handle, "onnx", tdp / "fp32.onnx").path, tdp / "pre.onnx")
        ref, ref_outs = scored(src, data.test, task, None)
        cache = tdp / "minmax.json"

        def drop(include: list[str] | None = None) -> float:
            quantize_int8_static(src, tdp / "q.onnx", x, cfg, include=include, cache=cache)
            return round(float(task.drop(ref, scored(tdp / "q.onnx", data.test, task, ref_outs)[0])), 3)

        whole = drop()
        layers = {n: drop([n]) for n in quantizable_nodes(src)}
        n = len(next(iter(x.values())))
        batches = [{k: v[i : i + 16] for k, v in x.items()} for i in range(0, n, 16)]

        class Reader:
            def __init__(self) -> None:
                self.it = iter(batches)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

        best = load_tensors_data(mse_ranges(src, Reader, None, False, tdp / "mse.json", tdp))
        observed = load_tensors_data(cache)
    outliers = {}
    for name in observed.keys():
        if name not in best:
            continue
        lo, hi = (float(np.min(observed[name].range_value[0])), float(np.max(observed[name].range_value[1])))
        blo, bhi = (float(np.min(best[name].range_value[0])), float(np.max(best[name].range_value[1])))
        if bhi - blo > 0 and (hi - lo) / (bhi - blo) > outlier_ratio:
            outliers[name] = {"observed": [round(lo, 4), round(hi, 4)], "least_error": [round(blo, 4), round(bhi, 4)]}
    ranked = dict(sorted(layers.items(), key=lambda kv: -kv[1]))
    worst = [k for k, v in ranked.items() if v > 0]
    fix = []
    if outliers:
        fix.append(f"{len(outliers)} activation range(s) with outliers: calibration=mse (recipe int8-mse)")
    if worst:
        fix.append(
            f"layer(s) {', '.join(worst[:3])} lose the most alone: rounding=gptq + bias_correction=full (recipe int8-gptq), "
            "then rounding=refit for the error the int8 layers pass on (recipe int8-refit), "
            "then keep them float (recipe int8-auto's fallback rung)"
        )
    return {
        "metric": task.drop_name,
        "drop_all_int8": whole,
        "drop_one_layer_int8": ranked,
        "range_outliers": outliers,
        "predicted_fix": fix or ["none needed: int8 PTQ keeps the metric"],
    }
