"""``quantize.int8_auto``: escalate int8 PTQ rung by rung until the validation budget is met.

The rungs, cheapest first (each a complete int8 file, measured on onnxruntime against the fp32 file on the
**validation** split, in the task's drop unit):

1. ``ptq``: minmax ranges, nearest rounding (the ``int8`` recipe);
2. ``mse``: least-error, clip-aware activation ranges (:mod:`keiryo.passes.quantize_ranges`);
3. ``bias_correction``: mse ranges + bias correction against the int8 model's own inputs;
4. ``gptq``: mse ranges + Hessian-aware weight rounding + bias correction (:mod:`keiryo.passes.quantize_rounding`),
   per-tensor or per-channel weights and symmetric or asymmetric activations chosen per layer by measured error
   (:mod:`keiryo.passes.quantize_granularity`; so are the rungs after it but qat);
5. ``refit``: the gptq rung's file, then each int8 layer's weights and bias solved, in graph order, for the input
   the int8 layers before it give it, and GPTQ-rounded (:mod:`keiryo.passes.quantize_refit`);
6. ``precision``: the gptq rung with float graph outputs and 16-bit activations on the 4 tensors whose int8
   rounding alone costs the most output error (measured: :mod:`keiryo.passes.quantize_precision`);
7. ``fallback``: layers kept float one at a time, by output error per millisecond they add in float
   (:mod:`keiryo.passes.quantize_fallback`, on gptq weights with the cheap bias correction its many trials can
   share: a layer's sensitivity is measured without weights tuned around the others), until the budget is met or
   ``max_float_layers``, keeping the float layers that gave the lowest drop; then the same float layers with the
   other layers refitted around them (as in ``refit``), kept when it does better on the validation split;
8. ``qat``: quantization-aware fine-tuning of the torch model the file was exported from, distilled from that fp32
   model on the calibration inputs (no labels: :func:`keiryo.passes.qat.distill_qat`), exported again and quantized
   by ``quantize.int8_static`` with the activation ranges it learned, so what it records is the onnxruntime file.
   It needs ``ctx.source`` (the recipe runner sets it) and is capped in time (``qat.max_seconds``, ``qat.epochs``).

The first rung that meets ``max_accuracy_drop`` is the result. Every attempt is kept in the pass's info
(``ladder``: rung, options, validation drop, size, p50 latency on this machine, seconds, or the error a backend
raised inside it: a crash fails that rung, not the run). When no rung meets the budget, the closest one is
the result and ``closest`` lists the best attempts; the candidate's ``budget_met`` says so. "Closest" allows for
the validation split's size: two rungs whose drops differ by no more than the paired sampling error of that
difference (:func:`paired_error`, a bootstrap over the validation samples, the same resample for both files)
count as equal, and the faster one is kept (on EfficientNet-Lite0 a 1.5-point difference on 200 validation
crops, within the error, had kept a file 1.9x slower).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import first_line
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.qat import MIN_DISTILL_SAMPLES, QatDistillConfig
from keiryo.passes.quantize_fallback import Int8FallbackConfig, fallback_search, free_float_layers, p50_ms, scored
from keiryo.passes.quantize_ort import Int8StaticConfig, calibration_data, finish, preprocess, quantize_int8_static

Rung = Literal["ptq", "mse", "bias_correction", "gptq", "refit", "precision", "fallback", "qat"]
RUNGS: dict[str, dict[str, Any]] = {
    "ptq": {},
    "mse": {"calibration": "mse"},
    "bias_correction": {"calibration": "mse", "bias_correction": "full"},
    # from here on, weight and activation granularity chosen per layer by measured error (on EfficientNet-Lite0:
    # +0.7 pt agreement on int8-gptq with float outputs, +0.9 on mse alone; docs/techniques.md)
    "gptq": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full", "granularity": "measured"},
    # every int8 layer solved, in graph order, for the input the int8 layers before it give it (quantize_refit.py)
    "refit": {
        "calibration": "mse",
        "rounding": "refit",
        "bias_correction": "full",
        "granularity": "measured",
        "float_outputs": True,
        "float_when_free": 4,
    },
    "precision": {
        "calibration": "mse",
        "rounding": "gptq",
        "bias_correction": "full",
        "float_outputs": True,
        "wide_activations": 4,
        "granularity": "measured",
    },
    # the per-layer search quantizes many times: bias correction on fp32 inputs, computed once and cached
    "fallback": {
        "calibration": "mse",
        "rounding": "gptq",
        "bias_correction": "weights",
        "granularity": "measured",
        "float_outputs": True,
    },
    # the int8 pass after QAT: its learned ranges on the Conv/Linear inputs, mse ranges elsewhere, float logits
    "qat": {"calibration": "mse", "float_outputs": True},
}


class Int8AutoConfig(KeiryoConfig):
    max_accuracy_drop: float = Field(
        0.5, ge=0.0, description="budget on the validation split, in the task's drop unit (accuracy points for classification)"
    )
    rungs: list[Rung] = Field(default_factory=lambda: list(RUNGS), min_length=1, description="tried in this order")  # type: ignore[arg-type]
    max_float_layers: int = Field(8, ge=0, description="the fallback rung stops after keeping this many layers float")
    latency_iterations: int = Field(50, ge=5, description="timed runs of each rung's p50 (batch 1, the run's threads)")
    quant: Int8StaticConfig = Field(default_factory=Int8StaticConfig, description="options every rung starts from")
    qat: QatDistillConfig = Field(default_factory=QatDistillConfig, description="the qat rung's training (and its time cap)")


@register_pass(
    "quantize.int8_auto",
    Int8AutoConfig,
    stage="onnx",
    summary="int8 escalated rung by rung (mse ranges, bias correction, GPTQ, float fallback, QAT) until the budget is met",
)
def int8_auto(model: Artifact, cfg: Int8AutoConfig, ctx: PassContext) -> PassResult:
    x_cal = calibration_data(ctx, cfg.quant, "quantize.int8_auto")
    n_cal = len(next(iter(x_cal.values())))
    if "qat" in cfg.rungs and n_cal < MIN_DISTILL_SAMPLES:  # said before the ladder's minutes, not after them
        from keiryo.errors import DataError

        raise DataError(
            f"quantize.int8_auto: the qat rung needs at least {MIN_DISTILL_SAMPLES} calibration samples, got {n_cal}; "
            "give more (--calib-size) or leave qat out of rungs"
        )
    val, task = ctx.data.val.held(), ctx.get_task()  # scored once per rung: read once
    # the validation targets in memory, for the paired error between rungs (a split too large to hold: no error)
    y = val.targets.numpy() if getattr(val, "targets", None) is not None else None
    paired = y is not None or not (hasattr(val, "batches") and not hasattr(val, "numpy"))
    out = ctx.out_path("int8_auto", ".onnx")
    sample = {k: v[:1] for k, v in x_cal.items()}
    ladder: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    chosen_outs: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(model.path, tdp / "pre.onnx") if cfg.quant.preprocess else model.path
        ref, ref_outs = scored(src, val, task, None)
        fp32_p50 = p50_ms(src, sample, ctx.threads, cfg.latency_iterations)
        for rung in cfg.rungs:
            qcfg = cfg.quant.model_copy(update=RUNGS[rung])
            dst = tdp / f"{rung}.onnx"
            rec: dict[str, Any] = {"rung": rung, "options": RUNGS[rung]}
            t0 = time.perf_counter()
            outs: list[np.ndarray] | None = None  # the file's validation outputs, where its drop was scored here
            try:
                if rung == "fallback":
                    fb = Int8FallbackConfig(
                        max_accuracy_drop=cfg.max_accuracy_drop,
                        max_float_layers=cfg.max_float_layers,
                        latency_iterations=cfg.latency_iterations,
                        quant=qcfg,
                    )
                    (tdp / "fallback").mkdir()
                    # the gptq rung's ranges, rounded weights and granularity, where it ran: the same options but
                    # the bias correction's second half, which runs after them (a rounded weight is corrected alike)
                    gptq_cache = tdp / "gptq.ranges.json"
                    shared = gptq_cache if gptq_cache.is_file() else None
                    fb_info = fallback_search(src, dst, x_cal, fb, ctx, tdp / "fallback", shared)
                    rec["float_layers"] = fb_info["float_layers"]
                    rec["trail"] = fb_info["trail"]
                    drop = fb_info["val_drop_pt"]
                    if fb_info["float_layers"]:  # the chosen layers float, the rest refitted to their int8 inputs
                        refitted = tdp / "fallback-refit.onnx"
                        rcfg = qcfg.model_copy(update={"bias_correction": "full", "rounding": "refit"})
                        quantize_int8_static(src, refitted, x_cal, rcfg, exclude=fb_info["float_layers"], cache=shared)
                        metrics, refit_outs = scored(refitted, val, task, ref_outs)
                        refit_drop = float(task.drop(ref, metrics))
                        rec["val_drop_weights_correction"] = drop
                        if refit_drop <= drop:
                            shutil.move(refitted, dst)
                            drop, outs = refit_drop, refit_outs
                            rec["rounding"] = "refit"
                elif rung == "qat":
                    rec.update(qat_rung(dst, x_cal, qcfg, cfg.qat, ctx, tdp / "qat"))
                    metrics, outs = scored(dst, val, task, ref_outs)
                    drop = float(task.drop(ref, metrics))
                else:
                    chosen_here: dict[str, Any] = {}
                    # refit and precision start from gptq's file: the same ranges and rounded weights (cached beside them)
                    ranges = tdp / f"{'gptq' if rung in ('refit', 'precision') else rung}.ranges.json"
                    free = None
                    if qcfg.float_when_free:  # the leading layers that run no slower in float stay float
                        free, chosen_here["float_when_free"] = free_float_layers(src, x_cal, qcfg, ranges, tdp, ctx.threads)
                    quantize_int8_static(src, dst, x_cal, qcfg, exclude=free, cache=ranges, report=chosen_here)
                    rec.update(chosen_here)
                    metrics, outs = scored(dst, val, task, ref_outs)
                    drop = float(task.drop(ref, metrics))
                rec.update(
                    status="ok",
                    val_drop=round(drop, 4),
                    size_bytes=dst.stat().st_size,
                    latency_p50_ms=p50_ms(dst, sample, ctx.threads, cfg.latency_iterations),
                    budget_met=drop <= cfg.max_accuracy_drop,
                )
            except Exception as e:  # a backend's crash fails this rung only, with its message
                rec.update(status="failed", error=f"{type(e).__name__}: {first_line(e, 300)}")
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            ladder.append(rec)
            if ctx.progress:  # a ladder can take minutes: say where it stands, rung by rung
                from keiryo._console import stderr_console

                what = f"val drop {rec['val_drop']}" if rec["status"] == "ok" else f"failed: {rec['error']}"
                stderr_console().print(f"    int8-auto rung {rung}: {what} ({rec['seconds']} s)", highlight=False, markup=False)
            if rec["status"] != "ok":
                continue
            if outs is None:  # the fallback's own file: scored inside its search
                outs = scored(dst, val, task, ref_outs)[1]
            if chosen is not None and not rec["budget_met"]:
                err = paired_error(task, ref_outs, y, outs, chosen_outs) if paired else 0.0
                rec["vs_kept"] = {"rung": chosen["rung"], "paired_error": round(err, 4)}
            if chosen is None or rec["budget_met"] or replaces(rec, chosen, rec["vs_kept"]["paired_error"]):
                chosen, chosen_outs = rec, outs
                shutil.copyfile(dst, out)
            if rec["budget_met"]:
                break
    if chosen is None:
        from keiryo.errors import PassError

        errors = "; ".join(f"{r['rung']}: {r['error']}" for r in ladder)
        raise PassError(f"quantize.int8_auto: every rung failed ({errors})")
    ok = sorted((r for r in ladder if r["status"] == "ok"), key=lambda r: r["val_drop"])
    info: dict[str, Any] = {
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "drop_metric": task.drop_name,
        "chosen": chosen["rung"],
        "val_drop": chosen["val_drop"],
        "budget_met": bool(chosen.get("budget_met")),
        "fp32_latency_p50_ms": fp32_p50,
        "ladder": ladder,
    }
    if not info["budget_met"]:
        info["closest"] = [{k: r[k] for k in ("rung", "val_drop", "size_bytes", "latency_p50_ms")} for r in ok[:3]]
        why = (
            "the closest"
            if chosen["val_drop"] <= ok[0]["val_drop"]
            else f"as close as {ok[0]['rung']} ({ok[0]['val_drop']}) within the validation split's sampling error, and faster"
        )
        info["warning"] = (
            f"no rung met {task.drop_name} <= {cfg.max_accuracy_drop} on the validation split; "
            f"kept {chosen['rung']} ({chosen['val_drop']}): {why}"
        )
    return finish(model, out, info)


def replaces(rec: dict[str, Any], kept: dict[str, Any], error: float) -> bool:
    """Whether rung ``rec`` replaces the ``kept`` one when neither meets the budget: its drop is lower by more than
    ``error`` (the paired sampling error of the difference), or within it and its p50 is lower."""
    d = rec["val_drop"] - kept["val_drop"]
    return d < -error or (abs(d) <= error and rec["latency_p50_ms"] < kept["latency_p50_ms"])


def paired_error(
    task: Any, ref: list[np.ndarray], y: np.ndarray | None, a: list[np.ndarray], b: list[np.ndarray], draws: int = 200
) -> float:
    """The standard deviation of ``drop(a) - drop(b)`` over bootstrap resamples of the validation samples, each
    resample the same for the fp32 outputs ``ref``, the targets ``y`` and both files' outputs ``a``, ``b``: how far
    apart two files' drops on this split can be by the draw of its samples alone (two classifiers that disagree on
    k of n samples: about 100 sqrt(k) / n points). 0 where the task's metrics cannot be taken on a resample."""
    n = len(ref[0]) if ref else 0
    if n < 2:
        return 0.0
    rng = np.random.default_rng(0)
    diffs = []
    try:
        for _ in range(draws):
            i = rng.integers(0, n, n)
            r, t = [o[i] for o in ref], None if y is None else y[i]
            base = task.metrics(r, t, r)
            drops = [task.drop(base, task.metrics([o[i] for o in f], t, r)) for f in (a, b)]
            diffs.append(drops[0] - drops[1])
    except Exception:  # a task whose metrics need the whole split (ids, groups): no resampled error
        return 0.0
    d = np.asarray(diffs, dtype=np.float64)
    return float(np.std(d[np.isfinite(d)])) if np.isfinite(d).any() else 0.0


def qat_rung(
    dst: Path, x: dict[str, Any], qcfg: Int8StaticConfig, cfg: QatDistillConfig, ctx: PassContext, work: Path
) -> dict[str, Any]:
    """The ``qat`` rung: distil a fake-quantized copy of ``ctx.source`` from it on ``x`` (unlabeled), export it, and
    quantize that file into ``dst`` with the ranges QAT trained with. Returns what the ladder records."""
    from keiryo.errors import PassError
    from keiryo.export import export
    from keiryo.passes.qat import distill_qat

    if ctx.source is None:
        raise PassError(
            "the qat rung needs the torch model this file was exported from (PassContext.source); "
            "run int8-auto as a recipe (keiryo compress), where the runner passes it"
        )
    work.mkdir()
    student = ctx.source.clone()
    log = None
    if ctx.progress:
        from keiryo._console import stderr_console

        def log(msg: str) -> None:
            stderr_console().print(f"    {msg}", highlight=False, markup=False)

    rec, ranges = distill_qat(student, ctx.source, x, cfg, ctx.get_task(), ctx.seed, "int8-auto rung qat", log)
    exported = export(student, "onnx", work / "qat-fp32.onnx")
    src = preprocess(exported.path, work / "qat-pre.onnx") if qcfg.preprocess else exported.path
    cache = work / "ranges.json"
    if cfg.learn_ranges:
        rec["learned_ranges"] = write_ranges(src, exported.path, x, qcfg, ranges, cache, work)
    chosen: dict[str, Any] = {}
    quantize_int8_static(src, dst, x, qcfg, cache=cache if cache.is_file() else None, report=chosen)
    return {"qat": rec, **chosen}


def write_ranges(
    src: Path,
    exported: Path,
    x: dict[str, Any],
    qcfg: Int8StaticConfig,
    learned: dict[str, tuple[float, float]],
    cache: Path,
    work: Path,
) -> int:
    """An onnxruntime calibration cache for ``src``: ``qcfg``'s ranges (mse or minmax), with each Conv/Gemm input
    that QAT trained a range for set to that range. Torch layer ``a.b`` is the node whose weight is ``a.b.weight``
    (the exporter names initializers after parameters); a Pad in front of it (TensorFlow SAME padding) shares the
    range. Returns how many tensors took a learned range."""
    import onnx
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        load_tensors_data,
        save_tensors_data,
    )

    from keiryo.passes.quantize_ranges import minmax_ranges, mse_ranges

    n = len(next(iter(x.values())))
    batch = min(qcfg.calib_batch, n)

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{k: v[i : i + batch] for k, v in x.items()} for i in range(0, n, batch)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    if qcfg.calibration == "mse":
        mse_ranges(src, Reader, qcfg.op_types, qcfg.activation_type == "int8", cache, work)
    else:
        minmax_ranges(src, Reader, qcfg.op_types, cache, work)
    data = dict(load_tensors_data(str(cache)).items())
    graph = onnx.load(str(exported), load_external_data=False).graph
    producer = {o: node for node in graph.node for o in node.output}
    tensors: dict[str, tuple[float, float]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        layer = node.input[1].removeprefix("inner.").removesuffix(".weight")
        if layer in learned:
            t = node.input[0]
            tensors[t] = learned[layer]
            pad = producer.get(t)
            if pad is not None and pad.op_type == "Pad":
                tensors[pad.input[0]] = learned[layer]
    hit = 0
    for t, (lo, hi) in tensors.items():
        if t in data:
            data[t] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            hit += 1
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    return hit
