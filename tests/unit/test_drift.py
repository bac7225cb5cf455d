"""Drift reference statistics and the running monitor (keiryo/drift.py), on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from keiryo.drift import DriftMonitor, crossed, psi, reference_stats

TASK = {"name": "classification", "output": 0}


def _images(rng, n, means=(0.2, 0.7), std=0.1):
    x = rng.normal(size=(n, len(means), 6, 6)) * std + np.asarray(means)[None, :, None, None]
    return x.astype(np.float32)


def _logits(rng, n, probs):
    y = rng.choice(len(probs), size=n, p=probs)
    out = np.full((n, len(probs)), -1.0, np.float32)
    out[np.arange(n), y] = 1.0
    return out


def test_reference_has_per_channel_image_stats_overall_stats_and_the_predicted_class_distribution():
    rng = np.random.default_rng(0)
    x = _images(rng, 2000)
    feats = rng.normal(3.0, 2.0, size=(2000, 5)).astype(np.float32)
    ids = rng.integers(0, 100, size=(2000, 7))
    y = _logits(rng, 2000, [0.5, 0.3, 0.2])
    ref = reference_stats({"image": x, "features": feats, "ids": ids}, [y], ["logits"], TASK)
    assert ref["rows"] == 2000 and set(ref["inputs"]) == {"image", "features"}  # integer ids are not summarised
    img = ref["inputs"]["image"]
    assert img["axis"] == 1 and np.allclose(img["mean"], [0.2, 0.7], atol=0.01) and np.allclose(img["std"], 0.1, atol=0.01)
    f = ref["inputs"]["features"]
    assert f["axis"] is None and np.allclose(f["mean"], [3.0], atol=0.1) and np.allclose(f["std"], [2.0], atol=0.1)
    pred = ref["predictions"]
    assert pred["output"] == "logits" and pred["classes"] == 3 and np.isclose(sum(pred["distribution"]), 1)
    assert np.allclose(pred["distribution"], [0.5, 0.3, 0.2], atol=0.03)
    assert "predictions" not in reference_stats({"x": feats}, [feats], ["out"], {"name": "regression", "output": 0})


def test_psi_known_values():
    assert psi([50, 50], [0.5, 0.5]) == pytest.approx(0.0, abs=1e-9)
    # (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5) = 0.879
    assert psi([90, 10], [0.5, 0.5]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5), rel=1e-3)
    assert np.isfinite(psi([100, 0], [0.5, 0.5]))  # an empty bin is smoothed, not infinite


def _monitor(ref, window=400):
    readings = []
    return DriftMonitor(ref, window_rows=window, on_reading=readings.append), readings


def test_in_distribution_traffic_reads_low_and_shifted_traffic_moves_the_readings():
    rng = np.random.default_rng(1)
    probs = [0.5, 0.3, 0.2]
    ref = reference_stats({"image": _images(rng, 3000)}, [_logits(rng, 3000, probs)], ["logits"], TASK)
    mon, readings = _monitor(ref)
    for _ in range(40):  # batches of 8 rows, as a server would see them
        mon.observe({"image": _images(rng, 8)}, {"logits": _logits(rng, 8, probs)})
    assert readings, "no reading after 320 rows with a window of 400 (half full at 200)"
    calm = readings[-1]
    assert calm.psi < 0.05 and calm.input_shift["image"] < 0.2 and 200 <= calm.rows <= 400
    for _ in range(60):  # channel 1 moves by 3 std, and the model predicts class 2 almost always
        mon.observe({"image": _images(rng, 8, means=(0.2, 1.0))}, {"logits": _logits(rng, 8, [0.05, 0.05, 0.9])})
    moved = readings[-1]
    assert moved.psi > 0.5 and moved.input_shift["image"] == pytest.approx(3.0, abs=0.3)
    assert moved.rows <= 400  # the window slid: the calm rows are gone


def test_the_window_slides_back_and_crossing_is_reported_once():
    rng = np.random.default_rng(2)
    probs = [0.25, 0.25, 0.25, 0.25]
    ref = reference_stats({"image": _images(rng, 2000)}, [_logits(rng, 2000, probs)], ["logits"], TASK)
    mon, readings = _monitor(ref, window=200)
    for _ in range(50):
        mon.observe({"image": _images(rng, 8)}, {"logits": _logits(rng, 8, [1, 0, 0, 0])})
    for _ in range(50):
        mon.observe({"image": _images(rng, 8)}, {"logits": _logits(rng, 8, probs)})
    values = [r.psi for r in readings]
    assert max(values) > 1 and values[-1] < 0.1  # drifted, then back within one window
    flags = [crossed(a, b, 0.2) for a, b in zip([None, *values[:-1]], values, strict=True)]
    assert sum(flags) == 1 and flags[0]


def test_big_inputs_are_subsampled_and_still_estimate_the_mean():
    rng = np.random.default_rng(3)
    big = rng.normal(0.5, 0.1, size=(4, 3, 64, 64)).astype(np.float32)
    ref = reference_stats({"image": big}, [], [], TASK)
    mon, readings = _monitor(ref, window=10)
    for _ in range(3):
        mon.observe({"image": rng.normal(0.5, 0.1, size=(4, 3, 64, 64)).astype(np.float32)}, {})
    assert readings and readings[-1].input_shift["image"] < 0.2 and readings[-1].psi is None


def test_a_manifest_without_a_reference_has_no_monitor():
    assert DriftMonitor.from_manifest({}, on_reading=print) is None
    assert DriftMonitor.from_manifest({"drift_reference": {"rows": 0, "inputs": {}}}, on_reading=print) is None
