"""Activation ranges for TFLite full-integer int8, computed by keiryo and handed to ``ai-edge-quantizer``.

ai-edge-quantizer's own calibration keeps a moving average (smoothing 0.95) of each sample's min and max: fed one
sample at a time, as a batch-1 edge model is, the range it settles on is about the average sample's, so every
larger value is clipped. On EfficientNet-Lite0 the logits' range came out as [-3.5, 7.5] where the fp32 model's
goes to [-4.9, 12.3], and the int8 file agreed with fp32 on 72% of the crops.

Here the float model runs on the calibration samples with every intermediate tensor kept, and each tensor that
ai-edge-quantizer calibrates (the ``template``: the names and shapes of its own statistics) gets

- ``minmax``: the absolute minimum and maximum over all samples;
- ``mse``: the range of least expected squared error over a histogram of its values (rounding noise inside,
  distance to the range outside; :func:`keiryo.passes.quantize_ranges.mse_range`, as for onnxruntime), int8
  asymmetric as LiteRT's int8 activations are.

The statistics go to ``Quantizer.quantize`` as its calibration result, so ai-edge-quantizer builds the file as usual
(its scale constraints between tensors included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from keiryo.passes.quantize_ranges import BINS, SAMPLES, mse_range

SIGNATURE = "serving_default"


def tensors_interpreter(src: Path, threads: int) -> tuple[Any, Any, int]:
    """An interpreter of ``src`` that keeps every intermediate tensor, its default signature's runner, and that
    signature's subgraph index."""
    from ai_edge_quantizer.utils import tfl_interpreter_utils as tiu

    it = tiu.create_tfl_interpreter(str(src), use_xnnpack=True, num_threads=threads, preserve_all_tensors=True)
    return it, it.get_signature_runner(SIGNATURE), tiu.get_signature_main_subgraph_index(it, SIGNATURE)


def activation_ranges(
    src: Path, calib: list[dict[str, np.ndarray]], method: str, template: dict[str, dict[str, Any]], threads: int = 1
) -> dict[str, dict[str, Any]]:
    """``template``'s statistics with keiryo's ``min``/``max`` (``method``: ``minmax`` or ``mse``) over ``calib``."""
    it, runner, sub = tensors_interpreter(src, threads)
    index = {d["name"]: d["index"] for d in it.get_tensor_details(sub)}
    names = [n for n in template if n in index]

    def tensors(feed: dict[str, np.ndarray]) -> Any:
        runner(**feed)
        for n in names:
            yield n, it.get_tensor(index[n], sub)

    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feed in calib:
        for n, v in tensors(feed):
            if v.dtype.kind == "f" and v.size:
                lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    ranges = {n: (lo[n], hi[n]) for n in names if hi[n] > lo[n]}
    if method == "mse":
        hists = {n: np.zeros(BINS, np.int64) for n in ranges}
        for feed in calib:
            for n, v in tensors(feed):
                if n in hists:
                    a, b = ranges[n]
                    flat = v.ravel()
                    flat = flat[:: max(1, flat.size // SAMPLES)]
                    idx = ((flat - a) * (BINS / (b - a))).astype(np.int64)
                    hists[n] += np.bincount(np.clip(idx, 0, BINS - 1), minlength=BINS)
        ranges = {n: mse_range(hists[n], *ranges[n], 256, symmetric=False) for n in ranges}
    out = dict(template)
    for n, (a, b) in ranges.items():
        shape = np.shape(template[n].get("min", ()))
        out[n] = {**template[n], "min": np.full(shape, a, np.float32), "max": np.full(shape, b, np.float32)}
    return out
