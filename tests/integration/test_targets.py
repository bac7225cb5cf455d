"""TFLite (litert-torch + the LiteRT interpreter) and Core ML (coremltools) end to end, on real converters.

Core ML cannot run a model on Linux: there the packages are validated structurally, and the
prediction-parity test runs on macOS only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import classification
from test_cli import one_line_error, run_cli
from torch import nn

from keiryo.errors import BackendUnavailableError, ConfigError, DataError, PassError, UnsupportedOpError
from keiryo.export import Artifact, ParityConfig, check_parity, export
from keiryo.export.coreml import validate_mlpackage
from keiryo.model import ModelHandle, ModelSpec, load_model
from keiryo.model.io import IOSpec, TensorSpec
from keiryo.passes import PassContext, apply
from keiryo.passes.cluster import ClusterConfig
from keiryo.passes.prune_unstructured import UnstructuredPruneConfig
from keiryo.passes.quantize_coreml import CoremlInt8Config, CoremlPalettizeConfig, CoremlSparseConfig
from keiryo.passes.quantize_tflite import TfliteFp16Config, TfliteInt8Config, TfliteInt8DynamicConfig
from keiryo.runtime import open_session
from keiryo.testing import top1_accuracy
from keiryo.train import TrainConfig, train

on_macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS; Linux validates structure")


@pytest.fixture(scope="module")
def mlp(digits) -> ModelHandle:
    """An MLP with 84k weights: big enough that file sizes are dominated by weights."""
    h = load_model(ModelSpec(source="zoo:mlp", options={"hidden": [256, 256]}), digits, 10, output_name="logits")
    train(h, digits, classification(h), TrainConfig(epochs=6, lr=3e-3), progress=False)
    return h


@pytest.fixture(scope="module")
def mlp_tflite(mlp, tmp_path_factory):
    return export(mlp, "tflite", tmp_path_factory.mktemp("tfl") / "fp32.tflite")


def _accuracy(path: Path, runtime: str, digits) -> float:
    with open_session(runtime, path) as s:
        return top1_accuracy(s, digits.test)


def test_tflite_export_names_batch_and_parity(tiny_trained, digits, tmp_path):
    art = export(tiny_trained, "tflite", tmp_path / "m.tflite")
    assert art.runtime == "litert" and art.info["batch"] == 1 and art.info["input_dtypes"] == ["float32"]
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(art.info["op_types"])
    with open_session("litert", art.path, threads=2) as s:
        assert (s.input_names, s.output_names, s.threads) == (["image"], ["logits"], 2)
        assert s.run(digits.test[:5].numpy())[0].shape == (5, 10)  # a batch runs one row per invoke
        rep = check_parity(tiny_trained, s, digits.test, ParityConfig(), "tflite")
    assert rep.passed and rep.max_abs_diff < 1e-4 and rep.top1_agreement == 1.0
    assert set(rep.outputs) == {"logits"} and rep.outputs["logits"]["top1_agreement"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]  # nothing else left behind


def test_tflite_variants_sizes_and_accuracy_on_the_interpreter(mlp, mlp_tflite, digits, tmp_path):
    fp32_acc = _accuracy(mlp_tflite.path, "litert", digits)
    ctx = PassContext(data=digits, workdir=tmp_path)
    size = {"fp32": mlp_tflite.size_bytes}
    acc = {}
    for name, cfg in [
        ("fp16", TfliteFp16Config()),
        ("int8_dynamic", TfliteInt8DynamicConfig()),
        ("int8", TfliteInt8Config()),
        ("int8_tensorwise", TfliteInt8Config(granularity="tensorwise")),
    ]:
        ctx.step_index += 1
        res = apply(mlp_tflite, cfg, ctx)
        size[name] = res.model.size_bytes
        acc[name] = _accuracy(res.model.path, "litert", digits)
        if name.startswith("int8_t") or name == "int8":
            assert res.info["input_dtypes"] == ["int8"]  # full integer: int8 in, int8 out
            assert res.info["calib_samples"] == len(digits.calib)
    assert 1.8 < size["fp32"] / size["fp16"] < 2.1
    assert size["fp32"] / size["int8_dynamic"] > 3.3
    assert size["fp32"] / size["int8"] > 3.0 and size["fp32"] / size["int8_tensorwise"] > 3.5
    for name, a in acc.items():
        assert a > fp32_acc - 0.03, f"{name}: {a:.3f} vs fp32 {fp32_acc:.3f}"


def test_tflite_int8_ranges_cover_what_the_samples_reach_not_ai_edge_quantizers_moving_average(mlp, mlp_tflite, digits, tmp_path):
    """ai-edge-quantizer's own calibration averages each batch-1 sample's min/max (smoothing 0.95), so the logits'
    range stops near the average sample's and larger logits are clipped. keiryo's ``minmax`` covers the absolute
    range over the calibration samples, its ``mse`` (the default) trades a little clipping for finer steps; both
    give outputs closer to fp32 than the moving average."""
    from keiryo.runtime.litert import LiteRTSession

    x = digits.calib.numpy()
    with open_session("litert", mlp_tflite.path) as s:
        cal_logits = s.run(x)[0]
        ref = s.run(digits.test.numpy())[0]
    lo, hi = float(cal_logits.min()), float(cal_logits.max())
    ctx = PassContext(data=digits, workdir=tmp_path)
    kept, err = {}, {}
    for method in ("moving_average", "minmax", "mse"):
        ctx.step_index += 1
        res = apply(mlp_tflite, TfliteInt8Config(calibration=method, wide_outputs=False), ctx)
        assert res.info["calibration"] == method
        out = LiteRTSession(res.model.path)._out[0]  # int8 logits: the range they can hold
        kept[method] = (out.scale * (-128 - out.zero), out.scale * (127 - out.zero))
        with open_session("litert", res.model.path) as s:
            err[method] = float(np.mean((s.run(digits.test.numpy())[0] - ref) ** 2) / np.mean(ref**2))
    step = (hi - lo) / 255
    assert kept["minmax"][0] <= lo + step and kept["minmax"][1] >= hi - step, (kept["minmax"], lo, hi)
    assert kept["moving_average"][1] < hi - 0.1 * (hi - lo), (kept["moving_average"], hi)  # the clipping shown
    assert kept["moving_average"][1] < kept["mse"][1] <= kept["minmax"][1] + step
    assert err["minmax"] < err["moving_average"] and err["mse"] < err["moving_average"], err


def test_tflite_int8_weights_are_rounded_on_ai_edge_quantizers_own_grid_and_beat_its_nearest_rounding(
    tiny_zoo_trained, digits, tmp_path
):
    """keiryo rounds the float file's CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED weights (GPTQ, bias correction)
    on the grid ai-edge-quantizer then derives from them (max|w| / 127 per channel), so its own rounding changes
    nothing: the int8 file holds exactly keiryo's levels. On a depthwise-separable CNN the outputs are closer to
    fp32 than with ai-edge-quantizer's nearest rounding, and closer still with the layers refitted."""
    from keiryo.passes.quantize_tflite import representative_data
    from keiryo.passes.tflite_ranges import tensors_interpreter
    from keiryo.passes.tflite_rounding import round_tflite, weight_ops

    fp = export(tiny_zoo_trained, "tflite", tmp_path / "fp32.tflite")
    ctx = PassContext(data=digits, workdir=tmp_path / "w")
    calib = representative_data(ctx, None, "test")
    rounded = tmp_path / "rounded.tflite"
    info = round_tflite(fp.path, rounded, calib, rounding="gptq", bias_correction=True, per_channel=True)
    ops, skipped = weight_ops(bytearray(rounded.read_bytes()), 0)
    assert info["layers"] == len(ops) >= 10 and not skipped and info["bias_corrected"] == len(ops)
    assert {o.lay.op for o in ops} == {"Conv", "Gemm"} and any(o.lay.group > 1 for o in ops)  # depthwise among them
    levels = {}
    for o in ops:
        w = o.to_onnx(o.weight)
        w = w.reshape(len(w), -1)
        q = w / (np.abs(w).max(1, keepdims=True) / 127)
        assert np.abs(q - np.round(q)).max() < 1e-3 and np.all(np.abs(q).max(1) > 126.99)  # on the grid, max at 127
    # ai-edge-quantizer's own (nearest) rounding of the rounded file: every int8 weight is keiryo's level
    ctx.step_index += 1
    nearest_of_rounded = apply(
        Artifact(rounded, "tflite", "litert", fp.input_names, fp.output_names, {}),
        TfliteInt8Config(rounding="nearest", bias_correction=False),
        ctx,
    )
    it, _, sub = tensors_interpreter(nearest_of_rounded.model.path, 1)
    float_it, _, _ = tensors_interpreter(rounded, 1)
    float_w = {d["name"]: d for d in float_it.get_tensor_details(0)}
    for d in it.get_tensor_details(sub):
        qp = d["quantization_parameters"]
        if d["dtype"] == np.int8 and len(qp["scales"]) > 1 and d["name"] in float_w:
            axis = qp["quantized_dimension"]
            shape = [1] * len(d["shape"])
            shape[axis] = -1
            deq = it.get_tensor(d["index"], sub).astype(np.float32) * qp["scales"].reshape(shape)
            levels[d["name"]] = float(np.abs(deq - float_it.get_tensor(float_w[d["name"]]["index"], 0)).max())
    assert len(levels) >= len(ops) - 1 and max(levels.values()) < 1e-5, levels

    with open_session("litert", fp.path) as s:
        ref = s.run(digits.test.numpy())[0]
    err = {}
    for name, cfg in [
        ("nearest", TfliteInt8Config(rounding="nearest", bias_correction=False)),
        ("gptq", TfliteInt8Config()),
        ("refit", TfliteInt8Config(rounding="refit")),
        ("refit8", TfliteInt8Config(rounding="refit", refit_chunk=8)),  # overcorrects: gptq's file is kept
    ]:
        ctx.step_index += 1
        res = apply(fp, cfg, ctx)
        with open_session("litert", res.model.path) as s:
            err[name] = float(np.mean((s.run(digits.test.numpy())[0] - ref) ** 2) / np.mean(ref**2))
        if name.startswith("refit"):
            refit = res.info["refit"]
            assert refit["kept"] == (name == "refit") and refit["layers"] == len(ops), refit
            assert refit["kept"] == (refit["output_error"] <= refit["output_error_gptq"])
    assert err["gptq"] < 0.95 * err["nearest"] and err["refit"] < 0.95 * err["gptq"], err
    assert err["refit8"] == err["gptq"], err  # the fallback: the same file


def test_tflite_int8_wide_leading_keeps_the_first_convolutions_in_16_bits_and_the_rest_int8(tiny_zoo_trained, digits, tmp_path):
    """``wide_leading: 2``: every op up to the second convolution writes int16 activations (TFLite's 16x8 kernels,
    still integer), the weights stay int8 and every later op is int8; asking for more convolutions than the file
    has names the count and leaves no file."""
    from ai_edge_litert import schema_py_generated as fb

    from keiryo.passes.tflite_rounding import CONVOLUTIONS, builtin_codes
    from keiryo.runtime.litert import load_interpreter

    fp = export(tiny_zoo_trained, "tflite", tmp_path / "fp32.tflite")
    ctx = PassContext(data=digits, workdir=tmp_path / "w")
    res = apply(fp, TfliteInt8Config(wide_leading=2, rounding="nearest"), ctx)
    assert res.info["wide_leading"] == 2
    buf = res.model.path.read_bytes()
    model = fb.Model.GetRootAs(buf, 0)
    sg = model.Subgraphs(0)
    codes = builtin_codes(model)
    it = load_interpreter(res.model.path, delegate=False)
    dtype = {d["name"]: d["dtype"] for d in it.get_tensor_details()}
    convs, widths = 0, []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        if codes[op.OpcodeIndex()] in CONVOLUTIONS:
            convs += 1
            weight = sg.Tensors(int(op.InputsAsNumpy()[1])).Name().decode()
            assert dtype[weight] == np.int8, weight
            out = sg.Tensors(int(op.OutputsAsNumpy()[0])).Name().decode()
            widths.append(dtype[out])
    assert convs >= 10 and widths[:2] == [np.int16, np.int16] and set(widths[2:]) == {np.int8}, widths
    with open_session("litert", res.model.path) as s, open_session("litert", fp.path) as f:
        x = digits.test.numpy()
        assert (s.run(x)[0].argmax(1) == f.run(x)[0].argmax(1)).mean() > 0.9

    ctx.step_index += 1
    with pytest.raises(PassError, match=rf"wide_leading=500 but fp32.tflite has {convs} convolution\(s\)"):
        apply(fp, TfliteInt8Config(wide_leading=500), ctx)
    assert not list((tmp_path / "w").glob(f"{ctx.step_index:02d}*"))


def test_tflite_int8_rounding_from_too_few_samples_names_the_minimum(mlp_tflite, digits, tmp_path):
    ctx = PassContext(data=digits, workdir=tmp_path)
    with pytest.raises(DataError, match=r"rounding=gptq got 8 calibration sample\(s\); it needs at least 16"):
        apply(mlp_tflite, TfliteInt8Config(calib_samples=8), ctx)
    assert not list(tmp_path.rglob("*.tflite"))  # nothing half-written
    res = apply(mlp_tflite, TfliteInt8Config(calib_samples=8, rounding="nearest"), ctx)  # the way out it names
    assert res.info["weight_rounding"]["rounding"] == "nearest" and res.info["weight_rounding"]["bias_corrected"] > 0


class _Inner(nn.Module):
    def forward(self, x):
        return x + torch.histc(x, bins=64).unsqueeze(0)


class _Histc(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity(), _Inner())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(x.flatten(1)))


@pytest.mark.parametrize("target,suffix", [("tflite", ".tflite"), ("coreml", ".mlpackage"), ("onnx", ".onnx")])
def test_unsupported_op_is_named_with_its_layer_and_nothing_is_left(target, suffix, tmp_path):
    io = IOSpec(
        inputs=[TensorSpec(name="input", shape=["batch", 1, 8, 8])], outputs=[TensorSpec(name="logits", shape=["batch", 10])]
    )
    h = ModelHandle(_Histc(), io, ModelSpec(source="histc-model"))
    with pytest.raises(UnsupportedOpError, match=r"histc-model: .* cannot export op aten\.histc") as ei:
        export(h, target, tmp_path / f"m{suffix}")
    if target != "onnx":
        assert ei.value.layer == "blocks.1 (_Inner)"
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_names_it(tiny_trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'keiryo\[tflite\]'"):
        export(tiny_trained, "tflite", tmp_path / "m.tflite")
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'keiryo\[coreml\]'"):
        export(tiny_trained, "coreml", tmp_path / "m.mlpackage")


def test_coreml_structural_validation_and_compression(mlp, digits, tmp_path):
    art = export(mlp, "coreml", tmp_path / "fp32.mlpackage")
    assert art.info["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert art.info["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert "linear" in art.info["op_types"] and not art.info["compressed_weight_ops"]
    fp32_weights = art.info["weights_bytes"]
    assert fp32_weights > 4 * 84_000
    ctx = PassContext(data=digits, workdir=tmp_path / "w")
    ctx.step_index = 1
    q8 = apply(art, CoremlInt8Config(), ctx)
    assert q8.info["compressed_weight_ops"] == {"int8": 3} and q8.info["weights_ratio"] > 3.5
    ctx.step_index = 2
    p4 = apply(art, CoremlPalettizeConfig(nbits=4), ctx)
    assert p4.info["compressed_weight_ops"] == {"palettized": 3} and p4.info["weights_ratio"] > 6
    # the packages still declare the same interface
    assert validate_mlpackage(p4.model.path, inputs=art.info["inputs"], outputs=art.info["outputs"])["validated"]


def test_coreml_palettes_are_the_cluster_centroids_and_pruning_zeros_are_stored_sparsely(mlp, digits, tmp_path):
    ctx = PassContext(data=digits, workdir=tmp_path)
    fast = {"finetune": {"epochs": 1}}
    clustered = apply(mlp, ClusterConfig.parse({"clusters": 16, **fast}), ctx).model
    art = export(clustered, "coreml", tmp_path / "c.mlpackage")
    assert len(art.info["clustered"]) == 3
    ctx.step_index = 1
    p4 = apply(art, CoremlPalettizeConfig(nbits=4), ctx)
    assert p4.info["weights_with_cluster_centroids"] == 3  # every clustered weight kept its exact centroids
    pruned = apply(mlp, UnstructuredPruneConfig.parse({"sparsity": 0.8, **fast}), ctx).model
    art = export(pruned, "coreml", tmp_path / "p.mlpackage")
    ctx.step_index = 2
    sp = apply(art, CoremlSparseConfig(), ctx)
    assert sp.info["compressed_weight_ops"] == {"sparse": 3} and sp.info["weights_ratio"] > 2.5


@on_macos
def test_coreml_prediction_parity_on_macos(tiny_trained, digits, tmp_path):
    art = export(tiny_trained, "coreml", tmp_path / "m.mlpackage")
    with open_session("coreml", art.path) as s:
        rep = check_parity(tiny_trained, s, digits.test, ParityConfig(max_abs_diff=1e-2), "coreml")
    assert rep.passed


def test_cli_export_variants(tmp_path, tiny_weights, capsys):
    tiny = ["--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights)]
    code, out, err = run_cli(
        "export", *tiny, "--format", "tflite", "--variant", "int8", "--out", str(tmp_path / "m.tflite"), capsys=capsys
    )
    assert code == 0, err
    assert "parity ok" in out and "top-1 agreement" in out and "1 output(s)" in out
    m = re.search(
        r"tflite\.int8 on litert: test accuracy ([\d.]+) \(torch ([\d.]+)\), fidelity to torch ([\d.]+), (\d+) samples", out
    )
    assert m, out
    acc, torch_acc, fidelity, samples = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert samples == 360 and fidelity >= 0.9 and abs(acc - torch_acc) <= 0.05 and torch_acc > 0.5
    code, out, err = run_cli("export", *tiny, "--format", "coreml", "--out", str(tmp_path / "m.mlpackage"), capsys=capsys)
    assert code == 0, err
    assert "structure validated" in out and ("macOS" in out or sys.platform == "darwin")
    assert (tmp_path / "m.mlpackage" / "Manifest.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "tflite", "--out", "m.onnx"], "a tflite export is written to a .tflite path"),
        (["--format", "tflite", "--variant", "int8-fallback", "--out", "m.tflite"], "has no tflite equivalent"),
        (["--format", "tflite", "--parity-tolerance", "1e-12", "--out", "m.tflite"], "max abs diff"),
        (["--format", "coreml", "--variant", "palettize4", "--out", "m.mlpackage"], "no weight was compressed"),
        (["--format", "tensorrt", "--out", "m.plan"], "unknown export target 'tensorrt'"),
    ],
)
def test_cli_export_bad_input_leaves_nothing(args, message, tmp_path, tiny_weights, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights)]
    code, _, err = run_cli("export", *tiny, *args, capsys=capsys)
    assert code != 0 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_compress_target_tflite_measures_on_the_interpreter(tmp_path, tiny_weights, capsys):
    tiny = ["--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights)]
    out = tmp_path / "out"
    code, _, err = run_cli(
        "compress",
        *tiny,
        "--target",
        "tflite",
        "-r",
        "int8",
        "-r",
        "fp16",
        "--iterations",
        "20",
        "--out",
        str(out),
        capsys=capsys,
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    by = {c["name"]: c for c in res["candidates"]}
    assert set(by) == {"fp32", "int8", "fp16"}
    assert all(c["format"] == "tflite" and c["runtime"] == "litert" for c in by.values())
    assert (out / by["int8"]["artifact"]).suffix == ".tflite"
    assert by["int8"]["metrics"]["size_ratio_vs_fp32"] > 1.2 and by["int8"]["metrics"]["export_parity"]["passed"]
    assert np.isfinite(by["int8"]["metrics"]["latency_p50_ms"])
    code, _, err = run_cli("compress", *tiny, "--target", "coreml", "-r", "fp32", "--out", str(tmp_path / "c"), capsys=capsys)
    assert code != 0 and "target coreml: candidates cannot be measured on this machine" in one_line_error(err)


def test_unknown_export_option_in_a_recipe_is_refused():
    from keiryo.pipeline import load_recipe

    with pytest.raises(ConfigError, match="export options"):
        load_recipe({"name": "x", "target": "coreml", "export": {"precision": "int3"}})


@pytest.mark.slow
def test_optimize_target_tflite_searches_on_the_interpreter(tmp_path, tiny_weights, capsys):
    tiny = ["--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights)]
    out = tmp_path / "search"
    code, _, err = run_cli(
        "optimize", *tiny, "--target", "tflite", "--trials", "2", "--iterations", "20", "--out", str(out), capsys=capsys
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert all(c["format"] == "tflite" and c["runtime"] == "litert" for c in res["candidates"])
    steps = [s["type"] for c in res["candidates"] for s in c["recipe"]["steps"]]
    assert "tflite.int8" in steps and not any(s.startswith("quantize.int8") for s in steps)
    code, _, err = run_cli(
        "optimize", *tiny, "--target", "tflite", "--template", "ptq_fallback", "--out", str(tmp_path / "x"), capsys=capsys
    )
    assert code != 0 and "not available for target tflite" in one_line_error(err)
