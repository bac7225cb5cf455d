"""Per-tensor precision for int8 static PTQ, chosen by measured error rather than by habit.

Measured on ImageNet EfficientNet-Lite0 (docs/techniques.md), most of what int8 activations cost comes from a
few tensors, not from all of them alike: the stem's output (the first depthwise conv's input, whose BN-folded
kernels reach 17.7 and amplify its rounding noise) costs 4.5 points of top-1 agreement alone, the quantized
logits 1.5 points, the other 59 tensors about 1 point each group. Two options of ``quantize.int8_static`` act
on that:

- ``float_outputs``: the graph's outputs (logits, embeddings) leave the last layer in float: the last
  MatMul/Gemm/Conv still runs on int8 inputs and weights, only its result is not rounded to 256 levels (a
  256-level logit grid flips the top-1 of close calls). It changes neither the file size nor the int8 kernels:
  a Gemm's float bias is stored as int32 at the input scale times the weight scale (the QDQ bias format), since
  onnxruntime fuses DQ -> Gemm with no Q after it into one QGemm with a float output only with such a bias
  (with a float bias the Gemm ran in float on weights dequantized at every call: +9% latency on EfficientNet-Lite0).
- ``wide_activations``: every activation that ``quantize_static`` would quantize is fake-quantized *alone* in
  the fp32 graph (onnxruntime, its calibrated range and uint8 grid) and the mean squared error of the model's
  outputs on the calibration inputs is measured; the ``wide_activations`` tensors whose error is largest get
  16-bit activations (``uint16`` through onnxruntime's ``TensorQuantOverrides``; their consumer runs in float,
  the rest of the graph stays int8). The ranking is kept in the pass info.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FOLLOWERS = ("Relu", "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


def _ranges(cache: Path) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(str(cache))
    return {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in data.items()}


def activation_sensitivity(
    src: Path, ranges: dict[str, tuple[float, float]], x: dict[str, np.ndarray], *, signed: bool, rows: int = 32
) -> list[tuple[str, float]]:
    """Output MSE of ``src`` when only one activation is quantized (uint8/int8 grid over its range), worst first.

    A tensor whose only consumer is a ``Relu``/``Clip`` is measured after it (onnxruntime folds the activation
    into the quantized range there)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    feed = {k: v[:rows] for k, v in x.items()}
    so = ort.SessionOptions()
    # optimized: no fusion takes a lone Quantize/DequantizeLinear pair between float nodes (an int8 kernel needs
    # its weights quantized too); on EfficientNet-Lite0's 61 tensors 2.7x faster than unoptimized, the same 8
    # worst tensors in the same order, median error ratio 1.0000
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3

    def run(m: Any) -> list[np.ndarray]:
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [np.asarray(o, np.float64) for o in s.run(None, feed)]

    ref = run(model)
    scale_ref = sum(float(np.mean(r**2)) for r in ref) or 1.0
    qmin, qmax = (-128, 127) if signed else (0, 255)
    outs = {o.name for o in model.graph.output}
    results = []
    for name, (lo, hi) in ranges.items():
        c = consumers.get(name, [])
        if len(c) == 1 and c[0].op_type in ("Relu", "Clip") and name not in outs:
            continue  # measured on the activation's output, which has its own range
        if hi <= lo or name not in {*consumers, *outs}:
            continue
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if signed:
            a = max(-lo, hi)
            scale, zp = a / 127.0, 0
        else:
            scale = (hi - lo) / 255.0
            zp = int(np.clip(round(-lo / scale), qmin, qmax))
        m = onnx.ModelProto()
        m.CopyFrom(model)
        dtype = np.int8 if signed else np.uint8
        m.graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(scale, np.float32), "keiryo_fq_scale"),
                numpy_helper.from_array(np.asarray(zp, dtype), "keiryo_fq_zp"),
            ]
        )
        src_name = name
        if name in outs:  # the graph output keeps its name: its producer writes a new one
            src_name = name + "_keiryo_pre"
            for n in m.graph.node:
                for i, v in enumerate(n.output):
                    if v == name:
                        n.output[i] = src_name
        for n in m.graph.node:
            for i, v in enumerate(n.input):
                if v == name:
                    n.input[i] = name + "_keiryo_fq"
        m.graph.node.extend(
            [
                helper.make_node("QuantizeLinear", [src_name, "keiryo_fq_scale", "keiryo_fq_zp"], [name + "_keiryo_q"]),
                helper.make_node(
                    "DequantizeLinear",
                    [name + "_keiryo_q", "keiryo_fq_scale", "keiryo_fq_zp"],
                    [name if name in outs else name + "_keiryo_fq"],
                ),
            ]
        )
        from keiryo.export.onnx import toposort

        toposort(m)
        got = run(m)
        err = sum(float(np.mean((g - r) ** 2)) for g, r in zip(got, ref, strict=True)) / scale_ref
        results.append((name, err))
    del TensorProto
    return sorted(results, key=lambda t: -t[1])


def wide_overrides(src: Path, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` giving ``names`` uint16 activations; the output of a Relu/Clip (onnxruntime may fold
    it and quantize its input instead) or of a shape-only op (its output shares its input's scale) names that input
    too, back to the layer that computed it."""
    import onnx
    from onnxruntime.quantization import QuantType

    model = onnx.load(str(src), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        out[name] = [{"quant_type": QuantType.QUInt16}]
        p = producer.get(name)
        while p is not None and p.op_type in FOLLOWERS:  # their output shares (or replaces) their input's quantization
            out[p.input[0]] = [{"quant_type": QuantType.QUInt16}]
            p = producer.get(p.input[0])
    return out


def float_graph_outputs(qdq: Path) -> list[str]:
    """Remove the QuantizeLinear -> DequantizeLinear pair on each graph output of ``qdq`` (in place), where the
    quantized tensor is the output of a MatMul/Gemm/Conv/Add (no folded activation is lost); the outputs freed."""
    import onnx

    model = onnx.load(str(qdq))
    outs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    freed: list[str] = []
    dead: set[int] = set()
    for name in outs:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or users.get(q.output[0], 0) != 1:
            continue
        p = producer.get(q.input[0])
        if p is None or p.op_type not in ("MatMul", "Gemm", "Conv", "Add") or users.get(q.input[0], 0) != 1:
            continue
        for i, v in enumerate(p.output):
            if v == q.input[0]:
                p.output[i] = name
        dead.update((id(q), id(dq)))
        freed.append(name)
        if p.op_type == "Gemm":
            _int32_bias(model, p, producer)
    if freed:
        keep = [n for n in model.graph.node if id(n) not in dead]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        onnx.save(model, str(qdq))
    return freed


def _int32_bias(model: Any, gemm: Any, producer: dict[str, Any]) -> None:
    """Give ``gemm`` (DQ inputs, float output) its float bias initializer as int32 at input scale x weight scale
    through a DequantizeLinear, so that onnxruntime fuses it into a QGemm; left alone where the inputs are not
    both dequantized int8, the weights are not per output channel or per tensor, or a level would pass int32."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if len(gemm.input) < 3 or gemm.input[2] not in inits:
        return
    transb = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    a, w = producer.get(gemm.input[0]), producer.get(gemm.input[1])
    if a is None or w is None or a.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
        return
    if a.input[1] not in inits or w.input[1] not in inits:
        return
    a_scale = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
    w_scale = numpy_helper.to_array(inits[w.input[1]]).astype(np.float64).ravel()
    bias = numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float64)
    w_axis = next((at.i for at in w.attribute if at.name == "axis"), 1)
    per_output = w_scale.size == bias.size and w_axis == (0 if transb else 1)
    if a_scale.size != 1 or bias.ndim != 1 or (w_scale.size > 1 and not per_output):
        return
    scale = (a_scale.ravel()[0] * w_scale).astype(np.float32)
    if np.any(scale <= 0):
        return
    levels = np.round(bias / scale.astype(np.float64))
    if np.abs(levels).max(initial=0) >= 2**31 - 1:
        return
    base = gemm.input[2]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(levels.astype(np.int32), f"{base}_int32"),
            numpy_helper.from_array(scale if scale.size > 1 else scale.reshape(()), f"{base}_int32_scale"),
            numpy_helper.from_array(np.zeros(scale.shape if scale.size > 1 else (), np.int32), f"{base}_int32_zero_point"),
        ]
    )
    dq = helper.make_node(
        "DequantizeLinear",
        [f"{base}_int32", f"{base}_int32_scale", f"{base}_int32_zero_point"],
        [f"{base}_int32_dq"],
        name=f"{base}_int32_DequantizeLinear",
        axis=0,
    )
    nodes = list(model.graph.node)
    model.graph.node.insert(nodes.index(gemm), dq)
    gemm.input[2] = dq.output[0]
    if not any(base in n.input for n in nodes):  # the float bias has no other reader: it leaves the file
        model.graph.initializer.remove(inits[base])
