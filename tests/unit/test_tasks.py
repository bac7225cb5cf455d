"""The task registry: metrics with 95% intervals, fidelity, drop semantics, losses, inference from the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keiryo.errors import ConfigError
from keiryo.tasks import Task, get_task, infer_task, task_names
from keiryo.tasks.base import proportion_ci


def test_every_builtin_task_is_registered_and_describes_itself():
    assert set(task_names()) >= {
        "classification",
        "multilabel",
        "regression",
        "embedding",
        "sequence-classification",
        "token-classification",
        "outputs",
    }
    for name in task_names():
        t = get_task(name)
        d = t.describe()
        assert d["name"] == name and d["primary"] and d["drop"]


def test_wilson_interval_is_sound_at_the_edges():
    p, (lo, hi) = proportion_ci(np.ones(50, bool))
    assert p == 1.0 and hi == 1.0 and 0.9 < lo < 0.95  # not the degenerate [1, 1] of the normal approximation
    p, (lo, hi) = proportion_ci(np.array([True] * 98 + [False] * 2))
    assert lo < 0.98 < hi and 0.05 < hi - lo < 0.07  # [0.930, 0.994]


def test_classification_metrics_fidelity_and_drop():
    t = get_task("classification").bind(["logits"])
    y = np.array([0, 1, 2, 3, 4, 5, 6, 0])
    ref = np.eye(7)[y]
    got = ref.copy()
    got[0] = np.eye(7)[1]  # one wrong
    m = t.metrics([got], y, [ref])
    assert m["accuracy"] == pytest.approx(7 / 8) and m["fidelity"] == pytest.approx(7 / 8) and m["samples"] == 8
    assert m["top5_accuracy"] == 1.0 and m["accuracy_ci95"][0] < 7 / 8 < m["accuracy_ci95"][1]
    base = t.metrics([ref], y, [ref])
    assert t.drop(base, m) == pytest.approx(12.5)


def test_regression_drop_is_the_relative_mae_increase_and_lower_is_better():
    t = get_task("regression")
    y = np.linspace(0, 1, 40).astype(np.float32)
    base = t.metrics([y + 0.1], y, [y + 0.1])
    worse = t.metrics([y + 0.11], y, [y + 0.1])
    assert base["mae"] == pytest.approx(0.1, abs=1e-6) and worse["mae"] == pytest.approx(0.11, abs=1e-6)
    assert t.drop(base, worse) == pytest.approx(10.0, rel=1e-3)
    assert not t.higher_is_better and t.selection_score(worse) < t.selection_score(base)
    assert base["fidelity"] == 1.0 and worse["fidelity"] < 1.0 and worse["max_abs_diff_vs_fp32"] == pytest.approx(0.01, abs=1e-6)
    loss = t.loss([torch.zeros(4, 1)], torch.ones(4))
    assert float(loss) == pytest.approx(1.0)


def test_embedding_cosine_and_recall_against_the_fp32_embeddings():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 16))
    t = get_task("embedding")
    same = t.metrics([ref], None, [ref])
    assert same["cosine"] == pytest.approx(1.0) and same["recall_at_1"] == 1.0
    noisy = t.metrics([ref + rng.normal(scale=0.5, size=ref.shape)], None, [ref])
    assert 0.8 < noisy["cosine"] < 1.0 and noisy["cosine_ci95"][0] < noisy["cosine"] < noisy["cosine_ci95"][1]
    shuffled = t.metrics([ref[::-1].copy()], None, [ref])
    assert shuffled["recall_at_1"] <= 1 / 15
    s = torch.randn(4, 8, requires_grad=True)
    assert float(t.distill_loss([s], [s.detach()], None, 0.5, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_outputs_task_needs_no_labels_and_scores_every_output():
    t = get_task("outputs")
    a, b = np.ones((5, 3)), np.arange(10.0).reshape(5, 2)
    m = t.metrics([a, b + 0.01], None, [a, b])
    assert len(m["per_output"]) == 2 and m["per_output"][0]["snr_db"] == float("inf")
    assert 30 < m["snr_db"] < 80 and m["max_abs_diff_vs_fp32"] == pytest.approx(0.01)


def test_multilabel_and_token_classification():
    ml = get_task("multilabel")
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    logits = np.where(y == 1, 3.0, -3.0)
    m = ml.metrics([logits], y, [logits])
    assert m["f1"] == 1.0 and m["map"] == 1.0 and m["fidelity"] == 1.0
    tok = get_task("token-classification")
    labels = np.array([[1, 2, -100], [0, -100, -100]])
    out = np.eye(3)[np.array([[1, 2, 0], [1, 0, 0]])]
    m = tok.metrics([out], labels, [out])
    assert m["tokens"] == 3 and m["token_accuracy"] == pytest.approx(2 / 3)
    loss = tok.loss([torch.zeros(2, 3, 3)], torch.as_tensor(labels))
    assert float(loss) == pytest.approx(np.log(3), rel=1e-4)  # the -100 tokens are ignored


class Huber(Task):
    primary = "huber"
    higher_is_better = False

    def metrics(self, outputs, targets, reference):
        d = np.abs(outputs[0] - targets)
        return {"huber": float(np.where(d < 1, 0.5 * d**2, d - 0.5).mean()), "fidelity": 1.0, "samples": len(d)}


def test_a_users_task_from_module_class_and_bad_references():
    t = get_task(f"{__name__}:Huber")
    assert t.metrics([np.zeros(3)], np.array([0.0, 2.0, 0.5]), [np.zeros(3)])["huber"] == pytest.approx((0 + 1.5 + 0.125) / 3)
    with pytest.raises(ConfigError, match="expected a subclass of keiryo.tasks.Task"):
        get_task(f"{__name__}:test_wilson_interval_is_sound_at_the_edges")
    with pytest.raises(ConfigError, match="unknown task 'clasification'"):
        get_task("clasification")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bogus'\]"):
        get_task("regression", bogus=1)
    with pytest.raises(ConfigError, match="output 'nope' not among the model's outputs"):
        get_task("classification", output="nope").bind(["logits"])


def test_infer_task_from_the_data(digits):
    assert infer_task(digits) == "classification"
    from keiryo.data import load_data

    assert infer_task(load_data("tokens", samples=30)) == "sequence-classification"
    assert infer_task(load_data("sensors", samples=30)) == "regression"
