"""Training with a task: the result it reports, a custom loss, regression and token inputs; binding a task to outputs."""

import pytest
import torch

from keiryo.data import load_data
from keiryo.errors import ConfigError, DataError
from keiryo.model import TensorSpec, load_model
from keiryo.tasks import get_task, infer_task
from keiryo.train import TrainConfig, train


def test_bind_resolves_the_scored_output_by_name_or_index():
    assert get_task("classification", output="logits").bind(["embedding", "logits"]).index == 1
    assert get_task("classification", output=1).bind(["a", "b"]).index == 1
    assert get_task("classification").bind(["a", "b"]).index == 0
    with pytest.raises(ConfigError, match=r"output index 2 but the model has outputs \['a', 'b'\]"):
        get_task("classification", output=2).bind(["a", "b"])


def test_training_reports_the_tasks_metric_and_keeps_the_best_epoch(digits):
    h = load_model("zoo:mlp", digits, options={"hidden": [32]}, output_name="logits")
    task = get_task("classification").bind(h.output_names)
    res = train(h, digits, task, TrainConfig(epochs=4, lr=1e-2, patience=4), progress=False)
    assert res.metric == "accuracy" and res.device == "cpu" and 1 <= res.best_epoch <= res.epochs_run == 4
    assert res.best_val == max(e["val_accuracy"] for e in res.history)
    assert res.test_metrics["accuracy"] > 0.8 and res.test_metrics["samples"] == len(digits.test)
    # a custom loss receives every output, the targets and the named inputs
    seen = {}

    def loss(outs, y, x):
        seen.update(outputs=len(outs), inputs=sorted(x), targets=tuple(y.shape))
        return torch.nn.functional.cross_entropy(outs[0], y)

    train(h, digits, task, TrainConfig(epochs=1), loss_fn=loss, progress=False)
    assert seen["outputs"] == 1 and seen["inputs"] == ["image"] and len(seen["targets"]) == 1


def test_regression_on_sensor_windows_and_a_task_without_labels_cannot_train():
    data = load_data("sensors", samples=300, length=16)
    h = load_model("zoo:sensor", data, options={"width": 8, "blocks": 2}, output_name="prediction")
    assert h.head_width is None and h.io.outputs[0].shape == ["batch"]  # one value per sample
    task = get_task("regression").bind(h.output_names)
    task.check(h.io.outputs, data)
    before = train(h.clone(), data, task, TrainConfig(epochs=1, lr=1e-4), progress=False).test_metrics["mae"]
    res = train(h, data, task, TrainConfig(epochs=15, lr=1e-2), progress=False)
    assert res.metric == "mae" and res.test_metrics["mae"] < before
    with pytest.raises(ConfigError, match="task outputs has no labels to train on"):
        train(h, data, get_task("outputs"), TrainConfig(epochs=1), progress=False)


def test_sequence_classification_checks_and_trains_on_named_token_inputs():
    data = load_data("tokens", samples=200, seq=12, vocab=64)
    assert {t.name: t.dtype for t in data.inputs} == {"input_ids": "int64", "attention_mask": "int64"}
    h = load_model("zoo:text_encoder", data, options={"vocab": 64, "dim": 16, "heads": 2, "layers": 1}, output_name="logits")
    task = get_task(infer_task(data)).bind(h.output_names)
    task.check(h.io.outputs, data)
    res = train(h, data, task, TrainConfig(epochs=2), progress=False)
    assert res.metric == "accuracy" and 0 <= res.test_metrics["accuracy"] <= 1
    spec = [TensorSpec(name="logits", dtype="int64", shape=["batch", 2])]
    with pytest.raises(DataError, match="output 'logits' is int64; expected float logits"):
        task.check(spec, data)


def test_convolutions_train_channels_last_and_the_model_comes_back_contiguous():
    digits = load_data("digits", size=16, channels=3)  # one channel would be channels-last already (ambiguous strides)
    h = load_model("zoo:mobilenetv2", digits, options={"width": 0.25}, output_name="logits")
    seen = []
    first = next(m for m in h.module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    hook = first.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    task = get_task("classification").bind(h.output_names)
    res = train(h, digits, task, TrainConfig(epochs=1, batch_size=256), progress=False)
    hook.remove()
    assert res.epochs_run == 1
    steps = [cl for training, cl in seen if training]
    assert steps and all(steps)  # every training step fed the convolutions channels-last
    assert all(p.is_contiguous() for p in h.module.parameters())  # saved and exported as plain tensors
