"""Drift: reference statistics of a model's evaluation data, and running summaries to compare against them.

At measurement time (:func:`reference_stats`, called by ``keiryo.measure.measure_artifact`` on the test split
and the candidate's own outputs on its runtime) a candidate records, in ``results.json`` ``metrics.drift_reference``
and then in its package manifest (``drift_reference``):

- per float input, the mean and standard deviation, per channel for images (axis 1 of ``N, C, H, W``) or over
  all values otherwise;
- for a classification output, the distribution of the predicted class (argmax) over the test split.

A server keeps a :class:`DriftMonitor` per model: per batch it adds per-channel sums and
predicted-class counts (a subsample of at most 256 values per channel and row for big inputs), in chunks of
``window_rows // 10`` rows; the last ``window_rows`` rows are the window. Once the window holds at least half
of that, every finished chunk yields a :class:`DriftReading`: the population stability index (PSI) of the
predicted classes against the reference, ``sum((p - q) * ln(p / q))`` (both smoothed by 1e-4), and per input
the largest ``|mean - ref_mean| / ref_std`` over its channels. PSI under 0.1 is usually read as no change,
0.1-0.2 as moderate, over 0.2 as a significant shift (the server's default threshold).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

PSI_EPS = 1e-4
SAMPLE_PER_CHANNEL = 256  # values per row and channel a server looks at (a strided subsample of bigger inputs)


def _channel_axis(x: np.ndarray) -> int | None:
    return 1 if x.ndim == 4 else None  # N, C, H, W images; anything else is summarised over all its values


def reference_stats(
    inputs: dict[str, np.ndarray], outputs: list[np.ndarray], output_names: list[str], task: dict[str, Any]
) -> dict[str, Any]:
    """The reference a server compares its traffic with (see the module docstring)."""
    ref: dict[str, Any] = {"rows": int(len(next(iter(inputs.values())))) if inputs else 0, "inputs": {}}
    for name, x in inputs.items():
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.size == 0:
            continue  # token ids and masks: their mean says little
        axis = _channel_axis(x)
        v = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1) if axis is not None else x.reshape(1, -1)
        v = v.astype(np.float64)
        ref["inputs"][name] = {
            "axis": axis,
            "mean": [round(float(m), 6) for m in v.mean(1)],
            "std": [round(float(s), 6) for s in v.std(1)],
        }
    k = int(task.get("output", 0) or 0)
    if "classification" in str(task.get("name", "")) and k < len(outputs) and outputs[k].ndim == 2 and outputs[k].shape[1] >= 2:
        y = outputs[k]
        counts = np.bincount(y.argmax(1), minlength=y.shape[1])
        ref["predictions"] = {
            "output": output_names[k] if k < len(output_names) else str(k),
            "classes": int(y.shape[1]),
            "distribution": [round(float(c), 6) for c in counts / max(1, counts.sum())],
        }
    return ref


def psi(observed: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two distributions (counts or frequencies) over the same bins."""
    p = np.asarray(observed, np.float64)
    q = np.asarray(expected, np.float64)
    p = p / max(p.sum(), 1e-12) + PSI_EPS
    q = q / max(q.sum(), 1e-12) + PSI_EPS
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass(frozen=True)
class DriftReading:
    rows: int  # rows in the window
    psi: float | None  # None: no classification output in the reference
    input_shift: dict[str, float]  # input -> max over channels of |mean - ref_mean| / ref_std


class _Sums:
    """Per-channel counts and sums of the sampled values, counts of predicted classes."""

    def __init__(self, ref: dict[str, Any]):
        self.rows = 0
        self.n = {k: 0 for k in ref["inputs"]}
        self.s = {k: np.zeros(len(v["mean"])) for k, v in ref["inputs"].items()}
        pred = ref.get("predictions")
        self.counts = np.zeros(pred["classes"], np.int64) if pred else None

    def add(self, other: _Sums, sign: int) -> None:
        self.rows += sign * other.rows
        for k in self.s:
            self.n[k] += sign * other.n[k]
            self.s[k] += sign * other.s[k]
        if self.counts is not None and other.counts is not None:
            self.counts += sign * other.counts


class DriftMonitor:
    """Running summaries of one served model's inputs and predictions over a sliding window of rows.

    :meth:`observe` is called once per batch (from the session's thread); ``on_reading`` gets a
    :class:`DriftReading` at every finished chunk once the window is half full."""

    def __init__(self, reference: dict[str, Any], *, window_rows: int = 1000, on_reading: Callable[[DriftReading], None]):
        self.ref = reference
        self.window_rows = max(10, int(window_rows))
        self.chunk_rows = max(1, self.window_rows // 10)
        self.on_reading = on_reading
        self._chunk = _Sums(reference)
        self._chunks: deque[_Sums] = deque()
        self._window = _Sums(reference)
        self._ref_mean = {k: np.asarray(v["mean"]) for k, v in reference["inputs"].items()}
        self._ref_std = {k: np.maximum(np.asarray(v["std"]), 1e-6) for k, v in reference["inputs"].items()}
        pred = reference.get("predictions")
        self._pred_out = pred["output"] if pred else None
        self._ref_dist = np.asarray(pred["distribution"]) if pred else None

    @staticmethod
    def from_manifest(manifest: dict[str, Any], **kw: Any) -> DriftMonitor | None:
        ref = manifest.get("drift_reference")
        if not isinstance(ref, dict) or not (ref.get("inputs") or ref.get("predictions")):
            return None  # packaged before drift references were recorded, or nothing to compare
        return DriftMonitor(ref, **kw)

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        c = self._chunk
        rows = 0
        for name, spec in self.ref["inputs"].items():
            x = inputs.get(name)
            if x is None or x.dtype.kind != "f":
                continue
            rows = len(x)
            axis = spec["axis"]
            v = x.reshape(len(x), x.shape[1], -1) if axis is not None else x.reshape(len(x), 1, -1)
            step = max(1, v.shape[2] // SAMPLE_PER_CHANNEL)
            if step > 1:
                v = v[:, :, ::step]
            c.n[name] += v.shape[0] * v.shape[2]
            c.s[name] += np.add.reduce(v, axis=(0, 2), dtype=np.float64)
        if c.counts is not None:
            y = outputs.get(self._pred_out) if self._pred_out else None
            if y is not None and y.ndim == 2 and y.shape[1] == len(c.counts):
                rows = len(y)
                c.counts += np.bincount(y.argmax(1), minlength=len(c.counts))
        c.rows += rows
        if c.rows >= self.chunk_rows:
            self._rotate()

    def _rotate(self) -> None:
        self._chunks.append(self._chunk)
        self._window.add(self._chunk, +1)
        self._chunk = _Sums(self.ref)
        while self._chunks and self._window.rows - self._chunks[0].rows >= self.window_rows:
            self._window.add(self._chunks.popleft(), -1)
        if self._window.rows >= self.window_rows // 2:
            self.on_reading(self.reading())

    def reading(self) -> DriftReading:
        w = self._window
        shift = {}
        for k in w.s:
            if w.n[k] == 0:
                continue
            mean = w.s[k] / w.n[k]  # n: values seen per channel
            shift[k] = round(float(np.max(np.abs(mean - self._ref_mean[k]) / self._ref_std[k])), 6)
        value = None
        if w.counts is not None and self._ref_dist is not None and w.counts.sum() > 0:
            value = round(psi(w.counts, self._ref_dist), 6)
        return DriftReading(int(w.rows), value, shift)


def crossed(previous: float | None, value: float | None, threshold: float) -> bool:
    """Whether a reading just went over the threshold (not on every reading while it stays over)."""
    if value is None or not math.isfinite(value) or value <= threshold:
        return False
    return previous is None or previous <= threshold
