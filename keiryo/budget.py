"""A budget is a list of constraints: ``Constraint(metric="latency_p95_ms", op="<=", bound=2.0)``."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import field_validator

from keiryo.config import KeiryoConfig

# Metrics a constraint may name, with the direction that is better.
METRICS: dict[str, Literal["min", "max"]] = {
    "accuracy": "max",
    "accuracy_drop": "min",
    "fidelity": "max",
    "latency_p50_ms": "min",
    "latency_p95_ms": "min",
    "latency_p99_ms": "min",
    "size_bytes": "min",
    "size_mb": "min",
    "size_gzip_bytes": "min",
    "params": "min",
    "macs": "min",
    "peak_rss_mb": "min",
    "throughput_per_s": "max",
}


def known_metrics() -> set[str]:
    """The measurement's metrics and every registered task's metric and drop names."""
    from keiryo.tasks import TASKS, task_names

    names = set(METRICS)
    for t in task_names():
        cls = TASKS.get(t)
        names |= {*cls.metric_names, cls.primary, cls.drop_name}
    return names


_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


class Constraint(KeiryoConfig):
    metric: str
    op: Literal["<=", "<", ">=", ">"]
    bound: float

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        known = known_metrics()
        if v not in known:
            raise ValueError(f"unknown metric {v!r}; expected one of {', '.join(sorted(known))}")
        return v

    @field_validator("bound")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"bound must be >= 0, got {v}")
        return v

    def holds(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        return value is not None and bool(_OPS[self.op](value, self.bound))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def parse_constraint(text: str) -> Constraint:
    """'latency_p95_ms<=2.5' -> Constraint."""
    import re

    from keiryo.errors import ConfigError

    m = re.fullmatch(r"\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(f"constraint {text!r}: expected METRIC<=BOUND (or <, >=, >), e.g. latency_p95_ms<=2")
    return Constraint.parse({"metric": m.group(1), "op": m.group(2), "bound": float(m.group(3))}, where=f"constraint {text!r}")


def violation(c: Constraint, metrics: dict[str, Any]) -> float:
    """How far ``metrics`` is from meeting ``c`` (<= 0: met), relative to the bound; missing metric: 1."""
    value = metrics.get(c.metric)
    if value is None:
        return 1.0
    scale = max(abs(c.bound), 1e-9)
    return float((value - c.bound) / scale if c.op in ("<=", "<") else (c.bound - value) / scale)


def check_constraints(constraints: Sequence[Constraint], metrics: dict[str, Any]) -> list[str]:
    """The constraints that ``metrics`` violate, as text (empty: all met)."""
    return [str(c) for c in constraints if not c.holds(metrics)]


def select_best(candidates: Sequence[dict[str, Any]], constraints: Sequence[Constraint]) -> str | None:
    """Name of the fastest (p95, then size) candidate that meets every constraint."""
    ok = [c for c in candidates if c.get("status", "ok") == "ok" and not check_constraints(constraints, c["metrics"])]
    if not ok:
        return None
    ok.sort(key=lambda c: (c["metrics"]["latency_p95_ms"], c["metrics"]["size_bytes"]))
    return str(ok[0]["name"])
