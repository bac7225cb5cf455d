import pytest

from keiryo.budget import Constraint, check_constraints, parse_constraint, select_best
from keiryo.errors import ConfigError


def test_constraints_are_data_and_validated():
    c = Constraint(metric="latency_p95_ms", op="<=", bound=2.0)
    assert Constraint.from_json(c.to_json()) == c
    assert c.holds({"latency_p95_ms": 1.5}) and not c.holds({"latency_p95_ms": 2.5}) and not c.holds({})
    with pytest.raises(ConfigError, match="unknown metric 'speed'"):
        Constraint.parse({"metric": "speed", "op": "<=", "bound": 1})
    with pytest.raises(ConfigError, match="bound must be >= 0"):
        Constraint.parse({"metric": "accuracy_drop", "op": "<=", "bound": -1})
    # every registered task's metric and drop names are budgets too
    assert parse_constraint("mae_increase_pct<=5").metric == "mae_increase_pct"
    assert Constraint(metric="cosine", op=">=", bound=0.99).holds({"cosine": 0.995})
    assert parse_constraint(" latency_p95_ms <= 2.5 ") == Constraint(metric="latency_p95_ms", op="<=", bound=2.5)
    with pytest.raises(ConfigError, match="expected METRIC<=BOUND"):
        parse_constraint("latency_p95_ms == 2")


def test_select_best_is_fastest_meeting_the_budget():
    cands = [
        {"name": "a", "metrics": {"accuracy_drop": 0.1, "latency_p95_ms": 3.0, "size_bytes": 10}},
        {"name": "b", "metrics": {"accuracy_drop": 2.0, "latency_p95_ms": 1.0, "size_bytes": 5}},
        {"name": "c", "metrics": {"accuracy_drop": 0.5, "latency_p95_ms": 2.0, "size_bytes": 8}},
        {"name": "d", "status": "failed", "metrics": {"accuracy_drop": 0.0, "latency_p95_ms": 0.1, "size_bytes": 1}},
        {"name": "e", "status": "failed", "error": "PassError: boom", "failed_step": "quantize.int8_static"},  # no metrics
    ]
    budget = [Constraint(metric="accuracy_drop", op="<=", bound=1.0)]
    assert select_best(cands, budget) == "c"
    assert check_constraints(budget, cands[1]["metrics"]) == ["accuracy_drop <= 1"]
    assert select_best(cands, [Constraint(metric="accuracy_drop", op="<=", bound=0.0)]) is None
