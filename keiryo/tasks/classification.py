"""Classification: top-1 / top-5 on labels, top-1 agreement with the fp32 model, cross-entropy.

The class count comes from the model's output, not from the labels: the labels may cover
any subset of the classes (an ImageNet model evaluated on images of 39 classes).
``sequence-classification`` is the same task for text models fed token ids and masks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from keiryo.errors import DataError
from keiryo.tasks import register_task
from keiryo.tasks.base import Metrics, Task, proportion_ci, put


def integer_labels(y: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(y == np.round(y)):
            bad = int(np.argwhere(y != np.round(y)).reshape(-1)[0])
            raise DataError(
                f"{where}: targets are not class labels (sample {bad} has {float(y.reshape(-1)[bad])!r}); "
                "for numeric targets use --task regression"
            )
        return y.astype(np.int64)
    return y.astype(np.int64)


@register_task("classification")
class Classification(Task):
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "top5_accuracy", "fidelity")
    primary: ClassVar[str] = "accuracy"
    drop_name: ClassVar[str] = "accuracy_drop"
    default_output: ClassVar[str] = "logits"
    summary: ClassVar[str] = "top-1/top-5 accuracy on labels; top-1 agreement with fp32; cross-entropy"

    def __init__(self, output: int | str = 0, label_smoothing: float = 0.0, **options: Any):
        super().__init__(output, **options)
        self.label_smoothing = label_smoothing

    def _classes(self, outputs: Any) -> int:
        spec = outputs[self.output_index([o.name for o in outputs])]
        if len(spec.shape) != 2 or not isinstance(spec.shape[1], int):
            raise DataError(
                f"task {self.name}: output {spec.name!r} has shape {spec.shape}; expected (batch, classes) logits "
                "(for numeric outputs use --task regression, for embeddings --task embedding)"
            )
        if not spec.dtype.startswith("float"):
            raise DataError(f"task {self.name}: output {spec.name!r} is {spec.dtype}; expected float logits")
        return int(spec.shape[1])

    def check(self, outputs: Any, data: Any) -> None:
        super().check(outputs, data)
        classes = self._classes(outputs)
        if data.target.shape != ():
            raise DataError(
                f"task {self.name}: targets have shape {list(data.target.shape)} per sample; expected one class label "
                "(for several labels use --task multilabel, for numeric targets --task regression)"
            )
        for split_name in ("test", "calib"):
            y = getattr(data, split_name).targets
            labels = integer_labels(y.numpy(), f"{data.spec.source} [{split_name}]")
            bad = np.argwhere((labels < 0) | (labels >= classes)).reshape(-1)
            if bad.size:
                raise DataError(
                    f"{data.spec.source} [{split_name}]: label {int(labels[bad[0]])} (sample {int(bad[0])}) is outside "
                    f"the model's output range 0..{classes - 1}"
                )
        if data.target.label_count is not None and data.target.label_count > classes:  # all targets, when the source knows them
            raise DataError(
                f"{data.spec.source}: label {data.target.label_count - 1} is outside the model's output range 0..{classes - 1}"
            )

    def targets(self, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(y)
        return t.long() if not t.is_floating_point() else t.round().long()

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        i = self.index
        logits, ref = outputs[i], reference[i]
        pred = logits.argmax(1)
        out: Metrics = {"samples": int(len(pred))}
        if targets is not None:
            y = integer_labels(np.asarray(targets), "targets")
            put(out, "accuracy", proportion_ci(pred == y))
            if logits.shape[1] > 5:
                top5 = np.argpartition(-logits, 5, axis=1)[:, :5]
                put(out, "top5_accuracy", proportion_ci((top5 == y[:, None]).any(1)))
        put(out, "fidelity", proportion_ci(pred == ref.argmax(1)))
        return out

    def loss(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        i = self.index
        assert targets is not None
        return F.cross_entropy(outputs[i], targets, label_smoothing=self.label_smoothing)

    def sample_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor | None:
        assert targets is not None
        return F.cross_entropy(outputs[self.index], targets, label_smoothing=self.label_smoothing, reduction="none")

    def distill_loss(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        targets: torch.Tensor | None,
        alpha: float,
        temperature: float,
    ) -> torch.Tensor:
        """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)."""
        i = self.index
        s, t = student[i], teacher[i]
        soft = F.kl_div(
            F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), log_target=True, reduction="batchmean"
        )
        soft = soft * temperature * temperature
        if targets is None or alpha >= 1:
            return soft
        return alpha * soft + (1 - alpha) * self.loss(student, targets)


@register_task("sequence-classification")
class SequenceClassification(Classification):
    summary: ClassVar[str] = "classification of token sequences (token ids + attention mask in)"


@register_task("token-classification")
class TokenClassification(Classification):
    metric_names: ClassVar[tuple[str, ...]] = ("token_accuracy", "fidelity")
    """Per-token labels (batch, seq); label -100 (or any negative) marks tokens that are not scored."""

    primary: ClassVar[str] = "token_accuracy"
    drop_name: ClassVar[str] = "token_accuracy_drop"
    summary: ClassVar[str] = "per-token accuracy (labels < 0 ignored); per-token agreement with fp32"

    def _classes(self, outputs: Any) -> int:
        spec = outputs[self.output_index([o.name for o in outputs])]
        if len(spec.shape) != 3 or not isinstance(spec.shape[2], int):
            raise DataError(f"task {self.name}: output {spec.name!r} has shape {spec.shape}; expected (batch, seq, classes)")
        return int(spec.shape[2])

    def check(self, outputs: Any, data: Any) -> None:
        Task.check(self, outputs, data)
        classes = self._classes(outputs)
        if len(data.target.shape) != 1:
            raise DataError(f"task {self.name}: targets have shape {list(data.target.shape)} per sample; expected (seq,)")
        y = data.test.targets.numpy()
        bad = np.argwhere(y >= classes)
        if bad.size:
            raise DataError(
                f"{data.spec.source}: label {int(y[tuple(bad[0])])} is outside the model's output range 0..{classes - 1}"
            )

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        i = self.index
        pred, ref = outputs[i].argmax(-1), reference[i].argmax(-1)
        out: Metrics = {"samples": int(pred.shape[0])}
        if targets is not None:
            y = np.asarray(targets)
            keep = y >= 0
            out["tokens"] = int(keep.sum())
            put(out, "token_accuracy", proportion_ci((pred == y)[keep]))
            put(out, "fidelity", proportion_ci((pred == ref)[keep]))
        else:
            put(out, "fidelity", proportion_ci((pred == ref).reshape(-1)))
        return out

    def sample_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor | None:
        return None  # the loss is a mean over labelled tokens, not over samples

    def loss(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        i = self.index
        assert targets is not None
        logits = outputs[i]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp_min(-100), ignore_index=-100)
