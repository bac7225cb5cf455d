"""The ``results.json`` contract (docs/results.md). Field names are stable."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keiryo.errors import InputFileError
from keiryo.machine import machine_info

RESULTS_SCHEMA_VERSION = 2  # 2: model.io, task, metrics with *_ci95 and samples, failed candidates


def _target(c: dict[str, Any]) -> str:
    return str((c.get("recipe") or {}).get("target") or c.get("format", ""))


def _ratios(candidates: list[dict[str, Any]]) -> None:
    """Add size and speed ratios against the fp32 candidate of the same target (``fp32`` or ``fp32-TARGET``),
    and flag a candidate that is smaller but slower there (int8 in the browser, say: a known trap)."""
    ok = [c for c in candidates if c.get("status") == "ok"]
    refs = {_target(c): c["metrics"] for c in ok if c["name"] in ("fp32", f"fp32-{_target(c)}")}
    for c in candidates:
        r = refs.get(_target(c))
        if c.get("status") != "ok" or r is None:
            continue
        m = c["metrics"]
        m["size_ratio_vs_fp32"] = round(r["size_bytes"] / m["size_bytes"], 3)
        m["speedup_p50_vs_fp32"] = round(r["latency_p50_ms"] / m["latency_p50_ms"], 3)
        m["speedup_p95_vs_fp32"] = round(r["latency_p95_ms"] / m["latency_p95_ms"], 3)
        # over 5% smaller and over 5% slower at p50 on the runtime it ships on
        m["smaller_but_slower"] = m["size_ratio_vs_fp32"] > 1.05 and m["speedup_p50_vs_fp32"] < 0.95


def build_results(
    handle: Any,
    data: Any,
    task: Any,
    baseline_metrics: dict[str, Any],
    candidates: list[dict[str, Any]],
    best: str | None,
    constraints: Sequence[Any],
    opts: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    _ratios(candidates)
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            **handle.spec.model_dump(mode="json"),
            "io": handle.io.model_dump(mode="json"),
            "content_hash": handle.content_hash(),
            **({"privacy": handle.metadata["privacy"]} if handle.metadata.get("privacy") else {}),  # weights trained with DP
        },
        "data": data.summary(),
        "task": task.describe(),
        "task_metric": task.primary,
        "baseline": {
            "name": "baseline",
            "format": "torch",
            "runtime": "torch",
            "artifact": "baseline.safetensors",
            "metrics": baseline_metrics,
        },
        "candidates": candidates,
        "best": best,
        "failed": sum(1 for c in candidates if c.get("status") == "failed"),
        "constraints": [c.model_dump() for c in constraints],
        "bench": opts.bench.model_dump(),
        "machine": machine_info(opts.bench.threads),
        **extra,
    }


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".results.", dir=p.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_clean(results), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, p)
    return p


def read_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputFileError(f"{p}: results.json not found") from e
    except json.JSONDecodeError as e:
        raise InputFileError(f"{p}: not valid JSON ({e})") from e
