"""Parity: does the exported file, on its own runtime, compute what the torch model computes?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ParityError


class ParityConfig(KeiryoConfig):
    max_abs_diff: float = Field(1e-3, gt=0, description="largest allowed |torch - export| on any logit")
    min_top1_agreement: float = Field(0.999, ge=0, le=1, description="share of samples with the same top-1 class")
    samples: int = Field(256, ge=1, description="evaluation samples compared")
    enforce: bool = Field(True, description="False records a failed check instead of raising")


@dataclass(frozen=True)
class ParityReport:
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    passed: bool
    max_abs_diff_tolerance: float
    min_top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_parity(module: torch.nn.Module, session: Any, x: torch.Tensor, cfg: ParityConfig, what: str) -> ParityReport:
    """Compare ``module`` and ``session`` on ``x`` (first ``cfg.samples`` rows)."""
    x = x[: cfg.samples]
    module.eval()
    with torch.no_grad():
        ref = module(x).numpy().astype(np.float64)
    got = np.concatenate([session.run(x[i : i + 64].numpy())[0] for i in range(0, len(x), 64)]).astype(np.float64)
    if got.shape != ref.shape:
        raise ParityError(
            f"{what}: output shape {got.shape} differs from torch {ref.shape}", max_abs_diff=float("inf"), top1_agreement=0.0
        )
    diff = np.abs(got - ref)
    finite = bool(np.isfinite(got).all())
    max_diff = float(diff.max()) if finite else float("inf")
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    passed = finite and max_diff <= cfg.max_abs_diff and agree >= cfg.min_top1_agreement
    report = ParityReport(
        len(x), max_diff, float(diff.mean()) if finite else float("inf"), agree, passed, cfg.max_abs_diff, cfg.min_top1_agreement
    )
    if not passed and cfg.enforce:
        raise ParityError(
            f"{what}: export does not match torch on {len(x)} samples: max abs diff {max_diff:.3g} "
            f"(tolerance {cfg.max_abs_diff:g}), top-1 agreement {agree:.2%} (required {cfg.min_top1_agreement:.2%}); "
            "override with --parity-tolerance or --no-parity-check",
            max_abs_diff=max_diff,
            top1_agreement=agree,
        )
    return report
