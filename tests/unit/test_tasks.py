"""Tasks: the registry, inference from the data, metrics with intervals, drops, and training with a task's loss."""

import numpy as np
import pytest
import torch

from keiryo.data import load_data
from keiryo.errors import ConfigError, DataError
from keiryo.model import TensorSpec, load_model
from keiryo.tasks import get_task, infer_task, task_names
from keiryo.tasks.base import proportion_ci
from keiryo.train import TrainConfig, train


def test_registry_names_options_and_errors():
    assert {"classification", "regression", "multilabel", "embedding", "outputs", "sequence-classification"} <= set(task_names())
    t = get_task("classification", label_smoothing=0.1)
    assert t.name == "classification" and t.primary == "accuracy" and t.drop_name == "accuracy_drop"
    assert t.ref == "classification" and t.options == {"label_smoothing": 0.1}
    assert get_task(t) is t
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ConfigError, match=r"task classification: unknown option\(s\) \['colour'\]"):
        get_task("classification", colour=1)
    with pytest.raises(ConfigError, match="expected a subclass of keiryo.tasks.Task"):
        get_task("keiryo.testing:tiny_cnn")


def test_bind_resolves_the_scored_output_by_name_or_index():
    assert get_task("classification", output="logits").bind(["embedding", "logits"]).index == 1
    assert get_task("classification", output=1).bind(["a", "b"]).index == 1
    with pytest.raises(ConfigError, match=r"output 'logits' not among the model's outputs \['output'\]"):
        get_task("classification", output="logits").bind(["output"])
    with pytest.raises(ConfigError, match=r"output index 2 but the model has outputs \['a', 'b'\]"):
        get_task("classification", output=2).bind(["a", "b"])


def test_infer_task_from_the_data(digits):
    assert infer_task(digits) == "classification"
    assert infer_task(load_data("sensors", samples=30)) == "regression"
    assert infer_task(load_data("tokens", samples=30)) == "sequence-classification"
    assert infer_task(load_data("keiryo.testing:blob_datasets")) == "classification"


def test_classification_metrics_count_accuracy_fidelity_and_wilson_intervals():
    task = get_task("classification").bind(["logits"])
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]], np.float32)
    y = np.array([0, 1, 1, 0])
    ref = logits.copy()
    ref[3] = [0.0, 3.0, 0.0]  # the reference disagrees on the last sample
    m = task.metrics([logits], y, [ref])
    assert m["samples"] == 4 and m["accuracy"] == 0.75 and m["fidelity"] == 0.75
    lo, hi = m["accuracy_ci95"]
    assert 0 < lo < 0.75 < hi < 1
    assert "top5_accuracy" not in m  # three classes: top-5 says nothing
    # no labels: fidelity only
    assert set(task.metrics([logits], None, [logits])) == {"samples", "fidelity", "fidelity_ci95"}
    # Wilson interval at 100% stays inside [0, 1] and is not degenerate
    p, (lo, hi) = proportion_ci(np.ones(20, bool))
    assert p == 1.0 and hi == 1.0 and 0.8 < lo < 1.0
    # drop in accuracy points: 0.9 -> 0.85 is 5 points
    assert task.drop({"accuracy": 0.9}, {"accuracy": 0.85}) == pytest.approx(5.0)
    with pytest.raises(DataError, match=r"targets are not class labels \(sample 1 has 0\.5\)"):
        task.metrics([logits[:2]], np.array([1.0, 0.5]), [logits[:2]])


def test_regression_metrics_and_drop_in_percent():
    task = get_task("regression").bind(["prediction"])
    y = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    pred = y + np.array([0.5, -0.5, 0.5, -0.5], np.float32)
    m = task.metrics([pred], y, [y])
    assert m["mae"] == pytest.approx(0.5) and m["rmse"] == pytest.approx(0.5) and m["r2"] == pytest.approx(1 - 1.0 / 5.0)
    assert m["max_abs_diff_vs_fp32"] == pytest.approx(0.5)
    assert not task.higher_is_better and task.drop({"mae": 0.5}, {"mae": 0.6}) == pytest.approx(20.0)
    assert task.selection_score({"mae": 0.5}) > task.selection_score({"mae": 0.6})  # lower MAE is the better epoch


def test_outputs_task_scores_the_worst_output_without_labels():
    task = get_task("outputs")
    a = np.random.default_rng(0).normal(size=(8, 4))
    m = task.metrics([a, a], None, [a, -a])
    assert m["cosine"] == pytest.approx(-1.0) and m["fidelity"] == m["cosine"]
    assert [p["cosine"] for p in m["per_output"]] == pytest.approx([1.0, -1.0])
    assert m["per_output"][0]["snr_db"] == float("inf")


def test_training_reports_the_tasks_metric_and_keeps_the_best_epoch(digits):
    h = load_model("zoo:mlp", digits, options={"hidden": [32]}, output_name="logits")
    task = get_task("classification").bind(h.output_names)
    res = train(h, digits, task, TrainConfig(epochs=4, lr=1e-2, patience=4), progress=False)
    assert res.metric == "accuracy" and res.device == "cpu" and 1 <= res.best_epoch <= res.epochs_run == 4
    assert res.best_val == res.best_val_accuracy == max(e["val_accuracy"] for e in res.history)
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
