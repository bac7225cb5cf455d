"""Weights refitted on the int8 model's own inputs: ``rounding="refit"`` of ``quantize.int8_static``.

GPTQ (:mod:`keiryo.passes.quantize_rounding`) rounds each layer's weights for its **fp32** inputs, and bias
correction then moves only the mean of the output. The int8 model feeds each layer an input that the upstream
int8 layers and its own activation rounding have already changed. Here each layer's weights and bias are solved
for the int8 input they will actually see, so that the layer's output matches the fp32 layer's output on the fp32
input (the objective of AdaQuant, Hubara et al. 2021, and of GPTQ with asymmetric calibration, Li et al. 2025),
in closed form, as a ridge-shrunk correction of the fp32 weights:

    [W' b'] = [W b] + [W b] (C - Hq) (Hq + r I)^-1,   C = E[[x;1] [xq;1]^T],   Hq = E[[xq;1] [xq;1]^T]

with ``x`` the layer's input in the fp32 model and ``xq`` the same input in the int8 (QDQ) model as onnxruntime
runs it (optimized: its int8 kernels, whose outputs differ from the QDQ graph run node by node in float by a step
or more on 10-60% of the elements of some tensors), read at the same positions of the same calibration samples.
The ridge ``r`` is chosen per layer on held-out samples (fit on one half, error on the other, both ways; "no
refit" is a candidate, so a layer with too few columns for its inputs keeps its weights). ``W'`` is then rounded
to the int8 grid by GPTQ with ``Hq``; the bias is the last, unrounded column, so the error GPTQ pushes forward
ends partly in the bias (bias correction comes with it).

Conv and Gemm layers are refitted (MatMul weights, as in transformers, are left to onnxruntime as with gptq).
They are refitted **in graph order**, ``chunk`` at a time, and the model is quantized again after each chunk, so
every layer is solved for the input that the already-refitted layers before it give it. Refitting
them all at once from one quantization overcorrects: a layer compensates for an upstream error that the
upstream refit removes too (EfficientNet-Lite0, 50 layers, agreement with fp32 on 1,000 crops: all at once 67%,
5 at a time 89.9%, 2 at a time 96.4% in 4.6 min, one at a time 95.6% in 7.7 min, against 92.6% for GPTQ with
bias correction).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.passes.quantize_rounding import Layer, _columns, gptq, grid_scales, weight_layers


def _quantized_inputs(qdq: Any) -> dict[str, str]:
    """Conv/Gemm node -> its input tensor in the QDQ graph, for the nodes whose input and weight are int8."""
    producer = {o: nd for nd in qdq.graph.node for o in nd.output}
    out = {}
    for nd in qdq.graph.node:
        if nd.op_type not in ("Conv", "Gemm") or len(nd.input) < 2:
            continue
        a, w = producer.get(nd.input[0]), producer.get(nd.input[1])
        if a is not None and w is not None and a.op_type == w.op_type == "DequantizeLinear":
            out[nd.name] = nd.input[0]
    return out


def refit_sequentially(
    fp32: Path,
    rounded: Path,
    qdq: Path,
    x: dict[str, np.ndarray],
    per_channel: bool | dict[str, bool],
    requantize: Callable[[Path, dict[str, list[dict[str, Any]]]], None],
    workdir: Path,
    *,
    chunk: int = 2,
    batch: int = 8,
    max_columns: int = 8192,
    damp: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Refit the int8 layers of ``qdq`` in graph order, ``chunk`` at a time: each is solved for the input the int8
    model gives it once the layers before it are refitted. ``rounded`` is the starting fp32-graph file (int8-grid
    weights) that ``qdq`` was quantized from; ``requantize(src, overrides)`` rewrites ``qdq`` from a refitted file
    and the scales pinning its weights. Returns the summary for the pass info."""
    import time

    import onnx

    t0 = time.perf_counter()
    order = list(_quantized_inputs(onnx.load(str(qdq))))
    ref = onnx.load(str(fp32))
    ref_inits = {i.name: i for i in ref.graph.initializer}
    ref_layers = {lay.node: lay for lay in weight_layers(ref, order)[0]}
    src, before, after, ridges = rounded, [], [], []
    for i in range(0, len(order), chunk):
        layers = [ref_layers[n] for n in order[i : i + chunk] if n in ref_layers]
        if not layers:
            continue
        model = onnx.load(str(src))
        inits = {i.name: i for i in model.graph.initializer}
        stats = _moments(ref, onnx.load(str(qdq)), layers, x, batch, max_columns, seed)
        overrides = {}
        for lay in layers:
            overrides[lay.weight], rec = _refit_layer(ref_inits, model, inits, lay, stats[lay.node], per_channel, damp)
            before.append(rec[0])
            after.append(rec[1])
            ridges.append(rec[2])
        src = workdir / f"refit-{i}.onnx"
        onnx.save(model, str(src))
        requantize(src, overrides)
    return refit_summary(before, after, ridges, chunk, t0)


def refit_summary(before: list[float], after: list[float], ridges: list[float | None], chunk: int, t0: float) -> dict[str, Any]:
    """The pass info of a refit: layers, how many kept their weights, each layer's output error on its int8 input
    relative to the fp32 layer's output on its fp32 input with the fp32 weights and refitted (medians), seconds."""
    import time

    return {
        "layers": len(ridges),
        "chunk": chunk,
        "kept_weights": sum(r is None for r in ridges),
        "output_error_fp32_weights": float(f"{np.median(before):.4g}") if before else None,
        "output_error_refitted": float(f"{np.median(after):.4g}") if after else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _moments(
    ref: Any, qmodel: Any, layers: list[Layer], x: dict[str, np.ndarray], batch: int, max_columns: int, seed: int
) -> dict[str, list[list[Any]]]:
    """Per layer and per half of the samples (alternate batches): E[x xq^T], E[xq xq^T], E[x x^T] of the augmented
    columns ``[x;1]`` (fp32 model ``ref``) and ``[xq;1]`` (int8 model ``qmodel``, changed) at the same positions,
    and the column count."""
    import onnx

    from keiryo.passes.quantize_ranges import tensor_session

    q_inputs = _quantized_inputs(qmodel)
    fp_names = list(dict.fromkeys(lay.input for lay in layers))
    q_names = list(dict.fromkeys(q_inputs[lay.node] for lay in layers))
    fp_model = onnx.ModelProto()
    fp_model.CopyFrom(ref)
    # both graphs cut to the chunk's inputs: a chunk early in the graph runs the models only that far
    fp_sess, q_sess = tensor_session(fp_model, fp_names), tensor_session(qmodel, q_names)
    stats: dict[str, list[list[Any]]] = {lay.node: [[0, 0, 0, 0], [0, 0, 0, 0]] for lay in layers}
    n = len(next(iter(x.values())))
    for k, start in enumerate(range(0, n, batch)):
        feed = {name: v[start : start + batch] for name, v in x.items()}
        rows = len(next(iter(feed.values())))
        fa = dict(zip(fp_names, fp_sess.run(fp_names, feed), strict=True))
        qa = dict(zip(q_names, q_sess.run(q_names, feed), strict=True))
        for i, lay in enumerate(layers):
            keep = max(1, max_columns * rows // max(n, 1))
            s = seed + 7919 * start + i  # the same positions of the same samples in both models
            cx = _columns(lay, fa[lay.input], keep, np.random.default_rng(s))
            cq = _columns(lay, qa[q_inputs[lay.node]], keep, np.random.default_rng(s))
            add_moments(stats[lay.node][k % 2], cx, cq)
    return stats


def _refit_layer(
    ref_inits: dict[str, Any],
    model: Any,
    inits: dict[str, Any],
    lay: Layer,
    stats: list[list[Any]],
    per_channel: bool | dict[str, bool],
    damp: float,
) -> tuple[list[dict[str, Any]], tuple[float, float, float | None]]:
    """Solve ``lay`` (fp32 weights in ``ref_inits``) for its int8 input, GPTQ-round it and write it into ``model``
    (``inits``: its initializers by name); returns the overrides pinning its scales, and (error before, error
    after, ridge)."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(ref_inits[lay.weight]).astype(np.float64)
    b = numpy_helper.to_array(ref_inits[lay.bias]).astype(np.float64) if lay.bias in ref_inits else np.zeros(len(w))
    pc = per_channel if isinstance(per_channel, bool) else per_channel.get(lay.weight, True)
    qw, qb, scale, rec = solve_layer(w, b, lay.group, stats, pc, damp)
    inits[lay.weight].CopyFrom(numpy_helper.from_array(qw, lay.weight))
    _set_bias(model, inits, lay, qb)
    if pc:
        overrides = [{"axis": 0, "scale": np.float32(s), "zero_point": np.int8(0)} for s in scale]
    else:
        overrides = [{"scale": np.float32(scale[0]), "zero_point": np.int8(0)}]
    return overrides, rec


def solve_layer(
    w: np.ndarray, b: np.ndarray, group: int, stats: list[list[Any]], per_channel: bool, damp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float | None]]:
    """The refit of one layer (fp32 weights ``w``, out-channels first, and bias ``b``) from its moments ``stats``
    (:func:`_moments`' two halves): the int8-grid weights, the bias, the grid, and (error before, error after,
    ridge)."""
    import torch

    halves = [tuple(t / h[3] for t in h[:3]) for h in stats if h[3]]
    c, hq, hx = (sum(t) / len(halves) for t in zip(*halves, strict=True))
    rows = len(w) // group
    wb = torch.from_numpy(np.concatenate([w.reshape(group, rows, -1), b.reshape(group, rows, 1)], -1))  # (g, rows, d+1)
    ridge = _held_out_ridge(wb, halves) if len(halves) == 2 else None
    refit = wb if ridge is None else _fit(wb, c, hq, ridge)
    scale = grid_scales(refit[..., :-1].reshape(w.shape).float().numpy(), per_channel)
    q = gptq(refit, hq, torch.from_numpy(scale.reshape(group, rows, 1)).double(), damp, free_last=True)
    qw = q[..., :-1].reshape(w.shape).float().numpy()
    return qw, q[..., -1].reshape(-1).float().numpy(), scale, (_error(wb, wb, c, hq, hx), _error(q, wb, c, hq, hx), ridge)


def add_moments(st: list[Any], cx: Any, cq: Any) -> None:
    """Add one batch's columns ``cx`` (fp32 input) and ``cq`` (int8 input, same positions), (groups, d, N) float32,
    to one half's sums of the augmented products (:func:`gram`)."""
    st[0] += gram(cx, cq)
    st[1] += gram(cq, cq)
    st[2] += gram(cx, cx)
    st[3] += cq.shape[-1]


def gram(a: Any, b: Any) -> Any:
    """``[a;1] [b;1]^T`` in float64 for columns ``a``, ``b`` (groups, d, N), without building ``[a;1]``: the products
    on float64 (groups, N, d) copies, whose rows are contiguous whatever the gathered columns' strides (on
    EfficientNet-Lite0's 50 layers 1.8x faster than multiplying the augmented columns as gathered). Not float32:
    the refit's solve reads ``C - Hq``, a small difference of two such sums (float32 products lost 3 points of
    validation agreement on Lite0)."""
    import torch

    at = a.transpose(1, 2).to(torch.float64, memory_format=torch.contiguous_format)
    bt = at if b is a else b.transpose(1, 2).to(torch.float64, memory_format=torch.contiguous_format)
    g, n, d = at.shape
    out = torch.empty(g, d + 1, d + 1, dtype=torch.float64)
    out[:, :d, :d] = at.transpose(1, 2) @ bt
    out[:, :d, d] = at.sum(1)
    out[:, d, :d] = bt.sum(1)
    out[:, d, d] = n
    return out


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the mean diagonal of the layer's int8-input Hessian


def _fit(wb: Any, c: Any, hq: Any, ridge: float) -> Any:
    """The least-squares refit as a correction of ``[W b]``, shrunk towards no correction (ridge):
    ``[W b] + [W b] (C - Hq) (Hq + ridge mean(diag Hq) I)^-1``; with no ridge, ``[W b] C Hq^-1``."""
    import torch

    eye = torch.eye(hq.shape[-1], dtype=hq.dtype)
    hd = hq + eye * ridge * torch.diagonal(hq, dim1=1, dim2=2).mean(-1)[:, None, None]
    return wb + torch.linalg.solve(hd, (wb @ (c - hq)).transpose(1, 2)).transpose(1, 2)


def _error(v: Any, wb: Any, c: Any, hq: Any, hx: Any) -> float:
    """``E|V [xq;1] - [W b] [x;1]|^2`` relative to ``E|[W b] [x;1]|^2``, from the second moments."""
    import torch

    ref = float(torch.einsum("grd,gde,gre->", wb, hx, wb)) or 1.0
    e = torch.einsum("grd,gde,gre->", v, hq, v) - 2 * torch.einsum("grd,gde,gre->", wb, c, v)
    return float(e) / ref + 1.0


def _held_out_ridge(wb: Any, halves: list[tuple[Any, Any, Any]]) -> float | None:
    """The ridge strength whose fit on one half of the samples has the least error on the other (both ways), or
    None where no fit beats the layer's own weights there (too few columns for its inputs: no refit)."""
    (c0, h0, x0), (c1, h1, x1) = halves

    def cross(ridge: float | None) -> float:
        f0 = wb if ridge is None else _fit(wb, c0, h0, ridge)
        f1 = wb if ridge is None else _fit(wb, c1, h1, ridge)
        return _error(f0, wb, c1, h1, x1) + _error(f1, wb, c0, h0, x0)

    scores = {r: cross(r) for r in (None, *RIDGES)}
    return min(scores, key=lambda r: scores[r])


def _set_bias(model: Any, inits: dict[str, Any], lay: Layer, bias: np.ndarray) -> None:
    """``bias`` as the layer's bias in ``model``: its own initializer, or a new one where it has none."""
    from onnx import numpy_helper

    node = next(nd for nd in model.graph.node if nd.name == lay.node)
    name = node.input[2] if len(node.input) > 2 and node.input[2] else f"{lay.weight}_keiryo_bias"
    if name in inits:
        inits[name].CopyFrom(numpy_helper.from_array(bias, name))
        return
    model.graph.initializer.append(numpy_helper.from_array(bias, name))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
