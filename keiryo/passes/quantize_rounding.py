"""Weight rounding for int8 PTQ on ONNX graphs: Hessian-aware rounding (GPTQ) and empirical bias correction.

Rounding every weight to its nearest int8 level is not the best int8 weight: on depthwise-separable CNNs
(MobileNet, EfficientNet-Lite) a 3x3 depthwise kernel folded with its batch norm can hold large weights whose
sum nearly cancels, and the rounding errors then add up to a systematic shift of the layer's output
(Nagel et al. 2019, "Data-Free Quantization"; the AIMET / NNCF bias-correction family).

Both methods here read the layer's inputs on the calibration data (fp32 model, onnxruntime, every layer's
input at once), as im2col columns, and keep the int8 grid of onnxruntime's quantizer (symmetric, scale =
max|w| / 127, per output channel or per tensor):

- ``rounding="gptq"``: the columns of each weight matrix are rounded one at a time and the error of each is
  pushed onto the not-yet-rounded columns through the inverse of the layer's input Hessian ``H = X X^T``
  (Frantar et al. 2022, GPTQ / Optimal Brain Quantization). Closed form: no gradient steps, seconds per layer.
  Grouped and depthwise convolutions get one Hessian per group.
- ``bias_correction=True``: the mean output error ``(W - W_q) E[x]`` over the calibration columns is added
  to the bias (created when the layer has none), so the int8 layer's output has the fp32 layer's mean.

The result is an fp32 ONNX file whose weights lie on the int8 grid, plus per-channel scale overrides for
``quantize_static`` (``TensorQuantOverrides``) so that onnxruntime quantizes them to exactly those levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.errors import DataError, PassError

# Rounding learned from data needs enough input columns per weight column; the fewest calibration samples accepted.
MIN_ROUNDING_SAMPLES = 16


@dataclass
class Layer:
    node: str
    op: str
    weight: str
    bias: str | None
    input: str
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    dilations: tuple[int, ...] = (1, 1)
    h: Any = None  # (groups, d, d) running sum of X X^T
    mean: Any = None  # (groups, d) running sum of the columns
    count: int = 0
    act_q: tuple[float, int, int, int] | None = None  # (scale, zero point, qmin, qmax) of the int8 input
    mean_q: Any = None  # (groups, d) running sum of the columns as the int8 model sees them (quantized with act_q)
    info: dict[str, Any] = field(default_factory=dict)


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_layers(model: Any, nodes: list[str] | None = None) -> tuple[list[Layer], dict[str, str]]:
    """The Conv and Gemm (transB=1) nodes whose weight is an initializer; the others named with the reason."""
    inits = {i.name: i for i in model.graph.initializer}
    layers, skipped = [], {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or (nodes is not None and n.name not in nodes):
            continue
        if len(n.input) < 2 or n.input[1] not in inits:
            skipped[n.name] = "weight is not a constant"
            continue
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None and bias not in inits:
            skipped[n.name] = "bias is not a constant"
            continue
        if n.op_type == "Gemm":
            if _attr(n, "transB", 0) != 1 or _attr(n, "transA", 0) != 0 or _attr(n, "alpha", 1.0) != 1.0:
                skipped[n.name] = "Gemm without transB=1 (or with transA/alpha)"
                continue
            layers.append(Layer(n.name, "Gemm", n.input[1], bias, n.input[0]))
            continue
        w = inits[n.input[1]]
        if len(w.dims) != 4:
            skipped[n.name] = f"{len(w.dims) - 2}-d convolution (only 2-d)"
            continue
        if _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            skipped[n.name] = "auto_pad"
            continue
        layers.append(
            Layer(
                n.name,
                "Conv",
                n.input[1],
                bias,
                n.input[0],
                group=int(_attr(n, "group", 1)),
                kernel=tuple(w.dims[2:]),
                strides=tuple(_attr(n, "strides", [1, 1])),
                pads=tuple(_attr(n, "pads", [0, 0, 0, 0])),
                dilations=tuple(_attr(n, "dilations", [1, 1])),
            )
        )
    return layers, skipped


def _columns(layer: Layer, x: np.ndarray, keep: int, rng: np.random.Generator) -> Any:
    """``keep`` random im2col columns of the layer's input, (groups, d, keep); d = in-channels/group x kernel."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if layer.op == "Gemm":
        return t.reshape(len(t), -1).T[None]
    top, left, bottom, right = layer.pads
    b, c, h, w = t.shape
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    hp, wp = h + top + bottom, w + left + right
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    total = b * oh * ow
    pick = rng.choice(total, min(keep, total), replace=False)
    bi = torch.from_numpy(pick // (oh * ow))[:, None, None]
    # rows and columns in the unpadded map; the padding's positions read as zeros (masked), not by padding a copy
    yi = torch.from_numpy((pick // ow) % oh * sh - top)[:, None, None] + torch.arange(kh)[None, :, None] * dh
    xi = torch.from_numpy(pick % ow * sw - left)[:, None, None] + torch.arange(kw)[None, None, :] * dw
    padded = any(layer.pads)
    if padded:
        inside = ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w))[..., None]
        yi, xi = yi.clamp(0, h - 1), xi.clamp(0, w - 1)
    # (N, kh, kw, C) patches at the picked output positions, gathered without unfolding the whole map
    patches = t.permute(0, 2, 3, 1)[bi, yi, xi]
    if padded:
        patches = patches * inside
    patches = patches.permute(0, 3, 1, 2)  # (N, C, kh, kw): the weight's layout
    g = layer.group
    cols = patches.reshape(len(pick), g, (c // g) * kh * kw).permute(1, 2, 0)
    return cols


# The last Hessian collection, taken by the next identical one: ``granularity: measured`` and GPTQ rounding read
# the same inputs of the same layers (same file, samples, columns and seed), and each pass over a CNN's
# calibration set takes tens of seconds. Kept only below this size.
_MEMO: dict[str, list[tuple[Any, Any, int]]] = {}  # key -> each layer's (Hessian sum, column sum, count)
MEMO_BYTES = 1 << 30


def _memo_key(src: Path, layers: list[Layer], x: dict[str, np.ndarray], *args: Any) -> str:
    import hashlib

    h = hashlib.blake2b(Path(src).read_bytes(), digest_size=16)
    for k in sorted(x):
        h.update(k.encode())
        h.update(str((x[k].shape, x[k].dtype)).encode())
        h.update(np.ascontiguousarray(x[k]).data)
    h.update(repr(([lay.node for lay in layers], args)).encode())
    return h.hexdigest()


def collect(
    src: Path, layers: list[Layer], x: dict[str, np.ndarray], batch: int, max_columns: int, seed: int, hessian: bool = True
) -> None:
    """Run the graph on the calibration inputs and accumulate each layer's input Hessian and mean column."""
    import onnx

    from keiryo.passes.quantize_ranges import tensor_session

    key = None
    if hessian and all(lay.act_q is None and lay.count == 0 for lay in layers):
        key = _memo_key(src, layers, x, batch, max_columns, seed)
        stats = _MEMO.pop(key, None)
        if stats is not None:
            for lay, (h, mean, count) in zip(layers, stats, strict=True):
                lay.h, lay.mean, lay.count = h, mean, count
            return

    wanted = list(dict.fromkeys(lay.input for lay in layers))
    sess = tensor_session(onnx.load(str(src)), wanted)
    n = len(next(iter(x.values())))
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        feed = {k: v[start : start + batch] for k, v in x.items()}
        acts = dict(zip(wanted, sess.run(wanted, feed), strict=True))
        rows = len(next(iter(feed.values())))
        for lay in layers:
            # a random subset of positions per batch: the Hessian's estimate, not every pixel
            accumulate(lay, acts[lay.input], max(1, max_columns * rows // max(n, 1)), rng, hessian)
    _MEMO.clear()
    if key is not None and sum(lay.h.nbytes + lay.mean.nbytes for lay in layers) <= MEMO_BYTES:
        _MEMO[key] = [(lay.h, lay.mean, lay.count) for lay in layers]


def accumulate(lay: Layer, x: np.ndarray, keep: int, rng: np.random.Generator, hessian: bool) -> None:
    """Add ``keep`` random im2col columns of the layer's input ``x`` (NCHW, or rows for Gemm) to its sums."""
    import torch

    cols = _columns(lay, x, keep, rng)
    if hessian:
        h = (cols @ cols.transpose(1, 2)).double()
        lay.h = h if lay.h is None else lay.h + h
    if lay.act_q is not None:  # the same columns quantized as the int8 input (padding zeros stay zero)
        sc, zp, lo, hi = lay.act_q
        sq = ((torch.clamp(torch.round(cols / sc) + zp, lo, hi) - zp) * sc).sum(-1).double()
        lay.mean_q = sq if lay.mean_q is None else lay.mean_q + sq
    s = cols.sum(-1).double()
    lay.mean = s if lay.mean is None else lay.mean + s
    lay.count += cols.shape[-1]


def grid_scales(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """onnxruntime's symmetric int8 weight scales: max|w| / 127 per output channel (axis 0) or per tensor."""
    flat = np.abs(w.reshape(len(w), -1))
    s = flat.max(1) if per_channel else np.full(len(w), flat.max())
    s = s / 127.0
    return np.where(s > 0, s, 1.0).astype(np.float32)


def gptq(w: Any, h: Any, scale: Any, damp: float, free_last: bool = False) -> Any:
    """Round ``w`` (groups, rows, d) on the grid ``scale`` (groups, rows, 1) with per-group Hessians ``h`` (groups, d, d);
    ``free_last``: the last column (a bias) is not rounded and takes the error pushed onto it."""
    import torch

    w = w.clone()
    g, _, d = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    h = h.clone()
    h[dead.unsqueeze(-1).expand_as(h) & dead.unsqueeze(-2).expand_as(h)] = 0
    eye = torch.eye(d, dtype=h.dtype).expand(g, d, d)
    h = h + eye * (damp * diag.clamp_min(0).mean(-1, keepdim=True).clamp_min(1e-12)).unsqueeze(-1) + eye * dead.unsqueeze(-1)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(d):
        col = w[:, :, i]
        if free_last and i == d - 1:
            q[:, :, i] = col
            break
        qi = torch.clamp(torch.round(col / scale[..., 0]), -127, 127) * scale[..., 0]
        q[:, :, i] = qi
        err = (col - qi) / hinv[:, i, i].unsqueeze(-1)
        w[:, :, i + 1 :] -= err.unsqueeze(-1) * hinv[:, i, i + 1 :].unsqueeze(1)
    return q


def round_layer(w: np.ndarray, lay: Layer, rounding: str, per_channel: bool, damp: float) -> tuple[Any, Any, Any]:
    """``w`` (out-channels first) on its int8 grid, rounded to nearest or by GPTQ with the layer's Hessian; the
    bias shift ``E[W x] - E[W_q x]`` that corrects the rounding's mean error (from the layer's mean column); the grid."""
    import torch

    scale = grid_scales(w, per_channel)
    g = lay.group
    rows = len(w) // g
    wt = torch.from_numpy(w.reshape(g, rows, -1)).double()
    st = torch.from_numpy(scale.reshape(g, rows, 1)).double()
    if rounding == "gptq":
        q = gptq(wt, lay.h / lay.count, st, damp)
    else:
        q = torch.clamp(torch.round(wt / st), -127, 127) * st
    delta = ((wt - q) @ (lay.mean / lay.count).unsqueeze(-1)).reshape(-1).float().numpy()
    return q.reshape(w.shape).float().numpy(), delta, scale


def round_weights(
    src: Path,
    dst: Path,
    x: dict[str, np.ndarray],
    *,
    rounding: str,
    bias_correction: str,
    per_channel: bool | dict[str, bool],
    batch: int = 8,
    max_columns: int = 8192,
    damp: float = 0.01,
    nodes: list[str] | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Write ``dst``: ``src`` with int8-grid weights (``rounding`` nearest|gptq) and corrected biases.

    ``per_channel``: one grid for every weight, or each weight initializer's (missing: per-channel).
    Returns the ``TensorQuantOverrides`` that pin onnxruntime to those scales, and a summary for the pass info.
    """
    import onnx
    from onnx import numpy_helper

    n = len(next(iter(x.values())))
    if rounding == "gptq" and n < MIN_ROUNDING_SAMPLES:
        raise DataError(
            f"rounding=gptq got {n} calibration sample(s); it needs at least {MIN_ROUNDING_SAMPLES} "
            "(raise --calib-size or calib_samples)"
        )
    model = onnx.load(str(src))
    layers, skipped = weight_layers(model, nodes)
    if not layers:
        raise PassError(f"{src.name}: no Conv/Gemm layer with constant weights to round")
    collect(src, layers, x, batch, max_columns, seed, hessian=rounding == "gptq")
    inits = {i.name: i for i in model.graph.initializer}
    nodes_by_name = {nd.name: nd for nd in model.graph.node}
    overrides: dict[str, list[dict[str, Any]]] = {}
    shifts = []
    for lay in layers:
        w = numpy_helper.to_array(inits[lay.weight]).astype(np.float32)
        pc = per_channel if isinstance(per_channel, bool) else per_channel.get(lay.weight, True)
        q_np, delta, scale = round_layer(w, lay, rounding, pc, damp)
        inits[lay.weight].CopyFrom(numpy_helper.from_array(q_np, lay.weight))
        if bias_correction != "off":
            if lay.bias is None:
                lay.bias = f"{lay.weight}_keiryo_bias"
                model.graph.initializer.append(numpy_helper.from_array(np.zeros(len(w), np.float32), lay.bias))
                inits[lay.bias] = model.graph.initializer[-1]
                node = nodes_by_name[lay.node]
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = lay.bias
            b = numpy_helper.to_array(inits[lay.bias]).astype(np.float32)
            inits[lay.bias].CopyFrom(numpy_helper.from_array((b + delta).astype(np.float32), lay.bias))
            shifts.append(float(np.abs(delta).max()))
        if pc:
            overrides[lay.weight] = [{"axis": 0, "scale": np.float32(s), "zero_point": np.int8(0)} for s in scale]
        else:
            overrides[lay.weight] = [{"scale": np.float32(scale[0]), "zero_point": np.int8(0)}]
    onnx.save(model, str(dst))
    info = {
        "rounding": rounding,
        "bias_correction": bias_correction,
        "layers": len(layers),
        "columns_per_layer": int(min(lay.count for lay in layers)),
    }
    if shifts:
        info["max_bias_shift"] = round(max(shifts), 6)
    if skipped:
        info["not_rounded"] = skipped
    return overrides, info


def overrides_to_json(overrides: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {k: [{**o, "scale": float(o["scale"]), "zero_point": int(o["zero_point"])} for o in v] for k, v in overrides.items()}


def overrides_from_json(data: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Scales and zero points typed as onnxruntime's overrides expect them (float32, int8)."""
    return {
        k: [{**o, "scale": np.float32(o["scale"]), "zero_point": np.int8(o["zero_point"])} for o in v] for k, v in data.items()
    }


def correct_biases_on_int8_inputs(
    src: Path, rounded: Path, qdq: Path, x: dict[str, np.ndarray], batch: int = 8, max_columns: int = 16384, seed: int = 0
) -> dict[str, Any]:
    """Bias correction for the int8 model's inputs as well as its weights: each layer's bias in ``rounded`` becomes
    ``b + W E[x] - W_q E[Q(x)]``, with ``x`` the layer's fp32 input (``src``) and ``Q`` the int8 quantization the
    ``qdq`` file applies to it (its scale and zero point), so the mean shift that rounding and clipping the
    layer's own input cause is removed too. Upstream layers are corrected themselves: no shift is counted twice."""
    import onnx
    from onnx import numpy_helper

    ref = onnx.load(str(src))
    layers, _ = weight_layers(ref)
    qmodel = onnx.load(str(qdq), load_external_data=False)
    qinits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    producer = {o: nd for nd in qmodel.graph.node for o in nd.output}
    q_nodes = {nd.name: nd for nd in qmodel.graph.node if nd.op_type in ("Conv", "Gemm")}
    for lay in layers:
        node = q_nodes.get(lay.node)
        dq = producer.get(node.input[0]) if node is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in qinits:
            continue  # a float input (an excluded layer): its weights' correction only
        zp = qinits.get(dq.input[2], np.uint8(0)) if len(dq.input) > 2 else np.uint8(0)
        info = np.iinfo(zp.dtype)
        lay.act_q = (float(qinits[dq.input[1]]), int(zp), int(info.min), int(info.max))
    collect(src, layers, x, batch, max_columns, seed, hessian=False)
    model = onnx.load(str(rounded))
    inits = {i.name: i for i in model.graph.initializer}
    ref_inits = {i.name: i for i in ref.graph.initializer}
    by_name = {nd.name: nd for nd in model.graph.node}
    shifts = []
    for fl in layers:
        node = by_name.get(fl.node)
        if node is None or len(node.input) < 3 or not node.input[2]:
            continue  # the rounding pass gives every layer a bias
        w = numpy_helper.to_array(ref_inits[fl.weight]).astype(np.float64)
        wq = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        g = fl.group
        e_fp = (fl.mean / fl.count).numpy()  # (g, d)
        e_q = ((fl.mean_q if fl.mean_q is not None else fl.mean) / fl.count).numpy()
        rows = len(w) // g
        delta = np.einsum("grd,gd->gr", w.reshape(g, rows, -1), e_fp) - np.einsum("grd,gd->gr", wq.reshape(g, rows, -1), e_q)
        b0 = numpy_helper.to_array(ref_inits[fl.bias]).astype(np.float64) if fl.bias else np.zeros(len(w))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((b0 + delta.reshape(-1)).astype(np.float32), node.input[2]))
        shifts.append(float(np.abs(delta).max()))
    onnx.save(model, str(rounded))
    return {
        "int8_input_layers": sum(lay.act_q is not None for lay in layers),
        "max_bias_shift": round(max(shifts, default=0.0), 6),
    }


def restore_float_layers(rounded: Path, original: Path, nodes: set[str], dst: Path) -> Path:
    """``rounded`` with the weight and bias of each node in ``nodes`` (layers kept float) taken back from
    ``original``, written to ``dst``: a layer onnxruntime leaves in float runs with its own weights, not with the
    int8-grid ones the rounding pass computed for every layer (and cached for any choice of float layers). A bias
    the rounding pass added to a bias-less layer becomes zeros."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(rounded))
    ref = onnx.load(str(original))
    ref_inits = {i.name: i for i in ref.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in nodes or node.op_type not in ("Conv", "Gemm"):
            continue
        for name in node.input[1:3]:
            if not name or name not in inits:
                continue
            if name in ref_inits:
                inits[name].CopyFrom(ref_inits[name])
            else:  # the rounding pass's own bias: the layer had none
                zeros = np.zeros_like(numpy_helper.to_array(inits[name]))
                inits[name].CopyFrom(numpy_helper.from_array(zeros, name))
    onnx.save(model, str(dst))
    return dst
