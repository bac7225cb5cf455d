"""What is special about each torch-stage pass, on small real data (digits 8x8)."""

import pytest
import torch

from keiryo.errors import ConfigError, PassError
from keiryo.passes import PassContext, apply, get_pass
from keiryo.passes._state import state_of
from keiryo.tasks import get_task
from keiryo.train import evaluate_torch


def accuracy(handle, split):
    """Top-1 accuracy of the torch model on an in-memory split."""
    return evaluate_torch(handle, split, get_task("classification").bind(handle.output_names))["accuracy"]


def cfg(name, **params):
    return get_pass(name).config.parse(params)


def weights(h):
    return {n: p for n, p in h.module.named_parameters() if n.endswith("weight") and p.dim() > 1}


def test_unstructured_global_and_layerwise_reach_the_target_and_report_per_layer(tiny_trained, digits):
    for scope in ("layer", "global"):
        r = apply(
            tiny_trained, cfg("prune.unstructured", sparsity=0.6, scope=scope, finetune={"epochs": 0}), PassContext(data=digits)
        )
        assert r.info["sparsity"] == pytest.approx(0.6, abs=0.01)
        assert set(r.info["layer_sparsity"]) == {"features.0", "features.3", "head"}
        if scope == "layer":
            assert all(v == pytest.approx(0.6, abs=0.02) for v in r.info["layer_sparsity"].values())
        assert "no latency gain" in r.info["note"]
        # permanent: plain parameters, no torch.nn.utils.prune re-parametrisation left behind
        assert not any(n.endswith("_orig") for n, _ in r.model.module.named_parameters())


def test_gradual_pruning_with_finetuning_keeps_accuracy_better_than_oneshot(tiny_trained, digits):
    one = apply(tiny_trained, cfg("prune.unstructured", sparsity=0.7, finetune={"epochs": 0}), PassContext(data=digits))
    grad = apply(
        tiny_trained,
        cfg("prune.unstructured", sparsity=0.7, schedule="gradual", steps=3, finetune={"epochs": 3, "lr": 5e-3}),
        PassContext(data=digits),
    )
    assert [h["step"] for h in grad.info["history"]] == [1, 2, 3]
    assert accuracy(grad.model, digits.test) > accuracy(one.model, digits.test) + 0.1


def test_sparsity_outside_0_1_is_rejected():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="sparsity"):
            cfg("prune.unstructured", sparsity=bad)


def test_structured_pruning_removes_channels_rounds_and_reports(tiny_zoo_trained, digits):
    h = tiny_zoo_trained
    r = apply(h, cfg("prune.structured", ratio=0.5, round_to=8), PassContext(data=digits))
    assert r.model.macs() < 0.5 * h.macs() and r.model.num_params() < h.num_params()
    convs = [m for m in r.model.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert r.info["not_pruned"]["classifier.1"].startswith("output layer")
    assert r.info["channels"]  # which layers shrank, before -> after


def test_structured_taylor_needs_and_uses_gradients(tiny_zoo_trained, digits):
    r = apply(tiny_zoo_trained, cfg("prune.structured", ratio=0.3, importance="taylor"), PassContext(data=digits))
    assert r.model.macs() < tiny_zoo_trained.macs()
    with pytest.raises(PassError, match="needs data"):
        apply(tiny_zoo_trained, cfg("prune.structured", importance="taylor"), PassContext(data=None))


def test_structured_pruning_of_transformer_heads(digits):
    from keiryo.model import load_model

    h = load_model("zoo:transformer", digits, options={"dim": 32, "heads": 4, "layers": 1, "ffn": 64}, output_name="logits")
    r = apply(h, cfg("prune.structured", ratio=0.5, prune_heads=True, round_to=None), PassContext(data=digits))
    assert r.info["heads"] == {"attn0": 2}
    assert r.model.io == h.io and r.model(digits.test[:2].inputs).shape == (2, 10)


def test_clustering_keeps_weights_on_centroids_through_finetuning(tiny_trained, digits):
    r = apply(tiny_trained, cfg("cluster", clusters=8, finetune={"epochs": 2}), PassContext(data=digits))
    for n, p in weights(r.model).items():
        assert torch.unique(p).numel() <= 8, n
    pal = state_of(r.model)["palettes"]
    assert set(pal) == {"features.0.weight", "features.3.weight", "head.weight"}
    assert accuracy(r.model, digits.test) > 0.8
    with pytest.raises(ConfigError, match="clusters"):
        cfg("cluster", clusters=1)


def test_lowrank_replaces_layers_and_rejects_a_rank_that_does_not_reduce(tiny_trained, digits):
    r = apply(tiny_trained, cfg("factorize.lowrank", rank_ratio=0.25, finetune={"epochs": 0}), PassContext(data=digits))
    assert r.model.num_params() < tiny_trained.num_params()
    assert set(r.info["replaced"]) == {"features.0", "features.3"}
    with pytest.raises(PassError, match="rank 8 does not reduce features.0"):
        apply(tiny_trained, cfg("factorize.lowrank", rank=8, layers=["features.0"]), PassContext(data=digits))
    with pytest.raises(ConfigError, match="exactly one of"):
        cfg("factorize.lowrank", rank_ratio=None)


def test_distillation_checks_output_shapes_and_works_unlabeled(tiny_trained, digits):
    from keiryo.model import load_model

    other = load_model("keiryo.testing:tiny_cnn", digits, 5, output_name="logits")
    with pytest.raises(PassError, match=r"teacher outputs \[\(2, 10\)\] but the student outputs \[\(2, 5\)\]"):
        apply(other, cfg("distill"), PassContext(data=digits, teacher=tiny_trained))
    student = load_model("keiryo.testing:tiny_cnn", digits, options={"width": 4}, output_name="logits")
    r = apply(
        student, cfg("distill", unlabeled=True, train={"epochs": 8, "lr": 1e-2}), PassContext(data=digits, teacher=tiny_trained)
    )
    assert accuracy(r.model, digits.test) > 0.4  # chance is 0.1: it learnt from the teacher's outputs alone
    r = apply(student, cfg("distill", feature_weight=1.0, train={"epochs": 1}), PassContext(data=digits, teacher=tiny_trained))
    assert not hasattr(r.model.module, "_kd_bridge")


def test_slim_builds_a_narrower_lower_resolution_student(tiny_zoo_trained, digits):
    r = apply(
        tiny_zoo_trained,
        cfg("slim", width=0.5, resolution=0.5, distill={"train": {"epochs": 1}}),
        PassContext(data=digits, teacher=tiny_zoo_trained),
    )
    assert r.model.input_shape == tiny_zoo_trained.input_shape
    assert r.info["resolution"] == [1, 4, 4]
    assert r.model.macs() < tiny_zoo_trained.macs() / 2
    with pytest.raises(PassError, match="not a zoo model"):
        apply(_tiny_non_zoo(), cfg("slim"), PassContext(data=digits))


def _tiny_non_zoo():
    from keiryo.model import load_model

    return load_model("keiryo.testing:tiny_cnn", (1, 8, 8), 10)


def test_chain_keeps_earlier_compression(tiny_trained, digits, tmp_path):
    """prune -> cluster -> distill -> int8: zeros stay zero, values stay on centroids, and survive quantization."""
    import onnx
    from onnx import numpy_helper

    from keiryo.export import export
    from keiryo.passes.quantize_ort import Int8StaticConfig

    ctx = PassContext(data=digits, teacher=tiny_trained, workdir=tmp_path)
    h = apply(tiny_trained, cfg("prune.unstructured", sparsity=0.5, finetune={"epochs": 1}), ctx).model
    h = apply(h, cfg("cluster", clusters=8, finetune={"epochs": 1}), ctx).model
    h = apply(h, cfg("distill", train={"epochs": 2}), ctx).model
    for n, p in weights(h).items():
        assert float((p == 0).float().mean()) >= 0.5 - 1e-3, n
        assert torch.unique(p).numel() <= 8, n
    q = apply(export(h, "onnx", tmp_path / "c.onnx"), Int8StaticConfig(), ctx).model
    int8 = [numpy_helper.to_array(i) for i in onnx.load(str(q.path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    big = [w for w in int8 if w.ndim > 1]
    assert big and all((w == 0).mean() >= 0.5 - 1e-3 for w in big)  # symmetric int8: zero stays exactly zero


def test_lowrank_names_a_layer_it_cannot_handle(tiny_zoo_trained, digits):
    dw = next(
        n for n, m in tiny_zoo_trained.module.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    )
    with pytest.raises(PassError, match=f"{dw} is a grouped/depthwise conv"):
        apply(tiny_zoo_trained, cfg("factorize.lowrank", rank=1, layers=[dw]), PassContext(data=digits))


def test_training_passes_use_the_contexts_task_on_a_regression_model():
    """Fine-tuning and distillation train with the task in the context (here MSE on sensor windows, scored by MAE)."""
    from keiryo.data import load_data
    from keiryo.model import load_model
    from keiryo.train import TrainConfig, train

    data = load_data("sensors", samples=300, length=16)
    h = load_model("zoo:sensor", data, options={"width": 8, "blocks": 2}, output_name="prediction")
    task = get_task("regression").bind(h.output_names)
    train(h, data, task, TrainConfig(epochs=5, lr=1e-2), progress=False)
    ctx = PassContext(data=data, task=task, teacher=h)
    r = apply(h, cfg("prune.unstructured", sparsity=0.5, finetune={"epochs": 2}), ctx)
    assert r.info["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(float((p == 0).float().mean()) >= 0.5 - 1e-3 for p in weights(r.model).values())  # kept through fine-tuning
    d = apply(r.model, cfg("distill", train={"epochs": 2}), ctx)
    assert d.info["metric"] == "mae" and 0 < d.info["best_val"] < float("inf")
    s = apply(h, cfg("prune.structured", ratio=0.5), ctx)
    assert s.info["not_pruned"]["head"].startswith("output layer")  # the last Linear, though it has no class count
