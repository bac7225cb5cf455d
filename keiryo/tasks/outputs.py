"""``outputs``: any model, no labels. Fidelity only, per output: cosine, max abs diff, SNR in dB."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from keiryo.tasks import register_task
from keiryo.tasks.base import Metrics, Task, cosine_rows, mean_ci, put, snr_db


@register_task("outputs")
class Outputs(Task):
    metric_names: ClassVar[tuple[str, ...]] = ("cosine", "snr_db", "max_abs_diff_vs_fp32", "fidelity")
    primary: ClassVar[str] = "cosine"
    needs_targets: ClassVar[bool] = False
    drop_name: ClassVar[str] = "cosine_drop"
    summary: ClassVar[str] = "no labels: per-output cosine, max abs diff and SNR (dB) against fp32"

    def check(self, outputs: Any, data: Any) -> None:
        return None

    def metrics(self, outputs: list[np.ndarray], targets: np.ndarray | None, reference: list[np.ndarray]) -> Metrics:
        out: Metrics = {"samples": int(len(outputs[0]))}
        per: list[dict[str, Any]] = []
        worst = None
        for got, ref in zip(outputs, reference, strict=True):
            g, r = got.astype(np.float64), ref.astype(np.float64)
            cos = cosine_rows(g, r)
            est = mean_ci(cos)
            per.append({"cosine": est[0], "max_abs_diff": float(np.abs(g - r).max()) if g.size else 0.0, "snr_db": snr_db(g, r)})
            if worst is None or est[0] < worst[0]:
                worst = est
        assert worst is not None
        put(out, "cosine", worst)  # the worst output's mean cosine
        out["fidelity"], out["fidelity_ci95"] = out["cosine"], out["cosine_ci95"]
        out["per_output"] = per
        out["snr_db"] = min(p["snr_db"] for p in per)
        out["max_abs_diff_vs_fp32"] = max(p["max_abs_diff"] for p in per)
        return out
