"""Per-layer fallback and QAT on a case where post-training int8 really hurts (activation outliers)."""

import pytest

from keiryo.export import export
from keiryo.passes import PassContext, apply, get_pass
from keiryo.runtime import open_session
from keiryo.tasks import get_task
from keiryo.testing import top1_accuracy


@pytest.fixture(scope="module")
def outlier_mlp(digits):
    """An MLP on digits with two hidden channels made 500x larger (function unchanged)."""
    from keiryo.model import load_model
    from keiryo.testing import inject_activation_outliers
    from keiryo.train import TrainConfig, train

    h = load_model("zoo:mlp", digits, options={"hidden": [256, 128], "dropout": 0.0}, output_name="logits")
    train(h, digits, get_task("classification").bind(h.output_names), TrainConfig(epochs=20), progress=False)
    inject_activation_outliers(h.module.net[1], h.module.net[4], channels=2, factor=500.0)
    return h


def ort_accuracy(path, split):
    with open_session("onnxruntime", path) as s:
        return top1_accuracy(s, split)


def test_fallback_finds_the_sensitive_layers_and_meets_the_budget(outlier_mlp, digits, tmp_path):
    fp32 = export(outlier_mlp, "onnx", tmp_path / "fp32.onnx")
    ctx = PassContext(data=digits, workdir=tmp_path)
    ptq = apply(fp32, get_pass("quantize.int8_static").config(), ctx).model
    base = ort_accuracy(fp32.path, digits.test)
    assert base - ort_accuracy(ptq.path, digits.test) > 0.02  # PTQ really hurts here
    res = apply(fp32, get_pass("quantize.int8_fallback").config.parse({"max_accuracy_drop": 0.5}), ctx)
    info = res.info
    assert info["val_drop_all_int8_pt"] > 2.0
    assert info["budget_met"] and info["val_drop_pt"] <= 0.5
    assert 1 <= len(info["float_layers"]) < 3  # the last layer stays int8
    first = list(info["alone_int8"])[0]  # the most error per ms first
    assert first == info["float_layers"][0] and "float_cost_ms" in info["alone_int8"][first]
    assert base - ort_accuracy(res.model.path, digits.test) <= 0.015


def test_qat_recovers_at_least_half_of_the_ptq_loss(outlier_mlp, digits, tmp_path):
    ctx = PassContext(data=digits, workdir=tmp_path)
    fp32 = export(outlier_mlp, "onnx", tmp_path / "fp32.onnx")
    base = ort_accuracy(fp32.path, digits.test)
    ptq_loss = base - ort_accuracy(apply(fp32, get_pass("quantize.int8_static").config(), ctx).model.path, digits.test)
    q = apply(outlier_mlp, get_pass("quantize.qat").config.parse({"train": {"epochs": 10, "lr": 2e-3}}), ctx)
    assert set(q.info["activation_ranges"]) == {"net.1", "net.4", "net.7"}
    ctx.step_index = 7
    qat_int8 = apply(export(q.model, "onnx", tmp_path / "qat.onnx"), get_pass("quantize.int8_static").config(), ctx).model
    qat_loss = base - ort_accuracy(qat_int8.path, digits.test)
    assert qat_loss <= ptq_loss / 2, (ptq_loss, qat_loss)


def test_fallback_keeps_the_float_layers_that_gave_the_lowest_drop_not_the_last_ones(outlier_mlp, digits, tmp_path, monkeypatch):
    import keiryo.passes.quantize_fallback as fb

    real, excluded = fb.quantize_int8_static, []

    def recording(src, dst, x, cfg, **kw):
        excluded.append(len(kw.get("exclude") or []))
        real(src, dst, x, cfg, **kw)

    monkeypatch.setattr(fb, "quantize_int8_static", recording)
    task = get_task("classification").bind(outlier_mlp.output_names)
    drops = {0: 3.0, 1: 1.5, 2: 2.5, 3: 2.0}  # by float layers: a second float layer makes it worse
    task.drop = lambda baseline, candidate: drops.get(excluded[-1], 9.0)
    fp32 = export(outlier_mlp, "onnx", tmp_path / "fp32.onnx")
    opts = {"max_accuracy_drop": 1.0, "try_leading": False, "latency_aware": False}
    cfg = get_pass("quantize.int8_fallback").config.parse(opts)
    info = apply(fp32, cfg, PassContext(data=digits, workdir=tmp_path, task=task)).info
    assert [t["val_drop_pt"] for t in info["trail"]] == [3.0, 1.5, 2.5, 2.0]  # budget never met: all three tried
    assert len(info["float_layers"]) == 1 and info["val_drop_pt"] == 1.5 and not info["budget_met"]
    assert excluded[-1] == 1  # the file written is the one with that single float layer
