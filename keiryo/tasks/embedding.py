"""Embeddings: no labels needed. Mean cosine to the fp32 embeddings, retrieval recall@k against them,
distillation by cosine + MSE on the embeddings."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from keiryo.errors import DataError
from keiryo.tasks import register_task
from keiryo.tasks.base import Metrics, Task, cosine_rows, mean_ci, proportion_ci, put


@register_task("embedding")
class Embedding(Task):
    metric_names: ClassVar[tuple[str, ...]] = ("cosine", "recall_at_1", "recall_at_5", "fidelity")
    primary: ClassVar[str] = "cosine"
    needs_targets: ClassVar[bool] = False
    drop_name: ClassVar[str] = "cosine_drop"
    default_output: ClassVar[str] = "embedding"
    summary: ClassVar[str] = "mean cosine to fp32 embeddings and recall@k against them; distill by cosine + MSE"

    def __init__(self, output: int | str = 0, k: int = 5, **options: Any):
        super().__init__(output, **options)
        self.k = k

    def check(self, outputs: Any, data: Any) -> None:
        spec = outputs[self.output_index([o.name for o in outputs])]
        if not spec.dtype.startswith("float"):
            raise DataError(f"task embedding: output {spec.name!r} is {spec.dtype}; expected float embeddings")

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        i = self.index
        got, ref = outputs[i].reshape(len(outputs[i]), -1), reference[i].reshape(len(reference[i]), -1)
        cos = cosine_rows(got, ref)
        out: Metrics = {"samples": int(len(cos))}
        put(out, "cosine", mean_ci(cos))
        # retrieval: does each candidate embedding find its own fp32 embedding among all of them?
        g = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
        r = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        sims = g @ r.T
        own = sims[np.arange(len(sims)), np.arange(len(sims))]
        rank = (sims > own[:, None]).sum(1)
        put(out, "recall_at_1", proportion_ci(rank < 1))
        put(out, f"recall_at_{self.k}", proportion_ci(rank < self.k))
        out["fidelity"], out["fidelity_ci95"] = out["cosine"], out["cosine_ci95"]
        return out

    def distill_loss(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        targets: torch.Tensor | None,
        alpha: float,
        temperature: float,
    ) -> torch.Tensor:
        i = self.index
        s, t = student[i].reshape(len(student[i]), -1).float(), teacher[i].reshape(len(teacher[i]), -1).float()
        return (1 - F.cosine_similarity(s, t, dim=1)).mean() + F.mse_loss(s, t)
