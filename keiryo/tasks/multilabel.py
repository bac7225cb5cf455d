"""Multi-label classification: one logit per label, targets 0/1; micro F1 and mAP; BCE loss."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from keiryo.errors import DataError
from keiryo.tasks import register_task
from keiryo.tasks.base import Metrics, Task, bootstrap_ci, proportion_ci, put


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0


def _map(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    if not cols:
        return float("nan")
    return float(np.mean([average_precision_score(y[:, j], scores[:, j]) for j in cols]))


@register_task("multilabel")
class MultiLabel(Task):
    metric_names: ClassVar[tuple[str, ...]] = ("f1", "map", "fidelity")
    primary: ClassVar[str] = "f1"
    drop_name: ClassVar[str] = "f1_drop"
    default_output: ClassVar[str] = "logits"
    summary: ClassVar[str] = "micro F1 and mAP at threshold 0.5; per-label agreement with fp32; BCE"

    def __init__(self, output: int | str = 0, threshold: float = 0.5, **options: Any):
        super().__init__(output, **options)
        self.threshold = threshold

    def check(self, outputs: Any, data: Any) -> None:
        super().check(outputs, data)
        spec = outputs[self.output_index([o.name for o in outputs])]
        if len(spec.shape) != 2:
            raise DataError(f"task multilabel: output {spec.name!r} has shape {spec.shape}; expected (batch, labels)")
        if list(data.target.shape) != [spec.shape[1]]:
            raise DataError(
                f"task multilabel: targets have shape {list(data.target.shape)} per sample "
                f"but the model outputs {spec.shape[1]} labels"
            )
        y = data.test.targets.numpy()
        if not np.isin(y, (0, 1)).all():
            raise DataError(f"{data.spec.source}: multilabel targets must be 0 or 1")

    def targets(self, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y).float()

    def _pred(self, logits: np.ndarray) -> np.ndarray:
        return (1 / (1 + np.exp(-logits.astype(np.float64)))) >= self.threshold

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        i = self.index
        logits = outputs[i]
        pred, ref = self._pred(logits), self._pred(reference[i])
        out: Metrics = {"samples": int(len(pred))}
        if targets is not None:
            y = np.asarray(targets).astype(bool)
            put(out, "f1", bootstrap_ci(lambda ix: _f1(pred[ix], y[ix]), len(y)))
            put(out, "map", bootstrap_ci(lambda ix: _map(logits[ix], y[ix]), len(y), rounds=50))
        put(out, "fidelity", proportion_ci((pred == ref).reshape(-1)))
        return out

    def loss(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        i = self.index
        assert targets is not None
        return F.binary_cross_entropy_with_logits(outputs[i], targets.float())

    def sample_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor | None:
        assert targets is not None
        o = outputs[self.index]
        per = F.binary_cross_entropy_with_logits(o, targets.float(), reduction="none")
        return per.reshape(o.shape[0], -1).mean(1)

    def distill_loss(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        targets: torch.Tensor | None,
        alpha: float,
        temperature: float,
    ) -> torch.Tensor:
        i = self.index
        soft = F.binary_cross_entropy_with_logits(student[i] / temperature, torch.sigmoid(teacher[i] / temperature))
        if targets is None or alpha >= 1:
            return soft
        return alpha * soft + (1 - alpha) * self.loss(student, targets)
