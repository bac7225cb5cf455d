"""Regression: MAE, RMSE and R² on numeric targets; R² of the outputs against fp32 as fidelity; MSE loss."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from keiryo.errors import DataError
from keiryo.tasks import register_task
from keiryo.tasks.base import Metrics, Task, bootstrap_ci, mean_ci, put


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    ss_res = float(((pred - y) ** 2).sum())
    ss_tot = float(((y - y.mean(axis=0)) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else float("-inf")
    return 1 - ss_res / ss_tot


@register_task("regression")
class Regression(Task):
    metric_names: ClassVar[tuple[str, ...]] = ("mae", "rmse", "r2", "fidelity", "max_abs_diff_vs_fp32")
    primary: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False
    drop_name: ClassVar[str] = "mae_increase_pct"
    drop_unit: ClassVar[str] = "%"
    default_output: ClassVar[str] = "prediction"
    summary: ClassVar[str] = "MAE, RMSE, R² on numeric targets; R² against fp32 outputs; MSE loss"

    def check(self, outputs, data) -> None:  # type: ignore[no-untyped-def]
        super().check(outputs, data)
        spec = outputs[self.output_index([o.name for o in outputs])]
        per_sample = [d for d in spec.shape[1:]]
        want = list(data.target.shape)
        if not spec.dtype.startswith("float"):
            raise DataError(f"task regression: output {spec.name!r} is {spec.dtype}; expected float values")
        size = int(np.prod([d for d in per_sample if isinstance(d, int)] or [1]))
        if size != int(np.prod(want or [1])):
            raise DataError(
                f"task regression: output {spec.name!r} has {per_sample or '(scalar)'} values per sample but the targets have "
                f"{want or '(scalar)'}"
            )

    def targets(self, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y).float()

    @staticmethod
    def _flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], -1).astype(np.float64)

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        i = self.index
        pred, ref = self._flat(outputs[i]), self._flat(reference[i])
        out: Metrics = {"samples": int(len(pred))}
        if targets is not None:
            y = self._flat(np.asarray(targets))
            err = np.abs(pred - y).mean(axis=1)
            put(out, "mae", mean_ci(err))
            put(out, "rmse", bootstrap_ci(lambda ix: float(np.sqrt(((pred[ix] - y[ix]) ** 2).mean())), len(y)))
            put(out, "r2", bootstrap_ci(lambda ix: r2(pred[ix], y[ix]), len(y)))
        put(out, "fidelity", bootstrap_ci(lambda ix: r2(pred[ix], ref[ix]), len(ref)))
        out["max_abs_diff_vs_fp32"] = float(np.abs(pred - ref).max()) if len(ref) else 0.0
        return out

    def drop(self, baseline: Metrics, candidate: Metrics) -> float:
        b, c = baseline.get("mae"), candidate.get("mae")
        if b is None or c is None:
            return float("nan")
        return (c - b) / b * 100 if b > 0 else (0.0 if c == 0 else float("inf"))

    def loss(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        i = self.index
        assert targets is not None
        p = outputs[i]
        return F.mse_loss(p.reshape(p.shape[0], -1), targets.float().reshape(p.shape[0], -1))

    def sample_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor | None:
        assert targets is not None
        p = outputs[self.index]
        return F.mse_loss(p.reshape(p.shape[0], -1), targets.float().reshape(p.shape[0], -1), reduction="none").mean(1)
