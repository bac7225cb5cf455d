"""``quantize.int8_fallback``: int8 static PTQ with per-layer sensitivity analysis and float fallback.

1. Quantize everything; measure the task's drop (accuracy points for classification, MAE
   increase for regression, cosine for embeddings) on the **validation** split (never test)
   against the fp32 file, both run on onnxruntime.
2. If it exceeds ``max_accuracy_drop``: try each layer alone in float (calibration ranges and rounded
   weights are computed once and cached): the output error it removes, and the latency it adds,
3. and keep layers in float by error removed per millisecond added, one at a time, until the budget is
   met (or ``max_float_layers`` is reached, which is reported, not hidden); if not met, the leading layers in
   graph order are tried the same way (``try_leading``), and the lower drop is kept.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.quantize_ort import Int8StaticConfig, calibration_data, finish, preprocess, quantize_int8_static

QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


class Int8FallbackConfig(KeiryoConfig):
    max_accuracy_drop: float = Field(
        0.5, ge=0.0, description="budget on the validation split, in the task's drop unit (accuracy points for classification)"
    )
    max_float_layers: int = Field(8, ge=0, description="stop after keeping this many layers in float")
    latency_aware: bool = Field(
        True, description="take layers by output error removed per millisecond added in float (False: by error removed)"
    )
    try_leading: bool = Field(
        True,
        description="when the ranked layers do not meet the budget, also try the leading layers in graph order "
        "(high resolution, few channels: sensitive and often as fast in float) and keep the lower drop",
    )
    latency_iterations: int = Field(30, ge=5, description="timed runs of each trial's p50 (batch 1, the run's threads)")
    quant: Int8StaticConfig = Field(default_factory=Int8StaticConfig)


def scored(path: Path, split: Any, task: Any, reference: list[np.ndarray] | None) -> tuple[dict[str, Any], Any]:
    """``task``'s metrics of ``path`` on ``split`` (against ``reference`` outputs, else its own) and its outputs, run on
    onnxruntime with every usable core: a fidelity score, not a latency, and onnxruntime's CPU kernels split the
    work by output, not by sum (EfficientNet-Lite0's fp32 and QDQ files give bitwise the same outputs on 1 and 2
    threads, in 0.5x the time; measured on the Xeon)."""
    from keiryo.evaluate import predict_with_targets
    from keiryo.machine import usable_cores
    from keiryo.runtime import open_session

    with open_session("onnxruntime", path, usable_cores()) as s:
        outs, y = predict_with_targets(s, split)
    return task.metrics(outs, y, reference if reference is not None else outs), outs


def quantizable_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE]


@register_pass(
    "quantize.int8_fallback",
    Int8FallbackConfig,
    stage="onnx",
    summary="int8 static PTQ + per-layer sensitivity, worst layers kept float until the budget is met",
)
def int8_fallback(model: Artifact, cfg: Int8FallbackConfig, ctx: PassContext) -> PassResult:
    x_cal = calibration_data(ctx, cfg.quant, "quantize.int8_fallback")
    out = ctx.out_path("int8_fallback", ".onnx")
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(model.path, tdp / "pre.onnx") if cfg.quant.preprocess else model.path
        info = fallback_search(src, out, x_cal, cfg, ctx, tdp)
    return finish(model, out, info)


def p50_ms(path: Path, sample: dict[str, Any], threads: int, iterations: int) -> float:
    """Median latency of ``path`` on onnxruntime, batch 1 (``sample``), in ms."""
    from keiryo.benchmark import BenchConfig, run_benchmark
    from keiryo.runtime import open_session

    cfg = BenchConfig(threads=threads, warmup=5, iterations=iterations, throughput_batch=1, throughput_iterations=1)
    with open_session("onnxruntime", path, threads) as s:
        return round(run_benchmark(s, sample, cfg).latency_p50_ms, 4)


clock = time.perf_counter  # what paired_ratio times with


def paired_ratio(base: Path, trial: Path, sample: dict[str, Any], threads: int, iterations: int) -> float:
    """How much slower ``trial`` runs than ``base`` on onnxruntime, batch 1 (``sample``): the ratio of their median
    latencies over ``iterations`` runs each, the two sessions taking turns run by run (which goes first alternates),
    so that a virtual machine's drift from one second to the next falls on both alike."""
    from keiryo.runtime import open_session

    with open_session("onnxruntime", base, threads) as a, open_session("onnxruntime", trial, threads) as b:
        for _ in range(5):
            a.run(sample)
            b.run(sample)
        times = np.zeros((iterations, 2))
        for i in range(iterations):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                t = clock()
                (a, b)[j].run(sample)
                times[i, j] = clock() - t
    return float(np.median(times[:, 1]) / np.median(times[:, 0]))


def free_float_layers(
    src: Path,
    x: dict[str, np.ndarray],
    qcfg: Int8StaticConfig,
    cache: Path | None,
    work: Path,
    threads: int,
    exclude: list[str] | None = None,
    *,
    iterations: int = 200,
) -> tuple[list[str], list[dict[str, Any]]]:
    """The leading quantizable layers (graph order, the first ``qcfg.float_when_free``) that run no slower in
    float on onnxruntime: each in turn is left float with those before it and the file timed against the all-int8
    one (:func:`paired_ratio`, ``iterations`` runs of each, batch 1); taken while that ratio stays within
    ``1 + qcfg.float_free_tolerance`` and the float layers hold at most ``qcfg.float_free_max_share`` of the
    weights. The trial files are quantized with ``qcfg`` but at most GPTQ rounding and bias correction on the
    weights alone (a refit or a bias corrected for the int8 inputs changes values, not the kernels being timed),
    sharing ``cache``. Returns the layers and each trial's record."""
    import onnx

    probe = qcfg.model_copy(
        update={
            "rounding": "gptq" if qcfg.rounding == "refit" else qcfg.rounding,
            "bias_correction": "weights" if qcfg.bias_correction == "full" else qcfg.bias_correction,
            "float_when_free": 0,
        }
    )
    graph = onnx.load(str(src), load_external_data=False).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    weights = {n.name: sizes.get(n.input[1], 0) for n in graph.node if n.op_type in QUANTIZABLE}
    total = max(sum(weights.values()), 1)
    sample = {k: v[:1] for k, v in x.items()}
    base, trial = work / "free-int8.onnx", work / "free-trial.onnx"
    quantize_int8_static(src, base, x, probe, exclude=exclude, cache=cache)
    taken: list[str] = []
    trail: list[dict[str, Any]] = []
    for node in [n for n in weights if n not in (exclude or [])][: qcfg.float_when_free]:  # graph order
        share = sum(weights.get(n, 0) for n in [*taken, node]) / total
        rec: dict[str, Any] = {"node": node, "weight_share": round(share, 6)}
        trail.append(rec)
        if share > qcfg.float_free_max_share:
            rec["float"] = False
            break
        quantize_int8_static(src, trial, x, probe, exclude=[*(exclude or []), *taken, node], cache=cache)
        rec["p50_ratio"] = round(paired_ratio(base, trial, sample, threads, iterations), 4)
        rec["float"] = rec["p50_ratio"] <= 1 + qcfg.float_free_tolerance
        if not rec["float"]:
            break
        taken.append(node)
    return taken, trail


def fallback_search(
    src: Path,
    out: Path,
    x_cal: dict[str, np.ndarray],
    cfg: Int8FallbackConfig,
    ctx: PassContext,
    tdp: Path,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Quantize ``src`` into ``out``, keeping layers float one at a time until the validation budget is met.

    Each layer's sensitivity is the output error when it alone is int8 (squared error relative to the fp32
    outputs': continuous, where a few hundred samples tie many layers at the same drop; its input activation's
    rounding counts, as it should). With ``latency_aware`` the milliseconds the layer adds when it alone is float
    are measured too (batch 1; on CPUs a high-resolution layer with few channels often runs as fast in float as
    in int8) and layers are taken by error per millisecond, a cost under 5% of the int8 file's p50 counting as 5%.

    ``cache``: a calibration cache of ``src`` made with ``cfg.quant``'s ranges, rounding and granularity (its
    rounded weights and choices beside it), shared; else one is made in ``tdp``."""
    val, task = ctx.data.val.held(), ctx.get_task()  # scored once per trial: read once
    cache = cache or tdp / "calib.json"
    ref, ref_outs = scored(src, val, task, None)
    sample = {k: v[:1] for k, v in x_cal.items()}

    def quantized(tag: str, **kw: Any) -> Path:
        dst = tdp / f"{tag}.onnx"
        quantize_int8_static(src, dst, x_cal, cfg.quant, cache=cache, **kw)
        return dst

    def measured(path: Path) -> dict[str, float]:
        metrics, outs = scored(path, val, task, ref_outs)
        err = sum(float(np.mean((o - r) ** 2) / max(np.mean(r**2), 1e-12)) for o, r in zip(outs, ref_outs, strict=True))
        return {"val_drop_pt": round(float(task.drop(ref, metrics)), 3), "output_error": float(f"{err:.4g}")}

    def timed(path: Path) -> float:
        return p50_ms(path, sample, ctx.threads, cfg.latency_iterations)

    def walk(order: list[str], path: str, trail: list[dict[str, Any]]) -> tuple[float, list[str]]:
        """Float layers taken in ``order`` one at a time until the budget is met: the lowest drop on the way and
        the layers that gave it (a float layer can raise the drop: its int8 neighbours were tuned around it)."""
        taken: list[str] = []
        best = (full["val_drop_pt"], 0)
        for node in order[: cfg.max_float_layers]:
            taken.append(node)
            rec = measured(quantized("fb", exclude=taken))
            trail.append({"path": path, "float_layers": len(taken), "added": node, **rec})
            if rec["val_drop_pt"] < best[0]:
                best = (rec["val_drop_pt"], len(taken))
            if rec["val_drop_pt"] <= cfg.max_accuracy_drop:
                break
        return best[0], taken[: best[1]]

    full_path = quantized("full")
    full = measured(full_path)
    if cfg.latency_aware:
        full["p50_ms"] = timed(full_path)
    float_layers: list[str] = []
    alone: dict[str, dict[str, float]] = {}
    trail: list[dict[str, Any]] = [{"float_layers": 0, **full}]
    drop = full["val_drop_pt"]
    if drop > cfg.max_accuracy_drop:
        alone_order = quantizable_nodes(src)  # graph order: the leading layers see the input's full resolution
        for node in alone_order:
            alone[node] = measured(quantized("one", include=[node]))
            if cfg.latency_aware:
                alone[node]["float_cost_ms"] = round(timed(quantized("cost", exclude=[node])) - full["p50_ms"], 4)
        floor = 0.05 * full.get("p50_ms", 1.0)

        def score(n: str) -> float:
            return alone[n]["output_error"] / max(alone[n].get("float_cost_ms", floor), floor)

        ranked = sorted(alone, key=score, reverse=True)
        alone = {n: alone[n] for n in ranked}
        drop, float_layers = walk(ranked, "ranked", trail)
        if drop > cfg.max_accuracy_drop and cfg.try_leading:
            lead_drop, leading = walk(list(alone_order), "leading", trail)
            if lead_drop < drop:
                drop, float_layers = lead_drop, leading
    quantize_int8_static(src, out, x_cal, cfg.quant, exclude=float_layers, cache=cache)
    info: dict[str, Any] = {
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "drop_metric": task.drop_name,
        "val_drop_all_int8_pt": full["val_drop_pt"],
        "val_drop_pt": round(drop, 3),
        "float_layers": float_layers,
        "alone_int8": alone,
        "trail": trail,
        "budget_met": drop <= cfg.max_accuracy_drop,
    }
    if not info["budget_met"]:
        info["warning"] = f"budget not met after keeping {len(float_layers)} layers in float (max_float_layers)"
    return info
