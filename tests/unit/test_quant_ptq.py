"""Better int8 PTQ: GPTQ rounding, bias correction, MSE clip-aware ranges, and the int8-auto ladder (tiny models)."""

import contextlib
import html

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import load_tensors_data
from torch import nn

from keiryo.errors import ConfigError, DataError
from keiryo.export import export
from keiryo.model import load_model
from keiryo.passes import PassContext, apply, get_pass
from keiryo.passes.quantize_ort import Int8StaticConfig, preprocess, quantize_int8_static
from keiryo.passes.quantize_ranges import clip_bounds, mse_range, mse_ranges
from keiryo.passes.quantize_rounding import MIN_ROUNDING_SAMPLES, round_weights
from keiryo.pipeline import load_recipe
from keiryo.runtime import open_session


class CancellingDepthwise(nn.Module):
    """Conv -> ReLU6 -> depthwise 3x3 whose large kernels nearly sum to zero (BN folding makes such kernels):
    rounding each weight to its nearest int8 level leaves a systematic output shift."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8 * 64, 10)
        with torch.no_grad():
            self.stem.bias.fill_(1.0)
            k = torch.randn(8, 1, 3, 3, generator=g) * 20
            self.dw.weight.copy_(k - k.mean((2, 3), keepdim=True) + 0.05)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.stem(image))
        return self.head(torch.flatten(self.dw(x), 1))


class ThreeConvs(nn.Module):
    """Conv -> ReLU6 three times, then a linear head: the middle convolution sits between two int8 ones."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            image = torch.nn.functional.relu6(c(image))
        return self.head(torch.flatten(image, 1))


@pytest.fixture(scope="module")
def cancelling(digits, tmp_path_factory):
    h = load_model(f"{__file__}:CancellingDepthwise", digits, output_name="logits")
    tmp = tmp_path_factory.mktemp("cancel")
    fp32 = export(h, "onnx", tmp / "fp32.onnx")
    return fp32, preprocess(fp32.path, tmp / "pre.onnx")


def outputs(path, split):
    from keiryo.evaluate import predict

    with open_session("onnxruntime", path) as s:
        return predict(s, split)[0]


def test_rounded_weights_lie_on_the_int8_grid_and_onnxruntime_keeps_them(cancelling, digits, tmp_path):
    _, pre = cancelling
    x = digits.calib.numpy()
    overrides, info = round_weights(pre, tmp_path / "r.onnx", x, rounding="gptq", bias_correction="weights", per_channel=True)
    assert info["layers"] == 3 and info["max_bias_shift"] > 0
    rounded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "r.onnx")).graph.initializer}
    for name, chans in overrides.items():
        scale = np.array([c["scale"] for c in chans], np.float32).reshape(-1, *[1] * (rounded[name].ndim - 1))
        levels = rounded[name] / scale
        assert np.allclose(levels, np.round(levels), atol=1e-3) and np.abs(levels).max() <= 127.001
    quantize_int8_static(pre, tmp_path / "q.onnx", x, Int8StaticConfig(rounding="gptq", bias_correction="weights"))
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:  # every int8 weight dequantizes to exactly the rounded weight
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"):
            name = n.input[0][: -len("_quantized")]
            if name in rounded:
                s = inits[n.input[1]].reshape(-1, *[1] * (rounded[name].ndim - 1))
                assert np.allclose(inits[n.input[0]] * s, rounded[name], rtol=1e-5, atol=1e-6)


def test_gptq_and_bias_correction_cut_the_int8_error_on_cancelling_kernels(cancelling, digits, tmp_path):
    fp32, pre = cancelling
    ref = outputs(fp32.path, digits.test)
    x = digits.calib.numpy()

    def error(path):  # (mean squared error, mean absolute per-logit shift) against the fp32 file
        d = outputs(path, digits.test) - ref
        return float(np.mean(d**2)), float(np.abs(d.mean(0)).mean())

    weights_only = {}  # the int8-grid weights in an fp32 graph: the weight error alone
    for tag, rounding, bc in (("nearest", "nearest", "off"), ("bias", "nearest", "weights"), ("gptq", "gptq", "off")):
        round_weights(pre, tmp_path / f"w-{tag}.onnx", x, rounding=rounding, bias_correction=bc, per_channel=True)
        weights_only[tag] = error(tmp_path / f"w-{tag}.onnx")
    assert weights_only["bias"][0] < 0.6 * weights_only["nearest"][0], weights_only
    assert weights_only["bias"][1] < 0.7 * weights_only["nearest"][1], weights_only
    assert weights_only["gptq"][0] < 0.6 * weights_only["nearest"][0], weights_only
    full = {}  # whole int8 files: bias correction on the int8 model's inputs also removes the activations' shift
    for tag, kw in (("nearest", {}), ("full", {"rounding": "gptq", "bias_correction": "full"})):
        quantize_int8_static(pre, tmp_path / f"{tag}.onnx", x, Int8StaticConfig(**kw))
        full[tag] = error(tmp_path / f"{tag}.onnx")
    assert full["full"][1] < 0.7 * full["nearest"][1], full


def test_a_layer_kept_float_runs_with_its_own_weights_not_the_rounded_ones(cancelling, digits, tmp_path):
    """The rounding pass rounds every layer once (cached for all fallback trials); a layer left float (exclude, or
    not in include) must get its fp32 weight and bias back, or it keeps the rounding error it was kept float for."""
    _, pre = cancelling
    x = digits.calib.numpy()
    fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(pre)).graph.initializer}
    graph = onnx.load(str(pre)).graph
    dw = next(n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    cfg = Int8StaticConfig(rounding="gptq", bias_correction="weights")
    cache = tmp_path / "calib.json"
    for tag, kw in (("all", {}), ("exclude", {"exclude": [dw.name]}), ("include", {"include": ["no-such-node"]})):
        quantize_int8_static(pre, tmp_path / f"{tag}.onnx", x, cfg, cache=cache, **kw)
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{tag}.onnx")).graph.initializer}
        w, b = dw.input[1], dw.input[2]
        if tag == "all":  # quantized: its float weight is gone, its bias corrected
            assert w not in inits and not np.allclose(inits[b], fp32[b])
        else:  # float: the very fp32 kernels and bias, though the cached rounded file has them on the int8 grid
            assert np.array_equal(inits[w], fp32[w]) and np.array_equal(inits[b], fp32[b])
    assert cache.with_suffix(".rounded.onnx").is_file()


def test_a_float_layer_between_int8_ones_stays_float_in_any_onnxruntime_session(digits, tmp_path):
    """onnxruntime's WeightBiasQuantization (basic level, on by default) quantizes per tensor the float weights of a
    Conv fed by a per-tensor DequantizeLinear and feeding a QuantizeLinear: the file must not let it."""
    import onnxruntime as ort

    h = load_model(f"{__file__}:ThreeConvs", digits, output_name="logits")
    pre = preprocess(export(h, "onnx", tmp_path / "fp32.onnx").path, tmp_path / "pre.onnx")
    graph = onnx.load(str(pre)).graph
    stem = [n for n in graph.node if n.op_type == "Conv"][1]  # DQ -> Conv -> Clip -> Q: the pattern it takes
    report = {}
    out = tmp_path / "q.onnx"
    quantize_int8_static(pre, out, digits.calib.numpy(), Int8StaticConfig(exclude_nodes=[stem.name]), report=report)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    conv = next(n for n in optimized.graph.node if n.name == stem.name)
    assert conv.input[1] == stem.input[1], "onnxruntime put a Q/DQ on the float layer's weights"
    assert not [n.name for n in optimized.graph.node if "_weight_q" in n.name]
    assert report["float_layers_pinned"] == [stem.name]


def test_learned_rounding_refuses_a_too_small_calibration_set(cancelling, digits, tmp_path):
    _, pre = cancelling
    few = {k: v[: MIN_ROUNDING_SAMPLES - 1] for k, v in digits.calib.numpy().items()}
    with pytest.raises(DataError, match=f"needs at least {MIN_ROUNDING_SAMPLES}"):
        quantize_int8_static(pre, tmp_path / "q.onnx", few, Int8StaticConfig(rounding="gptq"))


def test_mse_range_clips_rare_outliers_but_not_a_uniform_tensor():
    hist = np.zeros(2048, np.int64)
    hist[:200] = 10_000  # a dense bulk near zero
    hist[-1] = 1  # one far outlier
    lo, hi = mse_range(hist, 0.0, 100.0, 256, symmetric=False)
    assert lo == 0.0 and hi < 50
    lo, hi = mse_range(np.full(2048, 100), -1.0, 1.0, 256, symmetric=False)
    assert lo <= -0.95 and hi >= 0.95


def test_mse_ranges_stay_inside_relu6(cancelling, digits, tmp_path):
    _, pre = cancelling
    model = onnx.load(str(pre))
    bounds = clip_bounds(model)
    assert any(b == (0.0, 6.0) for b in bounds.values())
    x = digits.calib.numpy()

    class Reader:
        def __init__(self):
            self.it = iter([{k: v[i : i + 16] for k, v in x.items()} for i in range(0, len(x["image"]), 16)])

        def get_next(self):
            return next(self.it, None)

    data = load_tensors_data(mse_ranges(pre, Reader, None, False, tmp_path / "r.json", tmp_path))
    checked = [name for name in bounds if name in data]
    assert checked  # the ReLU6 output is one of the quantized tensors
    for name in checked:
        (lo, hi), (got_lo, got_hi) = bounds[name], data[name].range_value
        assert float(np.min(got_lo)) >= lo - 1e-6 and float(np.max(got_hi)) <= hi + 1e-6


def test_int8_auto_stops_at_the_first_rung_that_meets_the_budget(tiny_trained, digits, tmp_path):
    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse({"max_accuracy_drop": 50.0, "latency_iterations": 5})
    res = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path))
    info = res.info
    assert info["chosen"] == "ptq" and info["budget_met"] and len(info["ladder"]) == 1
    rung = info["ladder"][0]
    assert rung["status"] == "ok" and rung["size_bytes"] > 0 and rung["latency_p50_ms"] > 0


def test_int8_auto_climbs_from_gptq_to_refit_and_records_it(tiny_trained, digits, tmp_path):
    from keiryo.tasks import get_task, infer_task

    task = get_task(infer_task(digits))
    task.drop = lambda baseline, candidate: 1.0  # int8 loses nothing on this model: a budget no rung meets
    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse(
        {"max_accuracy_drop": 0.0, "rungs": ["gptq", "refit"], "latency_iterations": 5}
    )
    info = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path, task=task)).info
    assert [(r["rung"], r["status"]) for r in info["ladder"]] == [("gptq", "ok"), ("refit", "ok")], info["ladder"]
    refit = info["ladder"][1]
    assert refit["options"]["rounding"] == "refit" and refit["refit"]["seconds"] > 0
    trials = refit["float_when_free"]  # the leading layers were timed in float on onnxruntime, one by one
    assert trials and all(t["p50_ratio"] > 0 for t in trials if "p50_ratio" in t)
    assert refit["refit"]["layers"] + sum(t["float"] for t in trials) >= 3  # the float ones are not refitted
    # neither meets the budget and their drops are equal (0 paired error): the faster file is the one kept
    assert refit["vs_kept"] == {"rung": "gptq", "paired_error": 0.0}
    assert info["chosen"] == min(info["ladder"], key=lambda r: r["latency_p50_ms"])["rung"], info["ladder"]
    from keiryo.report.html import _ladders

    page = _ladders([{"name": "int8-auto", "steps": [{"type": "quantize.int8_auto", "info": info}]}])
    assert "gptq kept before it; paired sampling error &plusmn;0.0" in page  # the report shows the comparison


def test_the_paired_error_of_two_files_drops_is_their_sampling_error_on_the_validation_split(digits):
    from keiryo.passes.quantize_auto import paired_error, replaces
    from keiryo.tasks import get_task, infer_task

    task = get_task(infer_task(digits))
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(200, 10)).astype(np.float32)]
    y = ref[0].argmax(1)
    a = [ref[0].copy()]
    b = [ref[0].copy()]
    b[0][:16] = np.roll(b[0][:16], 1, axis=1)  # b disagrees with fp32 (and a) on about 16 of 200 samples
    k = int((b[0].argmax(1) != y).sum())
    err = paired_error(task, ref, y, a, b)
    # two classifiers that disagree on k of n samples: the difference of their accuracies varies by ~100 sqrt(k) / n
    assert 0.75 * 100 * k**0.5 / 200 < err < 1.25 * 100 * k**0.5 / 200, (err, k)
    assert paired_error(task, ref, y, a, [a[0].copy()]) == 0.0  # the same outputs: no error
    kept = {"val_drop": 5.5, "latency_p50_ms": 4.2}
    assert not replaces({"val_drop": 4.0, "latency_p50_ms": 7.8}, kept, err)  # within the error, slower: kept stays
    assert replaces({"val_drop": 4.0, "latency_p50_ms": 7.8}, kept, 1.0)  # lower by more than the error
    assert replaces({"val_drop": 6.0, "latency_p50_ms": 3.0}, kept, 1.0)  # within the error and faster
    assert not replaces({"val_drop": 7.0, "latency_p50_ms": 3.0}, kept, 1.0)  # worse by more than the error


def test_int8_auto_fallback_rung_reuses_the_gptq_rungs_rounding_and_scores_with_every_core(
    tiny_trained, digits, tmp_path, monkeypatch
):
    import keiryo.passes.quantize_fallback as fallback_mod
    import keiryo.passes.quantize_rounding as rounding_mod
    import keiryo.runtime as runtime_mod
    from keiryo.machine import usable_cores
    from keiryo.tasks import get_task, infer_task

    rounds, threads, trials = [], set(), []
    real_round, real_open, real_q = rounding_mod.round_weights, runtime_mod.open_session, fallback_mod.quantize_int8_static
    monkeypatch.setattr(fallback_mod, "quantize_int8_static", lambda *a, **k: trials.append(k) or real_q(*a, **k))
    monkeypatch.setattr(rounding_mod, "round_weights", lambda *a, **k: rounds.append(a[1]) or real_round(*a, **k))
    monkeypatch.setattr(runtime_mod, "open_session", lambda rt, src, th=1: threads.add(th) or real_open(rt, src, th))
    task = get_task(infer_task(digits))
    task.drop = lambda baseline, candidate: 1.0  # a budget no rung meets: the fallback scans every layer
    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse(
        {"max_accuracy_drop": 0.0, "rungs": ["gptq", "fallback"], "max_float_layers": 1, "latency_iterations": 5}
    )
    info = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path, task=task)).info
    assert [(r["rung"], r["status"]) for r in info["ladder"]] == [("gptq", "ok"), ("fallback", "ok")], info["ladder"]
    assert len(trials) > 2 * 3  # every layer's trials quantized (int8 alone, float alone) ...
    assert len(rounds) == 1, rounds  # ... on the weights the gptq rung rounded, not rounded again
    assert usable_cores() in threads  # fidelity scored on every core (the timings keep the run's one thread)


def test_int8_auto_records_a_crashing_rung_and_lists_the_closest_when_no_rung_meets(tiny_trained, digits, tmp_path, monkeypatch):
    import keiryo.passes.quantize_auto as auto

    real = auto.quantize_int8_static

    def fake(src, dst, x, cfg, **kw):
        if cfg.calibration == "mse":
            raise RuntimeError("calibrator exploded on tensor t")
        real(src, dst, x, cfg, **kw)
        m = onnx.load(str(dst))  # zeroed weights: a file that is int8 but useless, so no budget can be met
        for init in m.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8:
                init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
        onnx.save(m, str(dst))

    monkeypatch.setattr(auto, "quantize_int8_static", fake)
    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse(
        {"max_accuracy_drop": 0.0, "rungs": ["ptq", "mse"], "latency_iterations": 5}
    )
    info = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path)).info
    assert [r["status"] for r in info["ladder"]] == ["ok", "failed"]
    assert "calibrator exploded" in info["ladder"][1]["error"]
    assert not info["budget_met"] and info["closest"][0]["rung"] == "ptq" and "warning" in info
    from keiryo.report.html import _ladders

    page = _ladders([{"name": "int8-auto", "steps": [{"type": "quantize.int8_auto", "info": info}]}])
    assert "calibrator exploded" in page and "not met" in page and "<td>ptq</td>" in page
    assert f"<p>{html.escape(info['warning'])}</p>" in page and "kept ptq" in page  # why the kept rung was kept


def test_int8_auto_recipe_is_onnx_only():
    assert load_recipe("int8-auto").steps[0].type == "quantize.int8_auto"
    with pytest.raises(ConfigError, match="no tflite equivalent"):
        load_recipe("int8-auto", target="tflite")


def test_doctor_quant_ranks_every_layer_and_names_a_fix(digits):
    from keiryo.doctor import quant_sensitivity
    from keiryo.tasks import get_task

    h = load_model(f"{__file__}:CancellingDepthwise", digits, output_name="logits")
    rep = quant_sensitivity(h, digits, get_task("classification").bind(h.output_names))
    drops = list(rep["drop_one_layer_int8"].values())
    assert len(drops) == 3 and drops == sorted(drops, reverse=True)  # stem, depthwise, head; worst first
    assert rep["metric"] == "accuracy_drop" and rep["predicted_fix"]


def test_int8_static_quantizes_a_groupnorm_model_around_its_float_normalizations(digits, tmp_path):
    """The demo's MobileNetV2 family made ready for DP-SGD (GroupNorm where BatchNorm was, exported as
    InstanceNormalization between Reshapes): onnxruntime's quantizer fails on its graph ("Quantization parameter
    shared mode is not supported for weight yet"); keiryo keeps the InstanceNormalization nodes in float (onnxruntime
    has no int8 kernel for them) and quantizes the rest."""
    from keiryo.privacy.dp import make_dp_ready

    h = load_model("zoo:mobilenetv2", digits, options={"width": 0.25, "last_channel": 64}, output_name="logits")
    make_dp_ready(h)
    fp32 = export(h, "onnx", tmp_path / "fp32.onnx")
    pre = preprocess(fp32.path, tmp_path / "pre.onnx")
    quantize_int8_static(pre, tmp_path / "q.onnx", digits.calib.numpy(), Int8StaticConfig())
    q = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n for n in q.graph.node for o in n.output}
    norms = [n for n in q.graph.node if n.op_type == "InstanceNormalization"]
    inits = {i.name for i in q.graph.initializer}
    assert len(norms) == 52 and all(n.input[1] in inits and n.input[2] in inits for n in norms)  # float scale, bias
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert len(convs) == 52 and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in convs)  # int8 weights
    ref, got = outputs(fp32.path, digits.test), outputs(tmp_path / "q.onnx", digits.test)
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > 0.98, corr  # untrained: the logits are compared, not the classes


def test_float_outputs_keep_int8_layers_and_leave_the_logits_unrounded(cancelling, digits, tmp_path):
    fp32, pre = cancelling
    x = digits.calib.numpy()
    report: dict = {}
    quantize_int8_static(pre, tmp_path / "q.onnx", x, Int8StaticConfig(float_outputs=True), report=report)
    assert report["float_outputs"] == ["logits"]
    q = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n for n in q.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"  # no QuantizeLinear/DequantizeLinear after the last layer
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) >= 6  # the layers themselves stay int8
    # onnxruntime runs the last layer as one int8 QGemm with a float output (its bias is stored as int32), not
    # as a float Gemm on weights dequantized at every call
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops[-1] == "QGemm" and "Gemm" not in ops, ops
    quantize_int8_static(pre, tmp_path / "r.onnx", x, Int8StaticConfig())
    ref = outputs(fp32.path, digits.test)
    err = {p: np.abs(outputs(tmp_path / p, digits.test) - ref).mean() for p in ("q.onnx", "r.onnx")}
    assert err["q.onnx"] <= err["r.onnx"] * 1.05


def test_float_when_free_keeps_float_the_leading_layers_that_cost_no_time(cancelling, digits, tmp_path, monkeypatch):
    import keiryo.passes.quantize_fallback as fallback

    def float_layers(path):
        g = onnx.load(str(path)).graph
        producer = {o: n for n in g.node for o in n.output}
        return [n.name for n in g.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in producer]

    timed = []

    class Timed:  # the stem costs nothing in float, the depthwise conv 50%
        def __init__(self, path):
            self.cost, self.name = 1.0 + 0.5 * max(0, len(float_layers(path)) - 1), path.name

        def run(self, sample):
            timed.append(self.name)
            fake_clock[0] += self.cost

    fake_clock = [0.0]
    monkeypatch.setattr("keiryo.runtime.open_session", lambda kind, path, threads: contextlib.nullcontext(Timed(path)))
    monkeypatch.setattr(fallback, "clock", lambda: fake_clock[0])
    fp32, pre = cancelling
    stem, dw = fallback.quantizable_nodes(pre)[:2]  # 72 weights each, the head 5,120
    cfg = get_pass("quantize.int8_static").config.parse({"float_when_free": 3, "rounding": "gptq", "float_free_max_share": 0.5})
    res = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path))
    assert res.info["float_when_free"] == [
        {"node": stem, "weight_share": 0.013678, "p50_ratio": 1.0, "float": True},
        # over the 3% tolerance: it and the layers after stay int8
        {"node": dw, "weight_share": 0.027356, "p50_ratio": 1.5, "float": False},
    ]
    # 200 timed runs of each file per trial after 5 warm-ups, the two files in turns, which goes first alternating
    assert timed.count("free-int8.onnx") == 410 and len(timed) == 820
    assert timed[10:14] == ["free-int8.onnx", "free-trial.onnx", "free-trial.onnx", "free-int8.onnx"]
    assert float_layers(res.model.path) == [stem]  # the file itself: the stem float, the rest int8
    # at the default share (2% of the weights) the depthwise conv is not even timed
    cfg = get_pass("quantize.int8_static").config.parse({"float_when_free": 3, "rounding": "gptq"})
    res = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path / "default"))
    assert [t["float"] for t in res.info["float_when_free"]] == [True, False]
    assert "p50_ratio" not in res.info["float_when_free"][1]


def test_wide_activations_go_to_the_measured_worst_tensor(cancelling, digits, tmp_path):
    from keiryo.passes.quantize_precision import _ranges, activation_sensitivity

    fp32, pre = cancelling
    x = digits.calib.numpy()
    report: dict = {}
    cfg = Int8StaticConfig(wide_activations=1, float_outputs=True)
    quantize_int8_static(pre, tmp_path / "w.onnx", x, cfg, cache=tmp_path / "r.json", report=report)
    ranking = activation_sensitivity(pre, _ranges(tmp_path / "r.json"), x, signed=False)
    worst = [n for n, _ in ranking if n != "logits"][0]
    assert report["wide_activations"] == [worst]
    assert ranking == sorted(ranking, key=lambda r: -r[1]) and all(e >= 0 for _, e in ranking)
    q = onnx.load(str(tmp_path / "w.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    wide = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and inits[n.input[2]].dtype == np.uint16]
    assert wide, "the chosen tensor is quantized to 16 bits"
    quantize_int8_static(pre, tmp_path / "n.onnx", x, Int8StaticConfig(float_outputs=True))
    ref = outputs(fp32.path, digits.test)
    err = {p: np.abs(outputs(tmp_path / p, digits.test) - ref).mean() for p in ("w.onnx", "n.onnx")}
    assert err["w.onnx"] < err["n.onnx"]


class MixedRanges(nn.Module):
    """A conv whose channels have alike ranges, then a 1x1 conv with one channel 50x the others; a centred input
    (image - 0.5) and a ReLU output (one-sided) as activations."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.alike = nn.Conv2d(1, 8, 3, padding=1)
        self.skewed = nn.Conv2d(8, 8, 1)
        self.proj = nn.Parameter(torch.randn(8 * 64, 32, generator=g) * 0.05)  # a MatMul: not measured
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            self.alike.weight.copy_(torch.rand(8, 1, 3, 3, generator=g).sign() * 0.5)  # every channel's max is 0.5
            w = torch.randn(8, 8, 1, 1, generator=g) * 0.1
            w[0] *= 50
            self.skewed.weight.copy_(w)
            self.skewed.bias.zero_()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.alike(image - 0.5))
        return self.head(torch.flatten(torch.tanh(self.skewed(x)), 1) @ self.proj)


def test_measured_granularity_picks_per_tensor_or_per_channel_and_the_activation_symmetry_by_error(digits, tmp_path):
    h = load_model(f"{__file__}:MixedRanges", digits, output_name="logits")
    fp32 = export(h, "onnx", tmp_path / "fp32.onnx")
    pre = preprocess(fp32.path, tmp_path / "pre.onnx")
    x = digits.calib.numpy()
    report: dict = {}
    cfg = Int8StaticConfig(granularity="measured")
    quantize_int8_static(pre, tmp_path / "m.onnx", x, cfg, cache=tmp_path / "r.json", report=report)
    g = report["granularity"]
    model = onnx.load(str(pre))
    conv = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    alike, skewed = (next(n.input[1] for n in conv.values() if k in n.name + n.input[1]) for k in ("alike", "skewed"))
    assert g["weights"][alike]["per_channel"] is False  # alike channels: one scale costs nothing
    assert g["weights"][skewed]["per_channel"] is True  # one scale would starve seven channels
    e = g["weights"][skewed]
    assert e["error_per_tensor"] > 3 * e["error_per_channel"]
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    centred = next(n.output[0] for n in model.graph.node if n.op_type == "Sub")  # image - 0.5
    assert g["activations"][relu]["symmetric"] is False  # one-sided: the symmetric grid wastes half its levels
    assert g["activations"][centred]["symmetric"] is True
    assert g["weights_per_tensor"] >= 1 and g["weights_per_channel"] >= 1 and g["activations_symmetric"] >= 1
    # the file onnxruntime wrote follows the choices
    q = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    scale_of = {n.input[0].removesuffix("_quantized"): inits[n.input[1]] for n in dq.values() if n.input[1] in inits}
    assert scale_of[alike].size == 1 and scale_of[skewed].size == 8
    zp = {n.input[0]: int(inits[n.input[2]]) for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits}
    assert zp[centred] == 128 and zp[relu] == 0
    # and it costs no more output error than the habit (per-channel, asymmetric) beyond the tolerance's worth
    quantize_int8_static(pre, tmp_path / "f.onnx", x, Int8StaticConfig(), cache=tmp_path / "r.json")
    ref = outputs(fp32.path, digits.test)
    err = {p: np.abs(outputs(tmp_path / p, digits.test) - ref).mean() for p in ("m.onnx", "f.onnx")}
    assert err["m.onnx"] <= err["f.onnx"] * 1.25
    # the choices hold whatever per_channel says for the weights that are not measured
    quantize_int8_static(pre, tmp_path / "t.onnx", x, Int8StaticConfig(granularity="measured", per_channel=False))
    q = onnx.load(str(tmp_path / "t.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = {n.input[0]: inits[n.input[1]].size for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert [v for k, v in scales.items() if "alike" in k] == [1] and [v for k, v in scales.items() if "skewed" in k] == [8]
    assert [v for k, v in scales.items() if "proj" in k] == [1]  # per_channel=False holds for the MatMul
    # GPTQ rounds each weight on the grid chosen for it
    cfg = Int8StaticConfig(granularity="measured", rounding="gptq", bias_correction="weights")
    quantize_int8_static(pre, tmp_path / "g.onnx", x, cfg, cache=tmp_path / "g.json")
    q = onnx.load(str(tmp_path / "g.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = {n.input[0]: inits[n.input[1]].size for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert [v for k, v in scales.items() if "alike" in k] == [1] and [v for k, v in scales.items() if "skewed" in k] == [8]


def test_an_explicit_budget_turns_int8_into_int8_auto_at_that_budget():
    from keiryo.pipeline.recipe import with_budget

    auto, note = with_budget(load_recipe("int8"), 0.3)
    assert auto.name == "int8-auto" and auto.steps[0].params["max_accuracy_drop"] == 0.3 and "int8-auto" in note
    same, note = with_budget(load_recipe("int8-auto"), 0.2)  # a built-in int8-auto names no budget of its own
    assert same.steps[0].params["max_accuracy_drop"] == 0.2 and note
    own = load_recipe({"name": "mine", "steps": [{"type": "quantize.int8_auto", "params": {"max_accuracy_drop": 2.0}}]})
    assert with_budget(own, 0.2)[0].steps[0].params["max_accuracy_drop"] == 2.0  # the recipe's own budget wins
    tflite = load_recipe("int8", target="tflite")
    assert with_budget(tflite, 0.3) == (tflite, None)  # no int8-auto on LiteRT: int8 stays int8
    mse = load_recipe("int8-mse")
    assert with_budget(mse, 0.3) == (mse, None)


def test_compress_dry_run_shows_int8_escalating_only_with_an_explicit_budget():
    from typer.testing import CliRunner

    from keiryo.cli.main import app

    r = CliRunner().invoke(app, ["compress", "-m", "mobilenetv2", "-r", "int8", "-o", "x", "--max-drop", "0.3", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "quantize.int8_auto" in r.output and "max_accuracy_drop: 0.3" in r.output
    r = CliRunner().invoke(app, ["compress", "-m", "mobilenetv2", "-r", "int8", "-o", "x", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "quantize.int8_static" in r.output and "int8_auto" not in r.output


def _useless_ptq(monkeypatch):
    """PTQ rungs write int8 files with zeroed weights (no PTQ rung can meet any budget); the qat rung's own file,
    quantized from its fine-tuned export (``qat-pre.onnx``), is left as onnxruntime makes it."""
    import keiryo.passes.quantize_auto as auto

    real = auto.quantize_int8_static

    def fake(src, dst, x, cfg, **kw):
        real(src, dst, x, cfg, **kw)
        if "qat" in str(src):
            return
        m = onnx.load(str(dst))
        for init in m.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8:
                init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
        onnx.save(m, str(dst))

    monkeypatch.setattr(auto, "quantize_int8_static", fake)


def test_int8_auto_climbs_to_the_qat_rung_and_distils_without_labels(tiny_trained, digits, tmp_path, monkeypatch):
    import dataclasses

    from keiryo.data.splits import MemorySplit

    _useless_ptq(monkeypatch)
    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse(
        {"max_accuracy_drop": 0.0, "rungs": ["ptq", "qat"], "latency_iterations": 5, "qat": {"epochs": 2, "batch_size": 16}}
    )

    def ladder(data, where, cfg=cfg):
        where.mkdir()
        res = apply(fp32, cfg, PassContext(data=data, workdir=where, source=tiny_trained))
        return res.info, onnx.load(str(res.model.path))

    info, model = ladder(digits, tmp_path / "a")
    ptq, qat = info["ladder"]
    assert [r["rung"] for r in info["ladder"]] == ["ptq", "qat"] and qat["status"] == "ok", qat
    assert not ptq["budget_met"] and info["chosen"] == "qat" and qat["val_drop"] < ptq["val_drop"]
    assert qat["qat"]["steps"] == 2 * 4 and qat["qat"]["learned_ranges"] >= 3  # 64 samples, batches of 16
    assert qat["qat"]["loss_last"] < qat["qat"]["loss_first"] and qat["size_bytes"] > 0 and qat["seconds"] > 0
    assert qat["options"] == {"calibration": "mse", "float_outputs": True}
    # every label the rung could see replaced by garbage: the same training, the same int8 file
    rng = np.random.default_rng(1)

    def garbage(split):
        return MemorySplit(split.inputs, torch.from_numpy(rng.integers(0, 10, len(split))))

    noisy = dataclasses.replace(digits, train=garbage(digits.train.take()), calib=garbage(digits.calib))
    info2, model2 = ladder(noisy, tmp_path / "b", cfg.model_copy(update={"rungs": ["qat"]}))
    again = info2["ladder"][0]
    assert again["qat"] == {**qat["qat"], "train_seconds": again["qat"]["train_seconds"]}
    assert again["val_drop"] == qat["val_drop"]
    w1 = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w2 = {i.name: numpy_helper.to_array(i) for i in model2.graph.initializer}
    assert w1.keys() == w2.keys() and all(np.array_equal(w1[k], w2[k]) for k in w1)


def test_int8_auto_qat_rung_needs_the_source_model_and_enough_calibration_samples(tiny_trained, digits, tmp_path):
    import dataclasses

    from keiryo.passes.qat import MIN_DISTILL_SAMPLES

    fp32 = export(tiny_trained, "onnx", tmp_path / "fp32.onnx")
    cfg = get_pass("quantize.int8_auto").config.parse({"max_accuracy_drop": 0.0, "rungs": ["qat"], "latency_iterations": 5})
    few = dataclasses.replace(digits, calib=digits.calib[: MIN_DISTILL_SAMPLES - 1])
    with pytest.raises(DataError) as e:
        apply(fp32, cfg, PassContext(data=few, workdir=tmp_path, source=tiny_trained))
    msg = str(e.value)
    assert f"needs at least {MIN_DISTILL_SAMPLES} calibration samples, got {MIN_DISTILL_SAMPLES - 1}" in msg
    assert "\n" not in msg
    from keiryo.errors import PassError

    with pytest.raises(PassError, match="needs the torch model this file was exported from"):  # no ctx.source
        apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path))


class FaintCopies(nn.Module):
    """A stem whose channels 4-7 are channels 0-3 times 0.01, and a 1x1 conv that reads only the faint copies (x100):
    on a per-tensor int8 grid the faint channels round to a level or two, so the feature is lost where the layer
    reads it and kept, 100 times larger, in the channels it ignores."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 * 64, 10)
        with torch.no_grad():
            w, b = torch.randn(4, 1, 3, 3, generator=g), torch.rand(4, generator=g)
            self.stem.weight.copy_(torch.cat([w, 0.01 * w]))
            self.stem.bias.copy_(torch.cat([b, 0.01 * b]))
            self.mix.weight.zero_()
            self.mix.weight[:, 4:] = 100 * torch.randn(8, 4, 1, 1, generator=g) / 2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.relu(self.mix(torch.relu(self.stem(image)))), 1))


def test_refit_solves_each_layer_for_its_int8_input_and_beats_gptq_with_bias_correction(digits, tmp_path):
    h = load_model(f"{__file__}:FaintCopies", digits, output_name="logits")
    fp32 = export(h, "onnx", tmp_path / "fp32.onnx")
    pre = preprocess(fp32.path, tmp_path / "pre.onnx")
    ref = outputs(fp32.path, digits.test)
    x = digits.calib.numpy()
    errors, reports = {}, {}
    for rounding in ("gptq", "refit"):
        reports[rounding] = {}
        cfg = Int8StaticConfig(rounding=rounding, bias_correction="full")
        quantize_int8_static(pre, tmp_path / f"{rounding}.onnx", x, cfg, report=reports[rounding])
        errors[rounding] = float(np.mean((outputs(tmp_path / f"{rounding}.onnx", digits.test) - ref) ** 2) / np.mean(ref**2))
    refit = reports["refit"]["refit"]
    assert refit["layers"] == 3 and refit["chunk"] == 2, refit  # stem, mix, head: two at a time (the default)
    # layer by layer (median of the three), on the inputs the int8 model gives them: the refitted int8 layers
    # come far closer to the fp32 layers' outputs than the fp32 weights themselves do (the mix layer now reads the
    # loud copies); the whole model's error falls by about half
    assert refit["output_error_refitted"] < 0.3 * refit["output_error_fp32_weights"], refit
    assert errors["refit"] < 0.6 * errors["gptq"], errors
    # the weights it wrote are on the int8 grid onnxruntime uses: the file is a plain QDQ int8 model
    census = [n.op_type for n in onnx.load(str(tmp_path / "refit.onnx")).graph.node]
    assert census.count("DequantizeLinear") >= 6 and "Conv" in census


def test_refit_solves_every_bias_so_the_full_bias_correction_is_not_run_before_it(digits, tmp_path, monkeypatch):
    import keiryo.passes.quantize_rounding as rounding_mod

    h = load_model(f"{__file__}:FaintCopies", digits, output_name="logits")
    pre = preprocess(export(h, "onnx", tmp_path / "fp32.onnx").path, tmp_path / "pre.onnx")
    x = digits.calib.numpy()
    quantize_int8_static(pre, tmp_path / "weights.onnx", x, Int8StaticConfig(rounding="refit", bias_correction="weights"))

    def no_second_pass(*a, **k):
        raise AssertionError("bias correction on int8 inputs ran before a refit")

    monkeypatch.setattr(rounding_mod, "correct_biases_on_int8_inputs", no_second_pass)
    quantize_int8_static(pre, tmp_path / "full.onnx", x, Int8StaticConfig(rounding="refit", bias_correction="full"))
    # the refit overwrites each int8 layer's weights and bias: the file is the same whatever correction came first
    a, b = (onnx.load(str(tmp_path / f"{k}.onnx")).graph.initializer for k in ("weights", "full"))
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in a} == {i.name: numpy_helper.to_array(i).tobytes() for i in b}


def test_the_refit_moments_are_the_float64_products_of_the_augmented_columns():
    import torch

    from keiryo.passes.quantize_refit import gram

    rng = torch.Generator().manual_seed(0)
    # columns as the im2col gather leaves them (channels innermost), values far from zero: C - Hq, which the solve
    # reads, is a small difference of two such sums, so float32 products would not do
    a = (3 + torch.randn(300, 6, 9, generator=rng)).permute(1, 2, 0)
    b = a + 1e-3 * torch.randn(300, 6, 9, generator=rng).permute(1, 2, 0)
    aug = lambda c: torch.cat([c, torch.ones_like(c[:, :1])], 1).double()  # noqa: E731
    for x, y in ((a, b), (b, b)):
        want = aug(x) @ aug(y).transpose(1, 2)
        torch.testing.assert_close(gram(x, y), want, rtol=1e-12, atol=1e-9)


def test_the_full_bias_correction_leaves_the_cached_rounded_weights_as_rounded(cancelling, digits, tmp_path):
    x = digits.calib.numpy()
    weights, full = tmp_path / "weights.json", tmp_path / "full.json"
    quantize_int8_static(
        cancelling[1], tmp_path / "w.onnx", x, Int8StaticConfig(rounding="gptq", bias_correction="weights"), cache=weights
    )
    quantize_int8_static(
        cancelling[1], tmp_path / "f.onnx", x, Int8StaticConfig(rounding="gptq", bias_correction="full"), cache=full
    )
    # the next quantization with the same cache (another rung, other float layers) reads the rounding alone,
    # not biases corrected for the int8 inputs of the one before
    kept = [
        {i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(str(c.with_suffix(".rounded.onnx"))).graph.initializer}
        for c in (weights, full)
    ]
    assert kept[0] == kept[1]
    a, b = (onnx.load(str(tmp_path / f"{k}.onnx")).graph.initializer for k in "wf")  # the corrected file differs
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in a} != {i.name: numpy_helper.to_array(i).tobytes() for i in b}


def test_a_tensor_session_runs_only_the_nodes_the_fetched_tensors_need(cancelling, digits):
    from keiryo.passes.quantize_ranges import prune, tensor_session

    full = onnx.load(str(cancelling[1]))
    first = next(n for n in full.graph.node if n.op_type == "Conv")
    graph = onnx.load(str(cancelling[1])).graph
    prune(graph, [first.output[0]])
    assert [n.name for n in graph.node] == [first.name]  # the stem alone: nothing after it runs
    assert {i.name for i in graph.initializer} == set(first.input[1:])
    feed = {full.graph.input[0].name: digits.calib.numpy()["image"][:4]}
    late = next(n for n in reversed(full.graph.node) if n.op_type == "Conv").output[0]
    cut = tensor_session(onnx.load(str(cancelling[1])), [first.output[0], late]).run(None, feed)
    ref = onnx.load(str(cancelling[1]))  # the values are those of the whole graph's session
    ref.graph.output.extend(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None) for k in (first.output[0], late))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expect = ort.InferenceSession(ref.SerializeToString(), so).run([first.output[0], late], feed)
    for got, want in zip(cut, expect, strict=True):  # optimized (fused kernels): equal to float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_the_hessians_granularity_measured_are_reused_by_the_rounding_not_collected_twice(
    cancelling, digits, tmp_path, monkeypatch
):
    import keiryo.passes.quantize_ranges as ranges_mod
    from keiryo.passes.quantize_granularity import weight_granularity

    runs = []
    real = ranges_mod.tensor_session
    monkeypatch.setattr(ranges_mod, "tensor_session", lambda m, names: runs.append(len(names)) or real(m, names))
    x = {k: v[:64] for k, v in digits.calib.numpy().items()}
    pre = cancelling[1]
    weight_granularity(pre, x, 0.05)
    round_weights(pre, tmp_path / "a.onnx", x, rounding="gptq", bias_correction="weights", per_channel=True)
    assert len(runs) == 1  # one pass over the calibration set for both
    round_weights(pre, tmp_path / "b.onnx", x, rounding="gptq", bias_correction="weights", per_channel=True)
    assert len(runs) == 2  # taken once: a third use collects again
    other = {k: v[::-1].copy() for k, v in x.items()}  # other samples: collected, never a stale statistic
    weight_granularity(pre, other, 0.05)
    round_weights(pre, tmp_path / "c.onnx", x, rounding="gptq", bias_correction="weights", per_channel=True)
    assert len(runs) == 4
    a, b = (onnx.load(str(tmp_path / f"{k}.onnx")).graph.initializer for k in "ab")
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in a} == {i.name: numpy_helper.to_array(i).tobytes() for i in b}
