"""Parity: does the exported file, on its own runtime, compute what the torch model computes? Checked per output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ParityError


class ParityConfig(KeiryoConfig):
    max_abs_diff: float = Field(1e-3, gt=0, description="largest allowed |torch - export| on any output value")
    min_top1_agreement: float = Field(0.999, ge=0, le=1, description="share of samples with the same top-1 (2-D float outputs)")
    samples: int = Field(256, ge=1, description="evaluation samples compared")
    enforce: bool = Field(True, description="False records a failed check instead of raising")


@dataclass(frozen=True)
class ParityReport:
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    passed: bool
    max_abs_diff_tolerance: float
    min_top1_agreement: float
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Differences of one output: shape, max/mean abs diff, top-1 agreement for (batch, classes) outputs."""
    if got.shape != ref.shape:
        return {
            "shape": list(got.shape),
            "expected_shape": list(ref.shape),
            "max_abs_diff": float("inf"),
            "mean_abs_diff": float("inf"),
        }
    g, r = got.astype(np.float64), ref.astype(np.float64)
    finite = bool(np.isfinite(g).all())
    diff = np.abs(g - r)
    out: dict[str, Any] = {
        "max_abs_diff": float(diff.max()) if finite and diff.size else (0.0 if finite else float("inf")),
        "mean_abs_diff": float(diff.mean()) if finite and diff.size else (0.0 if finite else float("inf")),
    }
    if got.ndim == 2 and got.shape[1] > 1 and np.issubdtype(got.dtype, np.floating):
        out["top1_agreement"] = float((g.argmax(1) == r.argmax(1)).mean())
    return out


def check_parity(model: Any, session: Any, inputs: Any, cfg: ParityConfig, what: str) -> ParityReport:
    """Compare ``model`` (a ModelHandle, run in torch) and ``session`` on the first ``cfg.samples`` rows of ``inputs``."""
    from keiryo.evaluate import predict
    from keiryo.runtime import open_session

    if hasattr(inputs, "take"):  # a split, in memory or streamed
        part = inputs.take(cfg.samples)
    elif isinstance(inputs, dict):
        part = {k: v[: cfg.samples] for k, v in inputs.items()}
    else:
        part = {session.input_names[0]: np.asarray(inputs)[: cfg.samples]}
    with open_session("torch", model, session.threads) as ts:
        ref = predict(ts, part, 64)
    got = predict(session, part, 64)
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(ref))])
    if len(got) != len(ref):
        raise ParityError(
            f"{what}: the export has {len(got)} outputs, torch has {len(ref)}", max_abs_diff=float("inf"), top1_agreement=0.0
        )
    per = {n: compare(n, g, r) for n, g, r in zip(names, got, ref, strict=True)}
    bad_shape = [n for n, d in per.items() if "expected_shape" in d]
    if bad_shape:
        d = per[bad_shape[0]]
        raise ParityError(
            f"{what}: output {bad_shape[0]!r} has shape {tuple(d['shape'])}, torch {tuple(d['expected_shape'])}",
            max_abs_diff=float("inf"),
            top1_agreement=0.0,
        )
    max_diff = max(d["max_abs_diff"] for d in per.values())
    mean_diff = float(np.mean([d["mean_abs_diff"] for d in per.values()]))
    agreements = [d["top1_agreement"] for d in per.values() if "top1_agreement" in d]
    agree = min(agreements) if agreements else None
    passed = bool(np.isfinite(max_diff)) and max_diff <= cfg.max_abs_diff and (agree is None or agree >= cfg.min_top1_agreement)
    n = len(ref[0]) if ref else 0
    report = ParityReport(n, max_diff, mean_diff, agree, passed, cfg.max_abs_diff, cfg.min_top1_agreement, per)
    if not passed and cfg.enforce:
        worst = max(per, key=lambda k: per[k]["max_abs_diff"])
        agree_txt = "" if agree is None else f", top-1 agreement {agree:.2%} (required {cfg.min_top1_agreement:.2%})"
        raise ParityError(
            f"{what}: export does not match torch on {n} samples: output {worst!r} max abs diff {max_diff:.3g} "
            f"(tolerance {cfg.max_abs_diff:g}){agree_txt}; override with --parity-tolerance or --no-parity-check",
            max_abs_diff=max_diff,
            top1_agreement=agree if agree is not None else 1.0,
        )
    return report
