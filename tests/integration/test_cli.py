"""The CLI end to end: real data, real exports, real onnxruntime; every bad input from the issue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from keiryo.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "keiryo.testing:tiny_cnn"]


def run_cli(*args: str, capsys=None) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def one_line_error(err: str) -> str:
    """The error is exactly one line, the last one on stderr (progress lines may come before it)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line at the end, got:\n{err}"
    assert "Traceback" not in err
    return errors[0]


# ---------------------------------------------------------------- happy paths


def test_compress_results_contract(tiny_results):
    out, results = tiny_results
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["best"] == results["best"]
    for key in ("baseline", "candidates", "best", "constraints", "machine", "model", "data", "task", "failed"):
        assert key in on_disk
    assert on_disk["schema_version"] == 2 and on_disk["failed"] == 0
    assert on_disk["task"]["name"] == "classification" and on_disk["task"]["drop"] == "accuracy_drop"
    io = on_disk["model"]["io"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in io["inputs"]] == [("image", "float32", ["batch", 1, 8, 8])]
    assert [(t["name"], t["shape"]) for t in io["outputs"]] == [("logits", ["batch", 10])]
    base = on_disk["baseline"]["metrics"]
    assert base["samples"] == on_disk["data"]["sizes"]["test"] and base["accuracy_drop"] == 0.0
    lo, hi = base["accuracy_ci95"]
    assert 0 <= lo <= base["accuracy"] <= hi <= 1
    cpu = on_disk["machine"]["cpu"]
    assert {"model", "int8_dot_product", "int8_isa"} <= set(cpu) and on_disk["machine"]["threads"] == 1
    assert {"torch", "onnxruntime", "numpy"} <= set(on_disk["machine"]["libraries"])
    names = [c["name"] for c in on_disk["candidates"]]
    assert names == ["fp32", "int8", "int8-dynamic", "fp16"]  # fp32 reference added first
    required = {
        "accuracy",
        "fidelity",
        "size_bytes",
        "size_gzip_bytes",
        "params",
        "macs",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "throughput_per_s",
        "threads",
        "peak_rss_mb",
    }
    for c in on_disk["candidates"]:
        assert c["status"] == "ok", c
        assert {"name", "recipe", "format", "artifact", "metrics"} <= set(c)
        assert required <= set(c["metrics"]), required - set(c["metrics"])
        assert {"accuracy_ci95", "fidelity_ci95", "accuracy_drop"} <= set(c["metrics"])
        assert c["metrics"]["samples"] == base["samples"]
        assert (out / c["artifact"]).is_file()
        assert c["metrics"]["size_bytes"] == (out / c["artifact"]).stat().st_size
        assert c["metrics"]["latency_p50_ms"] <= c["metrics"]["latency_p95_ms"] <= c["metrics"]["latency_p99_ms"]
    by = {c["name"]: c["metrics"] for c in on_disk["candidates"]}
    assert by["fp32"]["fidelity"] == 1.0 and by["fp32"]["export_parity"]["passed"]
    assert by["int8"]["fidelity"] >= 0.95
    assert by["fp16"]["fidelity"] >= 0.99
    # fp16 halves the weight bytes; on this 3k-parameter model graph overhead dominates the file, so the
    # whole-file ratio (about 2x on the demo model) is asserted in test_demo.py
    import onnx

    def weight_bytes(name: str) -> int:
        m = onnx.load(str(out / f"candidates/{name}/model.onnx"))
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer)

    assert 1.9 < weight_bytes("fp32") / weight_bytes("fp16") <= 2.0
    assert by["fp16"]["size_ratio_vs_fp32"] > 1.2
    assert weight_bytes("fp32") / weight_bytes("int8") > 2.5
    assert (out / "baseline.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_train_then_compress_from_the_cli(tmp_path, capsys):
    w = tmp_path / "tiny.safetensors"
    code, out, err = run_cli("train", *TINY, "--data", "digits", "--epochs", "3", "--out", str(w), capsys=capsys)
    assert code == 0, err
    assert w.is_file() and "test" in out
    code, out, err = run_cli(
        "compress",
        *TINY,
        "--weights",
        str(w),
        "--recipe",
        "int8",
        "--out",
        str(tmp_path / "c"),
        "--iterations",
        "10",
        capsys=capsys,
    )
    assert code == 0, err
    assert "int8" in out and "results:" in out
    for column in ("accuracy % ±95%", "accuracy_drop pt", "fidelity ±95%"):
        assert column in out
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert res["model"]["weights"] == str(w)


def test_training_is_reproducible(digits):
    from conftest import classification

    from keiryo.model import load_model
    from keiryo.train import TrainConfig, train

    def once():
        h = load_model("keiryo.testing:tiny_cnn", digits, output_name="logits")
        r = train(h, digits, classification(h), TrainConfig(epochs=2, seed=3, threads=1), progress=False)
        return h.content_hash(), r.best_val, r.test_metrics["accuracy"]

    assert once() == once()


def test_recipe_file_and_dry_run(tmp_path, capsys):
    r = tmp_path / "mine.yaml"
    r.write_text("name: mine\nsteps:\n  - type: quantize.int8_static\n    params: {calibration: entropy, per_channel: false}\n")
    code, out, _ = run_cli(
        "compress", *TINY, "--recipe", str(r), "--recipe", "fp16", "--out", str(tmp_path / "o"), "--dry-run", capsys=capsys
    )
    assert code == 0
    assert "calibration: entropy" in out and "quantize.fp16" in out
    assert not (tmp_path / "o").exists()


def test_export_command_checks_parity(tmp_path, tiny_weights, capsys):
    code, out, err = run_cli(
        "export", *TINY, "--weights", str(tiny_weights), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), capsys=capsys
    )
    assert code == 0, err
    assert "parity ok" in out and (tmp_path / "m.onnx").is_file()
    # the fp32 file on onnxruntime predicts what torch predicts, on the whole test split
    m = re.search(
        r"fp32 on onnxruntime: test accuracy ([\d.]+) \(torch ([\d.]+)\), fidelity to torch ([\d.]+), (\d+) samples", out
    )
    assert m, out
    assert m[1] == m[2] and float(m[3]) == 1.0 and int(m[4]) == 360


def test_zoo_recipes_machine_listings(capsys):
    for cmd in ("zoo", "recipes", "machine"):
        assert main([cmd]) == 0
    out = capsys.readouterr().out
    for word in ("zoo:mobilenetv2", "zoo:transformer", "quantize.int8_static", "int8_dot_product"):
        assert word in out


def test_installed_console_script_runs():
    exe = Path(sys.executable).parent / "keiryo"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "compress" in proc.stdout
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "keiryo 0.1.0"


# ---------------------------------------------------------------- bad input


def _assert_no_output(path: Path) -> None:
    assert not path.exists(), f"{path} should not exist after a failure"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.partial-")]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "zoo:nope"], "unknown zoo model 'nope'"),
        (["--model", "missing_file.py:make"], "missing_file.py not found"),
        (["--model", "keiryo.testing:not_a_module"], "returned a dict; expected a torch.nn.Module"),
        (["--model", "keiryo.testing:tiny_cnn", "--model-opt", "num_classes=4"], "is outside the model's output range 0..3"),
        (["--model", "zoo:conv1d"], "zoo:conv1d takes inputs of rank 2"),
        (["--model", "zoo:mlp", "--model-opt", "hiden=3"], "unknown field 'hiden'"),
        (["--model", "zoo:mlp", "--recipe", "int9"], "recipe 'int9': not a built-in"),
        (["--model", "zoo:mlp", "--data", "nowhere.npz"], "nowhere.npz: file not found"),
        (["--model", "zoo:mlp", "--weights", "nowhere.safetensors"], "nowhere.safetensors: weights file not found"),
        (["--model", "zoo:mlp", "--max-accuracy-drop", "-1"], "bound must be >= 0"),
        (["--model", "zoo:mlp", "--max-drop", "-1"], "budget accuracy_drop: bound: Value error, bound must be >= 0"),
        (["--model", "zoo:mlp", "--constraint", "speed<=3"], "unknown metric 'speed'"),
        (["--model", "zoo:mlp", "--task", "nonsense"], "unknown task 'nonsense'"),
        (["--model", "zoo:mlp", "--task-opt", "output=probs"], "output 'probs' not among the model's outputs ['logits']"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if "--recipe" not in args:
        args = [*args, "--recipe", "int8"]
    code, _, err = run_cli("compress", *args, "--out", str(out), capsys=capsys)
    assert code != 0
    assert expected in one_line_error(err)
    _assert_no_output(out)


def test_bad_files(tmp_path, capsys, tiny_weights):
    out = tmp_path / "out"

    # pickle payload
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, evil)
    code, _, err = run_cli("compress", *TINY, "--weights", str(evil), "--recipe", "int8", "--out", str(out), capsys=capsys)
    assert code != 0 and "refused: the file contains pickled Python objects" in one_line_error(err)
    # mismatched weights
    code, _, err = run_cli(
        "compress", "--model", "zoo:mlp", "--weights", str(tiny_weights), "--recipe", "int8", "--out", str(out), capsys=capsys
    )
    assert code != 0 and "weights do not match the model; missing: net.1.weight" in one_line_error(err)
    # NaN in data
    x = np.random.rand(200, 1, 8, 8).astype(np.float32)
    x[3, 0, 0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(200) % 10)
    code, _, err = run_cli(
        "compress", *TINY, "--data", str(tmp_path / "nan.npz"), "--recipe", "int8", "--out", str(out), capsys=capsys
    )
    assert code != 0 and "NaN/Inf" in one_line_error(err)
    # data whose shape does not fit a fixed model
    np.savez(tmp_path / "flat.npz", x=np.random.rand(200, 20).astype(np.float32), y=np.arange(200) % 10)
    code, _, err = run_cli(
        "compress",
        *TINY,
        "--model-opt",
        "input_shape=[1,8,8]",
        "--data",
        str(tmp_path / "flat.npz"),
        "--recipe",
        "int8",
        "--out",
        str(out),
        capsys=capsys,
    )
    assert code != 0 and "cannot take the data's inputs (x (2, 20) float32, batch first) as forward(x)" in one_line_error(err)
    # unknown recipe step and unknown field in a recipe file
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - type: quantize.int4_magic\n")
    code, _, err = run_cli("compress", *TINY, "--recipe", str(bad), "--out", str(out), capsys=capsys)
    assert code != 0 and "unknown step type 'quantize.int4_magic'" in one_line_error(err)
    bad.write_text("steps:\n  - type: quantize.int8_static\n    params: {calibraton: minmax}\n")
    code, _, err = run_cli("compress", *TINY, "--recipe", str(bad), "--out", str(out), capsys=capsys)
    assert code != 0 and "unknown field 'calibraton'" in one_line_error(err)
    _assert_no_output(out)


def test_unexportable_model_names_the_op(tmp_path, capsys):
    f = tmp_path / "histc.py"
    f.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n        x = x.flatten(1)\n        return self.fc(x + torch.histc(x, bins=64).unsqueeze(0))\n"
        "def make():\n    return M()\n"
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        "compress", "--model", f"{f}:make", "--recipe", "int8", "--iterations", "5", "--out", str(out), capsys=capsys
    )
    # every recipe fails at the export: each is recorded with its reason, and the exit code says so
    assert code == 4, err
    assert "2 of 2 candidates failed" in one_line_error(err)
    res = json.loads((out / "results.json").read_text())
    assert res["failed"] == 2 and res["best"] is None
    assert [c["name"] for c in res["candidates"]] == ["fp32", "int8"]
    for c in res["candidates"]:
        assert c["status"] == "failed" and c["failed_step"] == "export.onnx" and "artifact" not in c
        assert "cannot export op aten.histc.default" in c["error"]
    assert not (out / "candidates").exists() and not (out / "work").exists()


def test_parity_failure_is_an_error_unless_overridden(tmp_path, capsys, tiny_weights):
    out = tmp_path / "out"
    args = ["compress", *TINY, "--weights", str(tiny_weights), "--recipe", "fp32", "--iterations", "5"]
    code, _, err = run_cli(*args, "--parity-tolerance", "1e-12", "--out", str(out), capsys=capsys)
    # the recipe whose export does not match is recorded as failed at the export step, with no artifact
    assert code == 4, err
    assert "1 of 1 candidates failed" in one_line_error(err)
    res = json.loads((out / "results.json").read_text())
    (fp32,) = res["candidates"]
    assert res["failed"] == 1 and res["best"] is None
    assert fp32["status"] == "failed" and fp32["failed_step"] == "export.onnx" and "artifact" not in fp32
    assert "export does not match torch" in fp32["error"] and "output 'logits'" in fp32["error"]
    assert not (out / "candidates").exists()
    out = tmp_path / "out2"
    code, _, err = run_cli(*args, "--parity-tolerance", "1e-12", "--no-parity-check", "--out", str(out), capsys=capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    parity = res["candidates"][0]["metrics"]["export_parity"]
    assert res["failed"] == 0 and parity["passed"] is False and parity["max_abs_diff_tolerance"] == 1e-12
    assert set(parity["outputs"]) == {"logits"} and parity["top1_agreement"] >= 0.99


def test_existing_output_is_not_clobbered(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("compress", *TINY, "--recipe", "int8", "--out", str(out), capsys=capsys)
    assert code != 0 and "exists and is not empty" in one_line_error(err)
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    exe = Path(sys.executable).parent / "keiryo"
    base = [str(exe), "compress", "--model", "zoo:nope", "--recipe", "int8", "--out", str(tmp_path / "o")]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
    debug = subprocess.run([str(exe), "--debug", *base[1:]], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_doctor_reports_coverage_exports_and_warnings(capsys):
    code, out, err = run_cli("doctor", *TINY, "--model-opt", "width=6", "--json", capsys=capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["exports"]["onnx"]["ok"] and rep["exports"]["onnx"]["op_types"]["Conv"] == 2
    assert rep["techniques"]["prune.structured"]["not"] == {"head": "output layer: the class count is fixed"}
    assert any("not multiples of 8" in w and "features.0 (6)" in w for w in rep["warnings"])
    assert any("no latency gain" in w for w in rep["warnings"])


def test_doctor_takes_inputs_without_data(capsys):
    code, out, err = run_cli("doctor", *TINY, "--model-opt", "width=6", "--json", capsys=capsys)
    assert code == 0, err
    from_data = json.loads(out)
    args = ["doctor", *TINY, "--model-opt", "width=6", "--json"]
    code, out, err = run_cli(*args, "--input", "image:float32[1,8,8]", capsys=capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["params"], rep["macs"]) == (from_data["params"], from_data["macs"])
    assert rep["exports"]["onnx"]["ok"] and rep["exports"]["onnx"]["op_types"] == from_data["exports"]["onnx"]["op_types"]
    # the model is built for the declared input, not for digits
    code, out, err = run_cli(*args, "--input", "image:float32[3,16,16]", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["macs"] > 3 * rep["macs"]
    code, _, err = run_cli(*args, "--input", "image:float33[1,8,8]", capsys=capsys)
    assert code != 0 and "dtype float33 is not one of" in one_line_error(err)
    code, _, err = run_cli(*args, "--input", "image:float32[1,8,8]", "--data", "digits", capsys=capsys)
    assert code != 0 and "give --data or --input, not both" in one_line_error(err)


def test_error_messages_are_printed_verbatim(tmp_path, capsys):
    """Brackets in a message (split names, shape syntax) are text, not console markup."""
    code, _, err = run_cli("doctor", *TINY, "--input", "image-float32", capsys=capsys)
    assert code != 0 and "expected NAME:DTYPE[d1,d2,...], e.g. input_ids:int64[128]" in one_line_error(err)
    out = tmp_path / "o"
    code, _, err = run_cli("compress", *TINY, "--model-opt", "num_classes=4", "-r", "int8", "--out", str(out), capsys=capsys)
    assert code != 0 and re.search(r"digits \[(test|calib)\]: label \d+ \(sample \d+\) is outside", one_line_error(err))


@pytest.mark.parametrize("task", ["auto", "regression"])
def test_max_drop_is_the_tasks_drop_metric(task, tmp_path, capsys):
    x = np.random.default_rng(0).random((300, 8), dtype=np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=x.sum(1))
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        "compress",
        "--model",
        "zoo:mlp",
        "--data",
        str(tmp_path / "reg.npz"),
        "--task",
        task,
        "--max-drop",
        "2",
        "-r",
        "fp16",
        "--iterations",
        "5",
        "--out",
        str(out),
        capsys=capsys,
    )
    assert code == 0, err
    assert "mae ±95%" in stdout and "mae_increase %" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"]["name"] == "regression" and res["task"]["drop"] == "mae_increase_pct"
    assert res["constraints"] == [{"metric": "mae_increase_pct", "op": "<=", "bound": 2.0}]
    fp16 = next(c for c in res["candidates"] if c["name"] == "fp16")
    assert fp16["status"] == "ok" and abs(fp16["metrics"]["mae_increase_pct"]) < 2.0
    assert fp16["metrics"]["export_parity"]["top1_agreement"] is None  # no classes: no top-1
    assert res["best"] is not None


def test_recipes_sharing_a_torch_prefix_compute_it_once(tmp_path, capsys, tiny_weights):
    base = "steps:\n  - type: prune.structured\n    params: {ratio: 0.25, round_to: null}\n"
    (tmp_path / "p.yaml").write_text("name: p\n" + base)
    (tmp_path / "pq.yaml").write_text("name: pq\n" + base + "  - type: quantize.int8_static\n")
    code, _, err = run_cli(
        "compress",
        *TINY,
        "--weights",
        str(tiny_weights),
        "--recipe",
        str(tmp_path / "p.yaml"),
        "--recipe",
        str(tmp_path / "pq.yaml"),
        "--iterations",
        "5",
        "--out",
        str(tmp_path / "o"),
        capsys=capsys,
    )
    assert code == 0, err
    assert "reused" in err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    pq = next(c for c in res["candidates"] if c["name"] == "pq")
    assert res["failed"] == 0 and pq["status"] == "ok", pq
    assert pq["steps"][0]["cached"] is True and pq["steps"][0]["type"] == "prune.structured"
    assert {"params", "macs", "size_bytes", "size_gzip_bytes", "accuracy"} <= set(pq["steps"][0])
    assert pq["metrics"]["macs"] < res["baseline"]["metrics"]["macs"]
    # the pruned model is exported once too: the second recipe's export (and its parity check) is the first's
    p = next(c for c in res["candidates"] if c["name"] == "p")
    assert "onnx export: the same as an earlier recipe's, reused" in err
    assert pq["steps"][1] == {**p["steps"][1], "cached": True} and pq["steps"][1]["type"] == "export.onnx"
