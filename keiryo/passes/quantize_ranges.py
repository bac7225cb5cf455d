"""Activation ranges for int8 PTQ that minimize the quantization error (``calibration="mse"``), clip-aware.

onnxruntime calibrates minmax, entropy and percentile ranges; none of them asks what the int8 tensor's error
will be. Here every activation that ``quantize_static`` will quantize (the tensors its own MinMax calibrator
lists) gets a histogram over its observed range on the calibration data, and the range ``[lo, hi]`` is chosen
among shrunk candidates to minimize the expected squared error: rounding noise ``step^2 / 12`` for values
inside the range, the squared distance to the range for the clipped ones (the MSE range search of TensorRT,
NNCF and AIMET). Ranges never extend past a producing ``Clip``'s bounds (ReLU6: [0, 6]) or below a ``Relu``'s 0.
The ranges go to ``quantize_static`` as a calibration cache, so onnxruntime builds the graph as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BINS = 2048
SAMPLES = 1 << 17  # values per tensor and batch that go into its histogram
# Candidate fractions of the observed range: fine near 1 (most tensors want little clipping), coarse below.
FRACTIONS = np.concatenate([np.linspace(0.2, 0.9, 36), np.linspace(0.9, 1.0, 21)[1:]])


def tensor_session(model: Any, names: list[str]) -> Any:
    """An onnxruntime session of ``model`` (an ``onnx.ModelProto``, changed in place) that returns the intermediate
    tensors ``names``. They become the graph's outputs, which onnxruntime's graph optimizations keep (a fusion never
    swallows a graph output), so the rest runs optimized: 2.5x faster than node by node on EfficientNet-Lite0 in
    fp32 (values equal to 5e-6), 5-7x on its QDQ file (its int8 kernels). The graph is cut to the nodes those
    tensors need: onnxruntime runs every node of a graph whatever is fetched, so a session asked for an early
    tensor would otherwise run the whole model."""
    import onnxruntime as ort

    prune(model.graph, names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def prune(graph: Any, names: list[str]) -> None:
    """``graph``'s outputs become ``names``; the nodes and initializers they do not depend on are removed (unless
    a node holds a subgraph, whose outer-scope reads are not listed in its inputs: then only the outputs change)."""
    import onnx

    known = {v.name: v.type.tensor_type.elem_type for v in [*graph.output, *graph.value_info]}
    outs = [onnx.helper.make_tensor_value_info(k, known.get(k) or onnx.TensorProto.FLOAT, None) for k in names]
    del graph.output[:]
    graph.output.extend(outs)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    need, keep = set(names), []
    for node in reversed(graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def clip_bounds(model: Any) -> dict[str, tuple[float, float]]:
    """Bounds that an activation cannot leave: ``Clip`` outputs (constant min/max) and ``Relu`` outputs."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out: dict[str, tuple[float, float]] = {}
    for n in model.graph.node:
        if n.op_type == "Relu":
            out[n.output[0]] = (0.0, np.inf)
        elif n.op_type == "Clip":
            lo = float(consts[n.input[1]]) if len(n.input) > 1 and n.input[1] in consts else -np.inf
            hi = float(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] in consts else np.inf
            out[n.output[0]] = (lo, hi)
    return out


def mse_range(hist: np.ndarray, lo: float, hi: float, levels: int, symmetric: bool) -> tuple[float, float]:
    """The candidate range of least expected squared error for a histogram of ``BINS`` bins over ``[lo, hi]``."""
    if hi <= lo or hist.sum() == 0:
        return lo, hi
    edges = np.linspace(lo, hi, len(hist) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    p = hist / hist.sum()
    best, best_err = (lo, hi), np.inf
    for f in FRACTIONS:
        if symmetric:
            a = max(abs(lo), abs(hi)) * f
            clo, chi = -a, a
        else:
            clo, chi = (lo * f if lo < 0 else lo), hi * f if hi > 0 else hi
        step = (chi - clo) / (levels - 1)
        inside = (centers >= clo) & (centers <= chi)
        err = float((p * inside).sum() * step**2 / 12)
        err += float((p * np.where(centers < clo, (clo - centers) ** 2, 0)).sum())
        err += float((p * np.where(centers > chi, (centers - chi) ** 2, 0)).sum())
        if err < best_err:
            best, best_err = (clo, chi), err
    return best


def mse_ranges(
    src: Path, reader: Callable[[], Any], op_types: list[str] | None, symmetric: bool, cache: Path, workdir: Path
) -> Path:
    """Compute MSE-optimal, clip-aware ranges of ``src``'s quantized activations; save them as an onnxruntime cache."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data

    cal = create_calibrator(
        src, op_types or [], augmented_model_path=str(workdir / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    cal.collect_data(reader())
    minmax = cal.compute_data()
    names = list(minmax.keys())
    lohi = {k: (float(np.min(minmax[k].range_value[0])), float(np.max(minmax[k].range_value[1]))) for k in names}
    model = onnx.load(str(src))
    bounds = clip_bounds(model)
    sess = tensor_session(model, names)
    hists = {k: np.zeros(BINS, np.int64) for k in names}
    it = reader()
    while (feed := it.get_next()) is not None:
        for k, v in zip(names, sess.run(names, feed), strict=True):
            lo, hi = lohi[k]
            if hi > lo:
                flat = v.ravel()
                flat = flat[:: max(1, flat.size // SAMPLES)]  # a strided sample: the range ends are minmax's, exact
                idx = ((flat - lo) * (BINS / (hi - lo))).astype(np.int64)
                hists[k] += np.bincount(np.clip(idx, 0, BINS - 1), minlength=BINS)
    data = {}
    for k in names:
        lo, hi = lohi[k]
        clo, chi = mse_range(hists[k], lo, hi, 255 if symmetric else 256, symmetric)
        blo, bhi = bounds.get(k, (-np.inf, np.inf))
        clo, chi = max(clo, blo), min(chi, bhi)
        data[k] = TensorData(lowest=np.float32(clo), highest=np.float32(chi))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    return cache


def minmax_ranges(src: Path, reader: Callable[[], Any], op_types: list[str] | None, cache: Path, workdir: Path) -> Path:
    """onnxruntime's own MinMax ranges of ``src``'s quantized activations, saved as a calibration cache."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cal = create_calibrator(
        src, op_types or [], augmented_model_path=str(workdir / "augmented-mm.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    cal.collect_data(reader())
    save_tensors_data(cal.compute_data(), cache)
    return cache
