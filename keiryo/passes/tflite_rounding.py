"""Weight rounding and bias correction for TFLite full-integer int8, done on the float .tflite before
ai-edge-quantizer quantizes it.

ai-edge-quantizer rounds each weight to its nearest int8 level (symmetric, scale = max|w| / 127 per output channel
or per tensor). As for onnxruntime (:mod:`keiryo.passes.quantize_rounding`), that is not the best int8 weight on
depthwise-separable CNNs: the rounding errors of a folded 3x3 depthwise kernel add up to a shift of the layer's mean
output. Here, on the float file's CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops with constant float weights:

1. the float model runs on the calibration samples with every tensor kept, and each layer's input gives its
   im2col columns (TFLite's NHWC layout and SAME/VALID padding turned into the NCHW layer keiryo's ONNX rounding
   reads): the input Hessian and mean column;
2. the weights are rounded on ai-edge-quantizer's own grid, to nearest or by GPTQ, and the bias takes the mean
   output error ``E[W x] - E[W_q x]`` (bias correction);
3. the rounded weights are written back into the float file, in place (the bytes of the same buffers), each
   channel's largest weight kept at +-127 steps so that ai-edge-quantizer's minmax grid is exactly the one they were
   rounded on and its own rounding of them changes nothing.

A layer without a bias tensor is rounded without the correction; a weight shared by two ops is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.passes.quantize_rounding import Layer, accumulate, round_layer

_CONV, _DEPTHWISE, _FC = 3, 4, 9  # tflite BuiltinOperator codes
CONVOLUTIONS = (_CONV, _DEPTHWISE)
_FLOAT32 = 0  # tflite TensorType


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Op:
    """One weight layer of the float file: keiryo's ``Layer`` (ONNX layout) and the views of its tensors' bytes."""

    def __init__(self, lay: Layer, weight: np.ndarray, to_onnx: Any, from_onnx: Any, bias: np.ndarray | None):
        self.lay, self.weight, self.bias = lay, weight, bias
        self.to_onnx, self.from_onnx = to_onnx, from_onnx

    def layer_input(self, x: np.ndarray) -> np.ndarray:
        """The op's input tensor as ``Layer`` reads it: NHWC -> NCHW for convolutions, rows for a fully connected op."""
        return x.reshape(-1, x.shape[-1]) if self.lay.op == "Gemm" else x.transpose(0, 3, 1, 2)


def _buffer_view(buf: bytearray, model: Any, tensor: Any) -> np.ndarray | None:
    """A writable float32 view of a constant float tensor's bytes in ``buf`` (None: not constant, not float32)."""
    if tensor.Type() != _FLOAT32:
        return None
    b = model.Buffers(tensor.Buffer())
    if b is None:
        return None
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    count = int(np.prod(shape)) * 4
    if b.Offset() > 1:  # stored after the flatbuffer (large models)
        start = int(b.Offset())
    elif b.DataLength() == count:
        start = b._tab.Vector(b._tab.Offset(4))  # the data vector's first byte
    else:
        return None
    return np.frombuffer(buf, np.uint8, count=count, offset=start).view(np.float32).reshape(shape)


def builtin_codes(model: Any) -> list[int]:
    """Each operator code's builtin operator (the larger of the current and deprecated fields) of a tflite ``Model``."""
    return [
        max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
        for i in range(model.OperatorCodesLength())
    ]


def weight_ops(buf: bytearray, subgraph: int) -> tuple[list[_Op], dict[str, str]]:
    """The float file's CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops with constant float weights."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(buf, 0)
    sg = model.Subgraphs(subgraph)
    codes = builtin_codes(model)
    uses: dict[int, int] = {}
    for i in range(sg.OperatorsLength()):
        for t in sg.Operators(i).InputsAsNumpy():
            uses[int(t)] = uses.get(int(t), 0) + 1
    ops, skipped = [], {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = codes[op.OpcodeIndex()]
        if code not in (_CONV, _DEPTHWISE, _FC):
            continue
        ins = [int(t) for t in op.InputsAsNumpy()]
        x_t, w_t = sg.Tensors(ins[0]), sg.Tensors(ins[1])
        name = sg.Tensors(int(op.OutputsAsNumpy()[0])).Name().decode()
        w = _buffer_view(buf, model, w_t)
        if w is None:
            skipped[name] = "weight is not a constant float32 tensor"
            continue
        if uses[ins[1]] > 1:
            skipped[name] = "weight shared with another op"
            continue
        bias = _buffer_view(buf, model, sg.Tensors(ins[2])) if len(ins) > 2 and ins[2] >= 0 else None
        x_name = x_t.Name().decode()
        if code == _FC:
            lay = Layer(name, "Gemm", "", None, x_name)
            ops.append(_Op(lay, w, lambda a: a, lambda a: a, bias))
            continue
        opts_table = op.BuiltinOptions()
        opts = fb.Conv2DOptions() if code == _CONV else fb.DepthwiseConv2DOptions()
        opts.Init(opts_table.Bytes, opts_table.Pos)
        _, ih, iw, cin = (int(d) for d in x_t.ShapeAsNumpy())
        sh, sw = opts.StrideH(), opts.StrideW()
        dh, dw = opts.DilationHFactor(), opts.DilationWFactor()
        if code == _CONV:  # (O, kh, kw, I/groups) -> (O, I/groups, kh, kw)
            kh, kw = w.shape[1:3]
            group = cin // w.shape[3]
            to_onnx, from_onnx = (lambda a: a.transpose(0, 3, 1, 2)), (lambda a: a.transpose(0, 2, 3, 1))
        else:  # (1, kh, kw, C x multiplier) -> (C x multiplier, 1, kh, kw)
            kh, kw = w.shape[1:3]
            group = cin
            to_onnx, from_onnx = (lambda a: a.transpose(3, 0, 1, 2)), (lambda a: a.transpose(1, 2, 3, 0))
        if opts.Padding() == fb.Padding.SAME:
            (top, bottom), (left, right) = _same_pads(ih, kh, sh, dh), _same_pads(iw, kw, sw, dw)
        else:
            top = bottom = left = right = 0
        lay = Layer(name, "Conv", "", None, x_name, group, (kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw))
        ops.append(_Op(lay, w, to_onnx, from_onnx, bias))
    return ops, skipped


def round_tflite(
    src: Path,
    dst: Path,
    calib: list[dict[str, np.ndarray]],
    *,
    rounding: str,
    bias_correction: bool,
    per_channel: bool,
    max_columns: int = 8192,
    damp: float = 0.01,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Write ``dst``: the float file ``src`` with its weights on ai-edge-quantizer's int8 grid (``rounding`` nearest or
    gptq) and, with ``bias_correction``, the biases corrected; a summary for the pass info."""
    from keiryo.passes.tflite_ranges import tensors_interpreter

    buf = bytearray(src.read_bytes())
    it, runner, sub = tensors_interpreter(src, threads)
    ops, skipped = weight_ops(buf, sub)
    index = {d["name"]: d["index"] for d in it.get_tensor_details(sub)}
    skipped.update({o.lay.node: "its input tensor has no name the interpreter knows" for o in ops if o.lay.input not in index})
    ops = [o for o in ops if o.lay.input in index]
    rng = np.random.default_rng(seed)
    keep = max(1, max_columns // max(len(calib), 1))
    for feed in calib:
        runner(**feed)
        for o in ops:
            accumulate(o.lay, o.layer_input(it.get_tensor(index[o.lay.input], sub)), keep, rng, hessian=rounding == "gptq")
    del runner, it
    corrected, pinned = 0, 0
    for o in ops:
        w = o.to_onnx(o.weight).astype(np.float32)
        q, delta, scale = round_layer(w, o.lay, rounding, per_channel, damp)
        pinned += _pin_grid(w, q, scale, per_channel)
        o.weight[...] = o.from_onnx(q)
        if bias_correction and o.bias is not None:
            o.bias[...] = o.bias + delta
            corrected += 1
    dst.write_bytes(bytes(buf))
    info: dict[str, Any] = {
        "rounding": rounding,
        "layers": len(ops),
        "bias_corrected": corrected,
        "grid_pinned_channels": pinned,
    }
    if skipped:
        info["not_rounded"] = skipped
    return info


def _pin_grid(w: np.ndarray, q: np.ndarray, scale: np.ndarray, per_channel: bool) -> int:
    """Keep the largest weight of each grid (channel or tensor) at +-127 steps, in place: ai-edge-quantizer derives
    the grid from max|w|, so a rounding that moved it would move the whole grid. Returns how many it set back."""
    rows_w, rows_q = w.reshape(len(w), -1), q.reshape(len(q), -1)
    groups = [np.arange(len(w))] if not per_channel else [np.array([r]) for r in range(len(w))]
    pinned = 0
    for g in groups:
        sub_w, sub_q = rows_w[g], rows_q[g]
        r, c = np.unravel_index(int(np.abs(sub_w).argmax()), sub_w.shape)
        target = np.float32(np.sign(sub_w[r, c]) * 127 * scale[g[0]])
        if sub_w[r, c] != 0 and sub_q[r, c] != target:
            rows_q[g[r], c] = target
            pinned += 1
    return pinned


def refit_tflite(
    fp32: Path,
    rounded: Path,
    calib: list[dict[str, np.ndarray]],
    quantize: Callable[[Path, Path], None],
    workdir: Path,
    *,
    per_channel: bool,
    chunk: int = 2,
    max_columns: int = 8192,
    damp: float = 0.01,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """``rounding="refit"`` on TFLite (:mod:`keiryo.passes.quantize_refit`): the weight layers of ``rounded`` (the float
    file with GPTQ-rounded weights, rewritten in place) solved in graph order, ``chunk`` at a time, for the input the
    int8 file gives them; ``quantize(float_file, int8_file)`` quantizes with the pass's fixed activation ranges, and
    the layers' inputs in the int8 file are read dequantized. The int8 file before any refit is left in ``workdir``
    as ``refit-start-int8.tflite``. Returns the summary for the pass info."""
    import shutil
    import time

    from ai_edge_quantizer.utils.tfl_interpreter_utils import invoke_interpreter_signature as invoke

    from keiryo.passes.quantize_refit import add_moments, refit_summary, solve_layer
    from keiryo.passes.quantize_rounding import _columns
    from keiryo.passes.tflite_ranges import SIGNATURE, tensors_interpreter

    t0 = time.perf_counter()
    buf = bytearray(rounded.read_bytes())
    ref_buf = bytearray(fp32.read_bytes())
    fp_it, fp_run, sub = tensors_interpreter(fp32, threads)
    ops, _ = weight_ops(buf, sub)
    refs = {o.lay.node: o for o in weight_ops(ref_buf, sub)[0]}
    fp_index = {d["name"]: d["index"] for d in fp_it.get_tensor_details(sub)}
    todo = [o for o in ops if o.bias is not None and o.lay.node in refs and o.lay.input in fp_index]
    keep = max(1, max_columns // max(len(calib), 1))
    before, after, ridges = [], [], []
    for i in range(0, len(todo), chunk):
        layers = todo[i : i + chunk]
        current, qfile = workdir / "refit-float.tflite", workdir / "refit-int8.tflite"
        current.write_bytes(bytes(buf))
        quantize(current, qfile)
        if i == 0:  # the gptq file, before any refit: what the pass falls back to
            shutil.copyfile(qfile, workdir / "refit-start-int8.tflite")
        q_it, _, q_sub = tensors_interpreter(qfile, threads)
        q_det = {d["name"]: d for d in q_it.get_tensor_details(q_sub)}
        stats = {o.lay.node: [[0, 0, 0, 0], [0, 0, 0, 0]] for o in layers}
        for k, feed in enumerate(calib):
            fp_run(**feed)
            invoke(q_it, feed, SIGNATURE)  # the int8 file's int8 input: the sample quantized with its scale
            for j, o in enumerate(layers):
                d = q_det.get(o.lay.input)
                if d is None:
                    continue
                xq = q_it.get_tensor(d["index"], q_sub)
                scale, zero = d["quantization"]
                xq = (xq.astype(np.float32) - zero) * np.float32(scale) if xq.dtype.kind in "iu" and scale else xq
                xf = fp_it.get_tensor(fp_index[o.lay.input], sub)
                cols = []
                for x in (xf, xq):
                    s = seed + 7919 * k + j  # the same positions of the same sample in both files
                    cols.append(_columns(o.lay, o.layer_input(x), keep, np.random.default_rng(s)))
                add_moments(stats[o.lay.node][k % 2], *cols)
        del q_it
        for o in layers:
            if not stats[o.lay.node][0][3]:
                continue  # its input is not int8 in the quantized file
            ref = refs[o.lay.node]
            w = ref.to_onnx(ref.weight).astype(np.float64)
            assert ref.bias is not None
            qw, qb, scale, rec = solve_layer(w, ref.bias.astype(np.float64), o.lay.group, stats[o.lay.node], per_channel, damp)
            _pin_grid(w.astype(np.float32), qw, scale, per_channel)
            o.weight[...] = o.from_onnx(qw)
            o.bias[...] = qb  # type: ignore[index]
            before.append(rec[0])
            after.append(rec[1])
            ridges.append(rec[2])
    rounded.write_bytes(bytes(buf))
    return refit_summary(before, after, ridges, chunk, t0)
