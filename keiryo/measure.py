"""Measurement: the one place that turns a model into figures.

Task metrics and fidelity (the task's, with 95% intervals and the sample count), size (raw
and gzip), params and MACs, latency (p50/p95/p99 at the latency batch, in an isolated child
process for files), throughput and peak RSS. The runner calls :func:`measure_baseline` once
and :func:`measure_artifact` per candidate; it never assembles metric dicts itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.benchmark import BenchConfig, measure_file, run_benchmark
from keiryo.errors import PassError
from keiryo.evaluate import predict, size_of


@dataclass
class Baseline:
    """The fp32 torch model's outputs on the test split (what every candidate is compared to) and its metrics."""

    handle: Any
    outputs: list[np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)


def bench_sample(data: Any) -> dict[str, np.ndarray]:
    """The benchmark's input: the first test rows (real data, at the data's sequence length)."""
    return {k: np.ascontiguousarray(v[:1]) for k, v in data.test.numpy().items()}


def input_shapes(sample: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sample.items()}


def task_metrics(task: Any, outputs: list[np.ndarray], data: Any, reference: list[np.ndarray], what: str) -> dict[str, Any]:
    bad = [i for i, o in enumerate(outputs) if np.issubdtype(o.dtype, np.floating) and not np.isfinite(o).all()]
    if bad:
        raise PassError(f"{what}: output(s) {bad} contain NaN/Inf on the test split")
    y = data.test.targets.numpy() if data.test.targets is not None else None
    return task.metrics(outputs, y, reference)


def measure_baseline(handle: Any, data: Any, task: Any, bench: BenchConfig) -> Baseline:
    from keiryo.runtime import open_session

    sample = bench_sample(data)
    with open_session("torch", handle, bench.threads) as s:
        outputs = predict(s, data.test)
        timing = run_benchmark(s, sample, bench)
    metrics = task_metrics(task, outputs, data, outputs, "baseline")
    metrics[task.drop_name] = 0.0
    metrics.update(params=handle.num_params(), macs=handle.macs(), **{k: v for k, v in timing.to_dict().items()})
    metrics["peak_rss_mb"] = None  # the torch baseline shares this process: its RSS says nothing
    metrics["input_shapes"] = input_shapes(sample)
    return Baseline(handle, outputs, metrics)


def measure_artifact(
    path: Path, runtime: str, data: Any, task: Any, baseline: Baseline, bench: BenchConfig, lock: str | Path | None = None
) -> dict[str, Any]:
    """Metrics of a model file on its runtime: task metrics vs the baseline, size, latency in a child process."""
    from keiryo.drift import reference_stats
    from keiryo.runtime import open_session

    with open_session(runtime, path, bench.threads) as s:
        outputs = predict(s, data.test)
        output_names = list(s.output_names)
    metrics = task_metrics(task, outputs, data, baseline.outputs, path.name)
    drop = task.drop(baseline.metrics, metrics)
    metrics[task.drop_name] = round(drop, 4) if math.isfinite(drop) else drop
    sample = bench_sample(data)
    timing = measure_file(path, runtime, sample, bench, lock=lock)
    metrics.update(size_of(path).to_dict())
    metrics["size_mb"] = metrics["size_bytes"] / 1e6
    metrics.update(timing.to_dict())
    metrics["input_shapes"] = input_shapes(sample)
    # what a server compares its traffic with (keiryo.drift): the test inputs and this file's own predictions
    metrics["drift_reference"] = reference_stats(data.test.numpy(), outputs, output_names, task.describe())
    return metrics


def torch_metrics(model: Any, data: Any, task: Any, baseline: Baseline | None) -> dict[str, Any]:
    """Params, MACs, weight-file size (raw and gzip) and the task's primary metric of a torch-stage result."""
    import gzip

    from safetensors.torch import save

    from keiryo.train import evaluate_torch

    blob = save({k: v.detach().contiguous() for k, v in model.module.state_dict().items()})
    m = evaluate_torch(model, data.test, task, baseline.outputs if baseline else None)
    return {
        "params": model.num_params(),
        "macs": model.macs(),
        "size_bytes": len(blob),
        "size_gzip_bytes": len(gzip.compress(blob, 9)),
        task.primary: m.get(task.primary),
    }
