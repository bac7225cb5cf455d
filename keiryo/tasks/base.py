"""The :class:`Task` base class and the statistics tasks share (95% confidence intervals)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from keiryo.errors import ConfigError, DataError

Metrics = dict[str, Any]


def mean_ci(values: np.ndarray) -> tuple[float, list[float]]:
    """Mean and a normal-approximation 95% interval of per-sample values."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return m, [m, m]
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, [m - half, m + half]


def proportion_ci(hits: np.ndarray) -> tuple[float, list[float]]:
    """Share of True and its Wilson 95% interval (sound at 0% and 100%, unlike the normal one)."""
    n = int(np.asarray(hits).size)
    if n == 0:
        return float("nan"), [float("nan"), float("nan")]
    p = float(np.mean(hits))
    z = 1.96
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_ci(fn: Callable[[np.ndarray], float], n: int, rounds: int = 200, seed: int = 0) -> tuple[float, list[float]]:
    """``fn(all indices)`` and a percentile-bootstrap 95% interval over resampled indices."""
    value = float(fn(np.arange(n)))
    if n < 2:
        return value, [value, value]
    rng = np.random.default_rng(seed)
    stats = np.array([fn(rng.integers(0, n, size=n)) for _ in range(rounds)], dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return value, [value, value]
    return value, [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def put(out: Metrics, name: str, est: tuple[float, list[float]]) -> None:
    out[name] = est[0]
    out[f"{name}_ci95"] = est[1]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a2 * b2).sum(1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    both_zero = den == 0
    return np.where(both_zero, np.where(np.abs(a2 - b2).sum(1) == 0, 1.0, 0.0), num / np.where(both_zero, 1.0, den))


def snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    noise = float(np.sum((got.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


class Task:
    """What "good" means. Subclasses set the class attributes and override the methods they need.

    - ``metrics`` holds the task metric(s) (need labels) and fidelity to the fp32 reference;
      every metric that is an estimate carries ``NAME_ci95`` and the sample count ``samples``.
    - ``primary`` names the metric budgets and the search use; ``higher_is_better`` its direction.
    - ``drop_name`` / :meth:`drop`: how much worse a candidate is than the baseline, in the unit
      the budget ``--max-drop`` is given in.
    """

    name: ClassVar[str] = ""
    primary: ClassVar[str] = "fidelity"
    higher_is_better: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = True
    drop_name: ClassVar[str] = "fidelity_drop"
    drop_unit: ClassVar[str] = "pt"
    default_output: ClassVar[str] = "output"
    summary: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ("fidelity",)  # what a budget (--constraint) may name

    def __init__(self, output: int | str = 0, **options: Any):
        if options:
            raise ConfigError(f"task {self.name}: unknown option(s) {sorted(options)}")
        self.output = output
        self.index = output if isinstance(output, int) else 0
        self.ref: str = self.name  # how get_task built it (name or module:Class) and with which options,
        self.options: dict[str, Any] = {}  # so a worker on another node can build the same task

    def bind(self, output_names: Sequence[str]) -> Task:
        """Resolve which output the task scores (by name or index) against the model's outputs."""
        self.index = self.output_index(output_names)
        return self

    # -- description ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "drop": self.drop_name,
            "drop_unit": self.drop_unit,
            "output": self.output,
        }

    def output_index(self, names: Sequence[str]) -> int:
        if isinstance(self.output, int):
            if not 0 <= self.output < len(names):
                raise ConfigError(f"task {self.name}: output index {self.output} but the model has outputs {list(names)}")
            return self.output
        if self.output not in names:
            raise ConfigError(f"task {self.name}: output {self.output!r} not among the model's outputs {list(names)}")
        return list(names).index(self.output)

    # -- checks before any work ----------------------------------------------------------
    def check(self, outputs: Sequence[Any], data: Any) -> None:
        """Raise a DataError when the model's outputs (TensorSpecs) and the data's targets do not fit the task."""
        if self.needs_targets and (data is None or data.target is None):
            raise DataError(f"task {self.name} needs targets; the data has none (use --task outputs or embedding)")

    def targets(self, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Targets in the dtype the loss and metrics expect."""
        return torch.as_tensor(y)

    # -- measurement ---------------------------------------------------------------------
    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        raise NotImplementedError

    def drop(self, baseline: Metrics, candidate: Metrics) -> float:
        """How much worse ``candidate`` is (positive = worse), in ``drop_unit``."""
        b, c = baseline[self.primary], candidate[self.primary]
        if b is None or c is None:
            return float("nan")
        return (b - c) * 100 if self.higher_is_better else (c - b) * 100

    # -- training ------------------------------------------------------------------------
    def loss(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        raise ConfigError(
            f"task {self.name} has no supervised loss; train it by distillation from the original model (the distill step)"
        )

    def sample_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor | None:
        """Each sample's loss (shape ``[N]``, whose mean is :meth:`loss`), or None where the task has no such form
        (DP ghost clipping then takes it sample by sample through ``torch.func.vmap``, which is slower)."""
        return None

    def distill_loss(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        targets: torch.Tensor | None,
        alpha: float,
        temperature: float,
    ) -> torch.Tensor:
        """Default: MSE between every output of student and teacher (plus the task loss when it has one)."""
        soft = sum(torch.nn.functional.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True))
        if targets is None or alpha >= 1 or not self.needs_targets:
            return soft  # type: ignore[return-value]
        return alpha * soft + (1 - alpha) * self.loss(student, targets)

    def selection_score(self, metrics: Metrics) -> float:
        """Higher is better: what early stopping on the validation split maximizes."""
        v = metrics.get(self.primary)
        if v is None or not np.isfinite(v):
            return float("-inf")
        return float(v) if self.higher_is_better else -float(v)
