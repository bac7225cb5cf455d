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
