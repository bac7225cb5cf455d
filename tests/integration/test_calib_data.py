"""--calib-data: post-training quantization calibrated on a public or synthetic set instead of the private
train split (a DP guarantee covers the former, not the latter); results.json records which was used."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import one_line_error, run_cli

from keiryo.data import load_data
from keiryo.data.splits import with_calibration
from keiryo.errors import ConfigError, DataError


def test_calibration_sources_are_recorded(digits):
    assert digits.summary()["calibration"] == {"source": "train", "rows": 64, "train_split": True}
    syn = with_calibration(digits, "synthetic", 32, seed=1)
    x = syn.calib.inputs["image"]
    assert x.shape == (32, *digits.calib.inputs["image"].shape[1:]) and x.dtype == torch.float32 and 0 <= x.min() < x.max() < 1
    assert syn.summary()["calibration"]["source"] == "synthetic" and not syn.summary()["calibration"]["train_split"]
    assert syn.fingerprint() != digits.fingerprint()  # cached steps are not reused across calibration sets
    public = with_calibration(digits, "digits", 16, seed=7)  # stands in for a public set of the same shape
    assert len(public.calib) == 16 and public.summary()["calibration"]["source"] == "digits"
    assert with_calibration(digits, "train") is digits
    with pytest.raises(DataError, match="--calib-data sensors: inputs"):
        with_calibration(digits, "sensors")
    with pytest.raises(ConfigError, match="synthetic calibration covers float inputs"):
        with_calibration(load_data("tokens"), "synthetic")


@pytest.mark.slow
def test_compress_calibrates_on_synthetic_inputs(tmp_path, tiny_weights, capsys):
    out = tmp_path / "c"
    code, _, err = run_cli(
        "compress", "--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights),
        "--recipe", "int8", "--calib-data", "synthetic", "--calib-size", "64", "--iterations", "10", "--out", str(out),
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["calibration"]["source"] == "synthetic" and res["data"]["calibration"]["rows"] == 64
    assert [c["status"] for c in res["candidates"]] == ["ok"] * len(res["candidates"])
    code, _, err = run_cli(
        "compress", "--model", "keiryo.testing:tiny_cnn", "--weights", str(tiny_weights), "--recipe", "int8",
        "--calib-data", "sensors", "--out", str(tmp_path / "d"), capsys=capsys,
    )  # fmt: skip
    assert code != 0 and "--calib-data sensors" in one_line_error(err)
