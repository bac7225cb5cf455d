"""The privacy path from the CLI: `keiryo train --dp` -> compress -> package --encrypt-to -> verify, with the
DP guarantee in the weights, results.json and the signed manifest; the bad inputs each give one line."""

from __future__ import annotations

import json
import math

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
    bad_mode = ("--dp", "--target-epsilon", "3", "--grad-sample-mode", "fast")
    code, _, err = run_cli("train", *MODEL, *bad_mode, "--out", w, capsys=capsys)
    assert code == 2 and "grad_sample_mode" in one_line_error(err) and "ghost" in one_line_error(err)


def test_dp_training_with_ghost_clipping_from_the_command_line(tmp_path, capsys):
    import json

    from safetensors import safe_open

    w = tmp_path / "w.safetensors"
    args = ["--epochs", "2", "--batch-size", "32", "--dp", "--target-epsilon", "8", "--grad-sample-mode", "ghost"]
    code, _, err = run_cli("train", *MODEL, *args, "--out", str(w), capsys=capsys)
    assert code == 0, err
    with safe_open(str(w), "pt") as f:
        rec = json.loads(f.metadata()["keiryo.privacy"])
    assert rec["grad_sample_mode"] == "ghost" and rec["epsilon"] <= 8.0


def test_public_pretraining_with_dp_ready_layers_then_a_dp_fine_tune(tmp_path, capsys):
    """`--dp-ready` trains on public data (font-digits) with the layers DP-SGD needs (BatchNorm -> GroupNorm),
    records the conversion in the weights file, and a `--dp` fine-tune on the private digits takes those weights
    on: the DP record names the whole conversion, and both files reload into the original factory."""
    from safetensors import safe_open

    from keiryo.data import load_data
    from keiryo.model import load_model
    from keiryo.model.handle import ModelSpec
    from keiryo.privacy.dp import NORM_CONVERSION_KEY

    pre, fine = tmp_path / "public.safetensors", tmp_path / "dp.safetensors"
    code, out, err = run_cli(
        "train", "--model", "keiryo.testing:tiny_cnn", "--data", "font-digits", "--data-opt", "samples=400",
        "--epochs", "1", "--dp-ready", "--out", str(pre), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "dp-ready: 2 layer(s) replaced for DP-SGD: 2 BatchNorm2d -> GroupNorm" in out and "privacy:" not in out
    assert "(first: features.1 BatchNorm2d(8) -> GroupNorm(4, 8))" in out
    with safe_open(str(pre), "pt") as f:
        meta = f.metadata()
    assert "keiryo.privacy" not in meta  # trained without DP: no guarantee is claimed
    conversion = json.loads(meta[NORM_CONVERSION_KEY])
    assert [c["to"] for c in conversion] == ["GroupNorm(4, 8)", "GroupNorm(8, 16)"]

    args = ["--epochs", "1", "--batch-size", "128", "--dp", "--target-epsilon", "8"]
    code, out, err = run_cli("train", *MODEL, "--weights", str(pre), *args, "--out", str(fine), capsys=capsys)
    assert code == 0, err
    with safe_open(str(fine), "pt") as f:
        rec = json.loads(f.metadata()["keiryo.privacy"])
    assert rec["norm_conversion"] == conversion  # what the weights carried, though this run replaced nothing
    digits = load_data("digits")
    for w in (pre, fine):
        h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(w)), digits, output_name="logits")
        assert type(h.module.features[1]).__name__ == "GroupNorm" and h.metadata["norm_conversion"] == conversion

    # a weights file whose recorded conversion does not fit the model, or is not JSON: one line naming the file
    from safetensors.torch import load_file, save_file

    state = load_file(str(pre))
    for i, bad in enumerate(('[{"layer": "features.nope", "groups": 4, "channels": 8, "to": "GroupNorm(4, 8)"}]', "{oops")):
        w = tmp_path / f"bad{i}.safetensors"
        save_file(state, str(w), metadata={**meta, NORM_CONVERSION_KEY: bad})
        args = ["--weights", str(w), "--epochs", "1", "--out", str(tmp_path / "o.safetensors")]
        code, _, err = run_cli("train", *MODEL, *args, capsys=capsys)
        assert code == 2 and str(w) in one_line_error(err), err
        assert ("does not fit keiryo.testing:tiny_cnn" if i == 0 else "metadata is not JSON") in one_line_error(err)


@pytest.mark.slow
def test_a_federated_model_with_client_dp_carries_its_record_into_the_signed_manifest(tmp_path, capsys):
    """A federated model's client-level DP record (its weights' ``keiryo.federated`` metadata) flows through
    compress into results.json and the signed manifest, and ``keiryo verify`` prints it. The federated run itself
    needs Flower (tests/federated); here its outputs are written by the same function the ServerApp calls."""
    from keiryo.privacy.federated import FederatedConfig, server_setup, write_outputs

    mlp = {"hidden": [16]}
    cfg = FederatedConfig.parse(
        {"clients": 4, "rounds": 3, "fraction": 0.5, "model_options": mlp, "out": str(tmp_path / "fl"),
         "dp": {"epsilon": 0.8, "delta": 1e-5, "clipping_norm": 2.0}}
    )  # fmt: skip
    rounds = [
        {"round": r, "clients_ok": 2, "clients_failed": [], "partitions": parts, "upload_bytes": 10, "fp32_bytes": 80}
        for r, parts in ((1, [0, 1]), (2, [0, 2]), (3, [0, 3]))
    ]
    s = write_outputs(cfg, server_setup(cfg), rounds, [], 1.0)
    assert s["privacy"]["model"]["rounds"] == 3  # client 0 took part in all 3 rounds: the model's epsilon is its own

    model = ("--model", "zoo:mlp", "--model-opt", "hidden=[16]", "--data", "digits")
    w = str(tmp_path / "fl" / "model.safetensors")
    code, out, err = run_cli("compress", *model, "--weights", w, "--recipe", "int8", "--out", str(tmp_path / "c"),
                             "--iterations", "10", "--calib-data", "synthetic", capsys=capsys)  # fmt: skip
    assert code == 0, err
    rec = json.loads((tmp_path / "c" / "results.json").read_text())["model"]["privacy"]
    assert rec["mechanism"] == "client-level local DP" and rec["accountant"] == "rdp"
    assert rec["delta"] == 1e-5 and rec["clipping_norm"] == 2.0 and rec["rounds"] == 3 and rec["rounds_total"] == 3
    assert rec["clients"] == 4 and rec["clients_per_round"] == 2 and rec["per_round"] == {"epsilon": 0.8, "delta": 1e-5}
    assert rec["epsilon"] < rec["epsilon_by_accountant"]["basic"] == pytest.approx(2.4)  # RDP composes tighter than 3 x 0.8
    assert rec["noise_multiplier"] == pytest.approx((2 * math.log(1.25e5)) ** 0.5 / 0.8, rel=1e-5)  # Flower's sigma / clip

    assert run_cli("keygen", "--out", str(tmp_path / "sign.pem"))[0] == 0
    pkg = tmp_path / "pkg"
    code, out, err = run_cli("package", str(tmp_path / "c"), "--name", "fl", "--version", "1.0.0",
                             "--key", str(tmp_path / "sign.pem"), "--out", str(pkg), capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((pkg / "keiryo.json").read_text())["privacy"] == rec
    code, out, err = run_cli("verify", str(pkg), "--public-key", str(tmp_path / "sign.pub.pem"), capsys=capsys)
    assert code == 0, err
    out = " ".join(out.split())  # the console wraps long lines
    line = f"privacy: ({rec['epsilon']:g}, 1e-05)-DP (client-level local DP, RDP accountant, basic composition 2.4): "
    assert line + "clipping norm 2, noise multiplier" in out and "3 rounds, 4 clients (2 per round)" in out
