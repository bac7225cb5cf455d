"""The privacy path from the CLI: `keiryo train --dp` -> compress -> package --encrypt-to -> verify, with the
DP guarantee in the weights, results.json and the signed manifest; the bad inputs each give one line."""

from __future__ import annotations

import json

import pytest
from test_cli import one_line_error, run_cli

pytest.importorskip("opacus")

MODEL = ("--model", "keiryo.testing:tiny_cnn", "--data", "digits")


@pytest.mark.slow
def test_dp_training_flows_into_results_and_an_encrypted_signed_package(tmp_path, capsys, monkeypatch):
    from keiryo.privacy.encryption import KEY_ENV

    monkeypatch.delenv(KEY_ENV, raising=False)
    w = tmp_path / "dp.safetensors"
    code, out, err = run_cli(
        "train", *MODEL, "--epochs", "2", "--batch-size", "256", "--lr", "0.03",
        "--dp", "--target-epsilon", "6", "--out", str(w), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "privacy: (" in out and "-DP (DP-SGD, PRV accountant, RDP" in out
    code, out, err = run_cli(
        "compress", *MODEL, "--weights", str(w), "--recipe", "int8", "--out", str(tmp_path / "c"), "--iterations", "10",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    rec = res["model"]["privacy"]
    assert rec["target_epsilon"] == 6 and rec["epsilon"] <= 6 and rec["delta"] == 1e-4 and rec["accountant"] == "prv"
    assert {"noise_multiplier", "sample_rate", "steps", "max_grad_norm", "epsilon_by_accountant"} <= rec.keys()
    assert [c["to"] for c in rec["norm_conversion"]] == ["GroupNorm(4, 8)", "GroupNorm(8, 16)"]

    assert run_cli("keygen", "--out", str(tmp_path / "sign.pem"))[0] == 0
    code, out, err = run_cli("privacy", "keygen", "--out", str(tmp_path / "device.pem"), capsys=capsys)
    assert code == 0, err
    fingerprint = out.split("fingerprint ")[-1].strip()
    pkg = tmp_path / "pkg"
    code, out, err = run_cli(
        "package", str(tmp_path / "c"), "--name", "dp-tiny", "--version", "1.0.0", "--key", str(tmp_path / "sign.pem"),
        "--out", str(pkg), "--encrypt-to", str(tmp_path / "device.pub.pem"), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert f"for key {fingerprint}" in out and "privacy: (" in out
    m = json.loads((pkg / "keiryo.json").read_text())
    assert m["privacy"] == rec and m["encryption"]["recipient"] == fingerprint
    assert b"onnx" not in (pkg / "model.onnx").read_bytes()[:64]  # ciphertext, not an ONNX protobuf

    verify = ("verify", str(pkg), "--public-key", str(tmp_path / "sign.pub.pem"))
    code, out, err = run_cli(*verify, capsys=capsys)
    assert code == 2 and f"encrypted for key {fingerprint}; no decryption key given" in one_line_error(err)
    code, out, err = run_cli(*verify, "--no-golden", capsys=capsys)
    assert code == 0 and "privacy: (" in out and f"for key {fingerprint}" in out
    code, out, err = run_cli(*verify, "--decryption-key", str(tmp_path / "device.pem"), capsys=capsys)
    assert code == 0, err
    assert "golden vectors reproduce" in out and f"privacy: ({rec['epsilon']:g}, 0.0001)-DP" in out


def test_dp_bad_inputs_are_one_line_errors(tmp_path, capsys):
    w = str(tmp_path / "w.safetensors")
    code, _, err = run_cli("train", *MODEL, "--epochs", "2", "--dp", "--target-epsilon", "0.01", "--out", w, capsys=capsys)
    assert code == 2 and "the smallest reachable epsilon is" in one_line_error(err)
    code, _, err = run_cli("train", *MODEL, "--dp", "--out", w, capsys=capsys)
    assert code == 2 and "--dp needs --target-epsilon" in one_line_error(err)
    code, _, err = run_cli("train", *MODEL, "--target-epsilon", "3", "--out", w, capsys=capsys)
    assert code == 2 and "--target-epsilon: only with --dp" in one_line_error(err)
