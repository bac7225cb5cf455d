"""One test over the whole pass registry on the tiny model, plus ORT quantization specifics."""

import json

import onnx
import pytest

from keiryo.errors import PassError
from keiryo.export import Artifact, export
from keiryo.model import ModelHandle
from keiryo.passes import PassContext, all_passes, apply
from keiryo.passes.quantize_ort import Int8StaticConfig
from keiryo.runtime import open_session
from keiryo.runtime.coreml import CAN_PREDICT
from keiryo.tasks import get_task


def classification(handle):
    return get_task("classification").bind(handle.output_names)


@pytest.fixture(scope="module")
def fp32_artifact(tiny_trained, tmp_path_factory):
    return export(tiny_trained, "onnx", tmp_path_factory.mktemp("p") / "fp32.onnx")


@pytest.fixture(scope="module")
def fp32_by_format(tiny_trained, fp32_artifact, tmp_path_factory):
    """The tiny model's fp32 export in every format a format-level pass works on (built once)."""
    cache = {"onnx": fp32_artifact}

    def get(fmt):
        if fmt not in cache:
            suffix = {"tflite": ".tflite", "coreml": ".mlpackage"}[fmt]
            cache[fmt] = export(tiny_trained, fmt, tmp_path_factory.mktemp(fmt) / f"fp32{suffix}")
        return cache[fmt]

    return get


# cheap settings for the contract run; defaults are exercised by the config round-trip test.
# The tiny model's weights are small: Core ML passes must not skip them (weight_threshold 0),
# and its weights have no zeros, so coreml.sparse stores them sparsely from 0% on.
FAST = {"finetune": {"epochs": 1}, "train": {"epochs": 1}, "weight_threshold": 0, "min_sparsity": 0.0}


def _fast(spec):
    fields = spec.config.model_fields
    params = {k: v for k, v in FAST.items() if k in fields}
    if "distill" in fields:
        params["distill"] = {"train": {"epochs": 1}}
    return spec.config.parse(params)


@pytest.mark.parametrize("spec", all_passes(), ids=lambda s: s.name)
def test_every_pass_produces_a_valid_runnable_model(spec, fp32_by_format, tiny_zoo_trained, digits, tmp_path):
    ctx = PassContext(data=digits, workdir=tmp_path, teacher=tiny_zoo_trained, task=classification(tiny_zoo_trained))
    if spec.stage == "torch":
        before = tiny_zoo_trained.content_hash()
        res = apply(tiny_zoo_trained, _fast(spec), ctx)
        assert isinstance(res.model, ModelHandle)
        assert tiny_zoo_trained.content_hash() == before, "a pass must not modify its input model"
        art = export(res.model, "onnx", tmp_path / "out.onnx")  # the result still exports and runs
        assert res.model.io == tiny_zoo_trained.io  # same named inputs and outputs
        with open_session("onnxruntime", art.path) as s:
            assert s.input_names == ["image"] and s.run(digits.test[:4].numpy())[0].shape == (4, 10)
        json.dumps(res.info)  # info is plain data for results.json
        return
    src = fp32_by_format(spec.formats[0])
    res = apply(src, _fast(spec), ctx)
    assert isinstance(res.model, Artifact) and res.model.path.exists() and res.model.path != src.path
    assert res.model.format == src.format and "op_census" in res.info
    json.dumps(res.info)
    if src.format == "onnx":
        onnx.checker.check_model(onnx.load(str(res.model.path)))
    if src.format == "coreml" and not CAN_PREDICT:
        assert res.info["compressed_weight_ops"]  # validated structurally: the promised compression is there
        return
    with open_session(res.model.runtime, res.model.path) as s:
        out = s.run(digits.test[:16].numpy()["image"])[0]
    assert out.shape == (16, 10)


def test_int8_static_really_quantizes_with_each_calibration(fp32_artifact, digits, tmp_path):
    for method in ("minmax", "entropy", "percentile"):
        res = apply(fp32_artifact, Int8StaticConfig(calibration=method), PassContext(data=digits, workdir=tmp_path / method))
        census = res.info["op_census"]
        assert census.get("QuantizeLinear", 0) > 0 and census.get("DequantizeLinear", 0) > 0
        weights = [i for i in onnx.load(str(res.model.path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert len(weights) >= 3  # both convs and the linear layer carry int8 weights
        assert res.info["calib_samples"] == len(digits.calib)


def test_int8_static_exclude_nodes_keeps_them_float(fp32_artifact, digits, tmp_path):
    g = onnx.load(str(fp32_artifact.path)).graph
    conv = next(n.name for n in g.node if n.op_type == "Conv")
    res = apply(fp32_artifact, Int8StaticConfig(exclude_nodes=[conv]), PassContext(data=digits, workdir=tmp_path))
    assert res.info["excluded_nodes"] == [conv]


def test_format_pass_on_wrong_input_is_refused(tiny_trained, digits, tmp_path):
    with pytest.raises(PassError, match="works on an exported onnx file; export first"):
        apply(tiny_trained, Int8StaticConfig(), PassContext(data=digits, workdir=tmp_path))


def test_int8_static_feeds_every_named_input_in_uneven_batches(tmp_path):
    """A two-input text model; 50 calibration rows in batches of 16 (the histogram calibrators once crashed on these)."""
    from keiryo.data import DataSpec, load_data
    from keiryo.evaluate import predict
    from keiryo.model import load_model

    data = load_data(DataSpec(source="tokens", options={"samples": 200, "seq": 12, "vocab": 64}, calib_size=50))
    h = load_model("zoo:text_encoder", data, options={"vocab": 64, "dim": 16, "heads": 2, "layers": 1}, output_name="logits")
    art = export(h, "onnx", tmp_path / "text.onnx")
    assert art.input_names == ["input_ids", "attention_mask"]
    for method in ("minmax", "entropy", "percentile"):
        # entropy at its fewest bins: onnxruntime's threshold search takes ~1 s a tensor at the default 2048 (49 s here)
        cfg = Int8StaticConfig(calibration=method, entropy_bins=256)
        res = apply(art, cfg, PassContext(data=data, workdir=tmp_path / method))
        assert res.info["calib_samples"] == 50 and res.info["op_census"].get("QuantizeLinear", 0) > 0
        with open_session("onnxruntime", res.model.path) as s:
            assert s.input_names == ["input_ids", "attention_mask"]
            assert predict(s, data.test)[0].shape == (len(data.test), 2)
