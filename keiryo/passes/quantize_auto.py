"""``quantize.int8_auto``: escalate int8 PTQ rung by rung until the validation budget is met.

The rungs, cheapest first (each a complete int8 file, measured on onnxruntime against the fp32 file on the
**validation** split, in the task's drop unit):

1. ``ptq``: minmax ranges, nearest rounding (the ``int8`` recipe);
2. ``mse``: least-error, clip-aware activation ranges (:mod:`keiryo.passes.quantize_ranges`);
3. ``bias_correction``: mse ranges + bias correction against the int8 model's own inputs;
4. ``gptq``: mse ranges + Hessian-aware weight rounding + bias correction (:mod:`keiryo.passes.quantize_rounding`);
5. ``precision``: the gptq rung with float graph outputs and 16-bit activations on the 4 tensors whose int8
   rounding alone costs the most output error (measured: :mod:`keiryo.passes.quantize_precision`);
6. ``fallback``: the gptq rung with the most sensitive layers kept float, one at a time
   (:mod:`keiryo.passes.quantize_fallback`), until the budget is met or ``max_float_layers``.

The first rung that meets ``max_accuracy_drop`` is the result. Every attempt is kept in the pass's info
(``ladder``: rung, options, validation drop, size, p50 latency on this machine, seconds, or the error a backend
raised inside it: a crash fails that rung, not the run). When no rung meets the budget, the closest one is
the result and ``closest`` lists the best attempts; the candidate's ``budget_met`` says so.
QAT with distillation (the rung after these) is a torch-level step: the recipe ``qat`` runs it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import first_line
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.quantize_fallback import Int8FallbackConfig, _val_metrics, fallback_search
from keiryo.passes.quantize_ort import Int8StaticConfig, calibration_data, finish, preprocess, quantize_int8_static

Rung = Literal["ptq", "mse", "bias_correction", "gptq", "precision", "fallback"]
RUNGS: dict[str, dict[str, Any]] = {
    "ptq": {},
    "mse": {"calibration": "mse"},
    "bias_correction": {"calibration": "mse", "bias_correction": "full"},
    "gptq": {"calibration": "mse", "rounding": "gptq", "bias_correction": "full"},
    "precision": {
        "calibration": "mse",
        "rounding": "gptq",
        "bias_correction": "full",
        "float_outputs": True,
        "wide_activations": 4,
    },
    # the per-layer search quantizes many times: bias correction on fp32 inputs, computed once and cached
    "fallback": {"calibration": "mse", "rounding": "gptq", "bias_correction": "weights"},
}


class Int8AutoConfig(KeiryoConfig):
    max_accuracy_drop: float = Field(
        0.5, ge=0.0, description="budget on the validation split, in the task's drop unit (accuracy points for classification)"
    )
    rungs: list[Rung] = Field(default_factory=lambda: list(RUNGS), min_length=1, description="tried in this order")  # type: ignore[arg-type]
    max_float_layers: int = Field(8, ge=0, description="the fallback rung stops after keeping this many layers float")
    latency_iterations: int = Field(50, ge=5, description="timed runs of each rung's p50 (batch 1, the run's threads)")
    quant: Int8StaticConfig = Field(default_factory=Int8StaticConfig, description="options every rung starts from")


def _p50_ms(path: Path, sample: dict[str, Any], threads: int, iterations: int) -> float:
    from keiryo.benchmark import BenchConfig, run_benchmark
    from keiryo.runtime import open_session

    cfg = BenchConfig(threads=threads, warmup=5, iterations=iterations, throughput_batch=1, throughput_iterations=1)
    with open_session("onnxruntime", path, threads) as s:
        return round(run_benchmark(s, sample, cfg).latency_p50_ms, 4)


@register_pass(
    "quantize.int8_auto",
    Int8AutoConfig,
    stage="onnx",
    summary="int8 PTQ escalated rung by rung (mse ranges, bias correction, GPTQ, float fallback) until the budget is met",
)
def int8_auto(model: Artifact, cfg: Int8AutoConfig, ctx: PassContext) -> PassResult:
    x_cal = calibration_data(ctx, cfg.quant, "quantize.int8_auto")
    val, task = ctx.data.val, ctx.get_task()
    out = ctx.out_path("int8_auto", ".onnx")
    sample = {k: v[:1] for k, v in x_cal.items()}
    ladder: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        src = preprocess(model.path, tdp / "pre.onnx") if cfg.quant.preprocess else model.path
        ref, ref_outs = _val_metrics(src, val, task, None, ctx.threads)
        fp32_p50 = _p50_ms(src, sample, ctx.threads, cfg.latency_iterations)
        for rung in cfg.rungs:
            qcfg = cfg.quant.model_copy(update=RUNGS[rung])
            dst = tdp / f"{rung}.onnx"
            rec: dict[str, Any] = {"rung": rung, "options": RUNGS[rung]}
            t0 = time.perf_counter()
            try:
                if rung == "fallback":
                    fb = Int8FallbackConfig(
                        max_accuracy_drop=cfg.max_accuracy_drop, max_float_layers=cfg.max_float_layers, quant=qcfg
                    )
                    (tdp / "fallback").mkdir()
                    fb_info = fallback_search(src, dst, x_cal, fb, ctx, tdp / "fallback")
                    rec["float_layers"] = fb_info["float_layers"]
                    drop = fb_info["val_drop_pt"]
                else:
                    chosen_here: dict[str, Any] = {}
                    # precision adds to gptq's file: the same ranges and rounded weights (cached beside them)
                    ranges = tdp / f"{'gptq' if rung == 'precision' else rung}.ranges.json"
                    quantize_int8_static(src, dst, x_cal, qcfg, cache=ranges, report=chosen_here)
                    rec.update(chosen_here)
                    drop = float(task.drop(ref, _val_metrics(dst, val, task, ref_outs, ctx.threads)[0]))
                rec.update(
                    status="ok",
                    val_drop=round(drop, 4),
                    size_bytes=dst.stat().st_size,
                    latency_p50_ms=_p50_ms(dst, sample, ctx.threads, cfg.latency_iterations),
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
            if rec["status"] == "ok" and (chosen is None or rec["val_drop"] < chosen["val_drop"]):
                chosen = rec
                shutil.copyfile(dst, out)
            if rec.get("budget_met"):
                chosen = rec
                shutil.copyfile(dst, out)
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
        info["warning"] = (
            f"no rung met {task.drop_name} <= {cfg.max_accuracy_drop} on the validation split; "
            f"kept the closest ({chosen['rung']}, {chosen['val_drop']})"
        )
    return finish(model, out, info)
