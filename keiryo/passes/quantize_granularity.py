"""Per-layer quantization granularity chosen by measured error (``granularity: measured`` of the int8 static pass).

By habit every weight is quantized per output channel and every activation asymmetrically (onnxruntime's
defaults). Here each choice is measured on the calibration inputs, layer by layer, and the simpler form is kept
wherever it costs no more than ``granularity_tolerance`` extra error:

- **weights, per-tensor or per-channel**: the expected squared error of the layer's *output*, ``tr(dW H dW^T)``
  with ``H`` the second moment of the layer's inputs on the calibration data (the statistic GPTQ uses), for the
  int8 weights rounded on each grid. One scale per tensor is what every int8 kernel and delegate takes; it is kept
  where the channels' ranges are alike, and per-channel scales where one channel's range would starve the others;
- **activations, symmetric or asymmetric**: the rounding error of the tensor itself over its calibrated range, on
  the calibration values. A one-sided tensor (after ReLU) needs the asymmetric grid (the symmetric one wastes half
  its levels); a tensor centred on zero (a residual sum, an embedding) loses nothing with a zero point of 0 (int8)
  or 128 (uint8), which saves the integer kernels their zero-point corrections.

The choices go to ``quantize_static`` as ``TensorQuantOverrides`` and into the pass info (``granularity``:
counts, and each layer's choice with both errors). Weights are measured for the layers GPTQ rounds (Conv, and
Gemm with transB=1); others keep ``per_channel``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.passes.quantize_rounding import collect, grid_scales, weight_layers


def _weight_error(w: np.ndarray, h: Any, group: int, per_channel: bool) -> float:
    """``tr(dW H dW^T)`` summed over groups, for ``w`` rounded on the symmetric int8 grid onnxruntime uses."""
    import torch

    scale = grid_scales(w, per_channel)
    rows = len(w) // group
    wt = torch.from_numpy(w.reshape(group, rows, -1)).double()
    st = torch.from_numpy(scale.reshape(group, rows, 1)).double()
    d = wt - torch.clamp(torch.round(wt / st), -127, 127) * st
    return float(torch.einsum("grd,gde,gre->", d, h, d))


def weight_granularity(
    src: Path, x: dict[str, np.ndarray], tolerance: float, *, rows: int = 64, max_columns: int = 8192
) -> dict[str, dict[str, Any]]:
    """``{weight initializer: {"per_channel": bool, "error_per_tensor": e, "error_per_channel": e}}`` (errors
    relative to the layer's float output energy ``tr(W H W^T)``)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(src))
    layers, _ = weight_layers(model)
    if not layers:
        return {}
    n = min(rows, len(next(iter(x.values()))))
    collect(src, layers, {k: v[:n] for k, v in x.items()}, 8, max_columns, 0, hessian=True)
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for lay in layers:
        w = numpy_helper.to_array(inits[lay.weight]).astype(np.float32)
        h = lay.h / max(lay.count, 1)
        wt = torch.from_numpy(w.reshape(lay.group, len(w) // lay.group, -1)).double()
        energy = float(torch.einsum("grd,gde,gre->", wt, h, wt)) or 1.0
        pt, pc = (_weight_error(w, h, lay.group, c) / energy for c in (False, True))
        out[lay.weight] = {
            "node": lay.node,
            "per_channel": bool(pt > pc * (1 + tolerance)),
            "error_per_tensor": round(pt, 8),
            "error_per_channel": round(pc, 8),
        }
    return out


def _grid_error(v: Any, lo: float, hi: float, symmetric: bool, signed: bool) -> float:
    """Squared error of ``v`` (a float32 tensor) on the 8-bit grid onnxruntime builds over ``[lo, hi]`` (its scale
    and zero point), summed in float64."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:  # int8: [-127, 127] around 0; uint8: zero point 128
        a = max(-lo, hi)
        scale, zp, qmin, qmax = (a / 127.0, 0, -127, 127) if signed else (2 * a / 255.0, 128, 0, 255)
    else:
        qmin, qmax = (-128, 127) if signed else (0, 255)
        scale = (hi - lo) / 255.0
        zp = round(qmin - lo / scale) if scale else 0
    scale = scale or 1.0
    q = torch.clamp(torch.round(v / scale) + zp, qmin, qmax)
    return float(((q - zp) * scale - v).square().sum(dtype=torch.float64))


def activation_symmetry(
    src: Path, ranges: dict[str, tuple[float, float]], x: dict[str, np.ndarray], tolerance: float, *, signed: bool, rows: int = 64
) -> dict[str, dict[str, Any]]:
    """``{activation: {"symmetric": bool, "error_asymmetric": e, "error_symmetric": e}}`` (mean squared error over
    the calibration values, relative to their mean square)."""
    import onnx
    import torch

    from keiryo.passes.quantize_ranges import tensor_session

    names = [k for k, (lo, hi) in ranges.items() if hi > lo]
    sess = tensor_session(onnx.load(str(src)), names)
    sums = {k: np.zeros(3) for k in names}  # asymmetric error, symmetric error, energy
    n = min(rows, len(next(iter(x.values()))))
    for start in range(0, n, 8):
        feed = {k: v[start : min(start + 8, n)] for k, v in x.items()}
        for k, v in zip(names, sess.run(names, feed), strict=True):
            t = torch.from_numpy(np.ascontiguousarray(v, np.float32))
            lo, hi = ranges[k]
            energy = float(t.square().sum(dtype=torch.float64))
            sums[k] += (_grid_error(t, lo, hi, False, signed), _grid_error(t, lo, hi, True, signed), energy)
    out = {}
    for k, (asym, sym, energy) in sums.items():
        norm = float(energy) or 1.0
        out[k] = {
            "symmetric": bool(sym <= asym * (1 + tolerance)),
            "error_asymmetric": round(float(asym) / norm, 8),
            "error_symmetric": round(float(sym) / norm, 8),
        }
    return out


def weight_choice(src: Path, x: dict[str, np.ndarray], cfg: Any, cache: Path | None) -> dict[str, dict[str, Any]]:
    """:func:`weight_granularity` for the int8 static pass's config, kept beside the calibration ``cache`` (the
    per-layer fallback quantizes the same file many times)."""
    keep = cache.with_suffix(".weight-granularity.json") if cache is not None else None
    if keep is not None and keep.is_file():
        return json.loads(keep.read_text())
    got = weight_granularity(src, x, cfg.granularity_tolerance, rows=cfg.rounding_samples)
    if keep is not None:
        keep.write_text(json.dumps(got))
    return got


def granularity_overrides(
    src: Path, cache: Path, x: dict[str, np.ndarray], cfg: Any, weights: dict[str, dict[str, Any]], report: dict[str, Any] | None
) -> dict[str, list[dict[str, Any]]]:
    """The ``TensorQuantOverrides`` of both choices (activations measured over the ranges in ``cache``, kept beside
    it); ``report["granularity"]`` gets their :func:`summary`."""
    from keiryo.passes.quantize_precision import _ranges

    keep = cache.with_suffix(".activation-symmetry.json")
    if keep.is_file():
        acts = json.loads(keep.read_text())
    else:
        signed = cfg.activation_type == "int8"
        acts = activation_symmetry(src, _ranges(cache), x, cfg.granularity_tolerance, signed=signed, rows=cfg.rounding_samples)
        keep.write_text(json.dumps(acts))
    choice = {"weights": weights, "activations": acts}
    if report is not None:
        report["granularity"] = summary(choice)
    return overrides(choice)


def overrides(choice: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides``: each measured weight per-channel (axis 0: Conv and Gemm-transB weights are
    output-channel first) or per-tensor, whatever ``per_channel`` says for the others; each activation's symmetry."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, c in choice["weights"].items():
        out[name] = [{"axis": 0}] if c["per_channel"] else [{"symmetric": True}]
    for name, c in choice["activations"].items():
        out[name] = [{"symmetric": bool(c["symmetric"])}]
    return out


def summary(choice: dict[str, Any]) -> dict[str, Any]:
    """What the pass info shows: counts, and each layer's choice with its two errors."""
    w, a = choice["weights"], choice["activations"]
    return {
        "weights_per_channel": sum(c["per_channel"] for c in w.values()),
        "weights_per_tensor": sum(not c["per_channel"] for c in w.values()),
        "activations_symmetric": sum(c["symmetric"] for c in a.values()),
        "activations_asymmetric": sum(not c["symmetric"] for c in a.values()),
        "weights": w,
        "activations": a,
    }
