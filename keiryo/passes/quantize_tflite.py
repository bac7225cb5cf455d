"""Format-level quantization of TFLite files with Google's ``ai-edge-quantizer`` (the LiteRT PTQ tool).

- ``tflite.fp16``: fp16 weights (float casting), float compute; half the file.
- ``tflite.int8_dynamic``: int8 weights, activations quantized at run time by the kernels.
- ``tflite.int8``: full-integer int8 (weights and activations, int8 input and output tensors),
  activation ranges calibrated on the calibration split (the representative dataset): by default keiryo's
  least-error ranges (:mod:`keiryo.passes.tflite_ranges`), not ai-edge-quantizer's moving average; weights
  rounded by keiryo on ai-edge-quantizer's grid before it quantizes them, GPTQ and bias correction by default,
  ``rounding: refit`` for each layer solved for its int8 input (:mod:`keiryo.passes.tflite_rounding`).

Each writes a new .tflite next to the step's work files and checks that the interpreter loads it.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import BackendUnavailableError, DataError, PassError, first_line
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.tflite_ranges import SIGNATURE, activation_ranges

Granularity = Literal["channelwise", "tensorwise"]


class TfliteFp16Config(KeiryoConfig):
    min_weight_elements: int = Field(0, ge=0, description="leave smaller weight tensors in fp32")


class TfliteInt8DynamicConfig(KeiryoConfig):
    granularity: Granularity = "channelwise"


class TfliteInt8Config(KeiryoConfig):
    granularity: Granularity = Field("channelwise", description="weight scales per output channel or per tensor")
    calib_samples: int | None = Field(None, ge=1, description="representative samples (default: the whole calibration split)")
    calibration: Literal["mse", "minmax", "moving_average"] = Field(
        "mse",
        description="activation ranges: least expected squared error (mse), absolute min/max over the samples (minmax), "
        "or ai-edge-quantizer's own moving average of each sample's min/max (moving_average: clips the larger values)",
    )
    rounding: Literal["gptq", "refit", "nearest"] = Field(
        "gptq",
        description="weights rounded on ai-edge-quantizer's grid by keiryo before it quantizes them: Hessian-aware (gptq), "
        "gptq then each layer solved for the input the int8 file gives it (refit: minutes), or to nearest (nearest: "
        "ai-edge-quantizer's own rounding)",
    )
    refit_chunk: int = Field(2, ge=1, description="refit: layers solved between two quantizations of the file")
    wide_outputs: bool = Field(
        False,
        description="the model's outputs, and the ops that write them, in 16-bit integers (TFLite's 16x8 kernels; not "
        "on int8-only accelerators): int8 logits can tie (2-3% of EfficientNet-Lite0's crops had two top classes); "
        "there +0.1-0.4 pt agreement for 11% more latency (2.28 -> 2.54 ms)",
    )
    wide_leading: int = Field(
        0,
        ge=0,
        description="the operators up to the N-th convolution (the file's order) in 16-bit integer activations "
        "(TFLite's 16x8 kernels: still full-integer, not on int8-only accelerators): what onnxruntime's int8-auto keeps "
        "float by float_when_free (the stem and first depthwise convolution of an EfficientNet), whose int8 inputs "
        "cost the most agreement; for accelerators with 16x8 kernels: a CPU runs them with the interpreter's reference "
        "kernels (EfficientNet-Lite0: +0.8 pt, 4x slower than fp32)",
    )
    bias_correction: bool = Field(True, description="each layer's bias takes the mean output error its rounding causes")


def _quantizer(src: Path) -> Any:
    try:
        from ai_edge_quantizer import quantizer
    except ImportError as e:
        raise BackendUnavailableError("TFLite quantization (ai-edge-quantizer, installed with litert-torch)", "tflite") from e
    return quantizer.Quantizer(str(src))


def _granularity(name: str) -> Any:
    from ai_edge_quantizer import qtyping

    return {"channelwise": qtyping.QuantGranularity.CHANNELWISE, "tensorwise": qtyping.QuantGranularity.TENSORWISE}[name]


def _run(src: Artifact, out: Path, what: str, configure: Any, calibrate: Any = None, float_file: Path | None = None) -> None:
    """Quantize ``src`` (or ``float_file``, its float file with rounded weights) into ``out``; ``calibrate(quantizer,
    float file)`` gives the statistics a static recipe quantizes with."""
    from keiryo._quiet import quiet, silence_native_output

    path = float_file or src.path
    qt = _quantizer(path)
    try:
        with quiet("absl"), silence_native_output():
            configure(qt)
            if qt.need_calibration:
                if calibrate is None:
                    raise PassError(f"{what} needs calibration data")
                result = qt.quantize(calibrate(qt, path))
            else:
                result = qt.quantize()
            out.unlink(missing_ok=True)
            result.export_model(str(out), overwrite=True)
    except PassError:
        raise
    except Exception as e:
        out.unlink(missing_ok=True)
        first = first_line(e)
        raise PassError(f"{what} failed on {src.path.name}: {type(e).__name__}: {first[:300]}") from e


def _finish(src: Artifact, out: Path, info: dict[str, Any]) -> PassResult:
    from keiryo.export.tflite import tflite_info

    try:
        file_info = tflite_info(out)
    except Exception as e:
        out.unlink(missing_ok=True)
        raise PassError(f"{out.name}: the quantized model does not load in the LiteRT interpreter: {e}") from e
    info = {**info, **file_info}
    return PassResult(
        Artifact(out, "tflite", "litert", list(src.input_names), list(src.output_names), {**src.info, **info}), info
    )


@register_pass("tflite.fp16", TfliteFp16Config, stage="tflite", summary="TFLite fp16 weights (ai-edge-quantizer float casting)")
def tflite_fp16(model: Artifact, cfg: TfliteFp16Config, ctx: PassContext) -> PassResult:
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    def configure(qt: Any) -> None:
        op_config = qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
            min_weight_elements=cfg.min_weight_elements,
        )
        qt.update_quantization_recipe(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            op_config=op_config,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )

    out = ctx.out_path("fp16", ".tflite")
    _run(model, out, "tflite.fp16", configure)
    return _finish(model, out, {"weights": "fp16"})


@register_pass("tflite.int8_dynamic", TfliteInt8DynamicConfig, stage="tflite", summary="TFLite dynamic-range int8 (int8 weights)")
def tflite_int8_dynamic(model: Artifact, cfg: TfliteInt8DynamicConfig, ctx: PassContext) -> PassResult:
    from ai_edge_quantizer import qtyping

    def configure(qt: Any) -> None:
        qt.add_dynamic_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 8, _granularity(cfg.granularity))

    out = ctx.out_path("int8_dynamic", ".tflite")
    _run(model, out, "tflite.int8_dynamic", configure)
    return _finish(
        model, out, {"weights": "int8", "activations": "float (quantized at run time)", "granularity": cfg.granularity}
    )


def _scopes(names: list[str]) -> str:
    """A regex matching ai-edge-quantizer's scope (an op's output tensor names, each followed by ';') of the ops that
    write any of ``names``."""
    import re

    return "|".join(f"(^|;){re.escape(n)};" for n in names)


def _output_scopes(path: Path) -> str:
    """The scopes of the ops that write the model's outputs."""
    from keiryo.runtime.litert import load_interpreter

    it = load_interpreter(path, delegate=False)
    return _scopes([d["name"] for d in it.get_output_details()])


def _leading_scopes(path: Path, convolutions: int) -> str:
    """The scopes of the ops of the default signature's subgraph, in the file's order, up to and including the
    ``convolutions``-th CONV_2D or DEPTHWISE_CONV_2D (the ops between them too: a PAD left int8 would quantize what
    the wide layers keep)."""
    from ai_edge_litert import schema_py_generated as fb

    from keiryo.passes.tflite_ranges import tensors_interpreter
    from keiryo.passes.tflite_rounding import CONVOLUTIONS, builtin_codes

    buf = path.read_bytes()
    model = fb.Model.GetRootAs(buf, 0)
    sg = model.Subgraphs(tensors_interpreter(path, 1)[2])
    codes = builtin_codes(model)
    names, seen = [], 0
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        names += [sg.Tensors(int(t)).Name().decode() for t in op.OutputsAsNumpy()]
        seen += codes[op.OpcodeIndex()] in CONVOLUTIONS
        if seen == convolutions:
            return _scopes(names)
    raise PassError(f"tflite.int8: wide_leading={convolutions} but {path.name} has {seen} convolution(s)")


def representative_data(ctx: PassContext, n: int | None, what: str) -> list[dict[str, np.ndarray]]:
    """The calibration split as batch-1 samples keyed by the model's input names."""
    if ctx.data is None:
        raise DataError(f"{what} needs a representative dataset; pass --data")
    x = ctx.data.calib.numpy()
    rows = len(next(iter(x.values())))
    rows = min(rows, n) if n else rows
    return [{k: v[i : i + 1] for k, v in x.items()} for i in range(rows)]


@register_pass("tflite.int8", TfliteInt8Config, stage="tflite", summary="TFLite full-integer int8 (calibrated, int8 I/O)")
def tflite_int8(model: Artifact, cfg: TfliteInt8Config, ctx: PassContext) -> PassResult:
    from ai_edge_quantizer import qtyping

    calib = representative_data(ctx, cfg.calib_samples, "tflite.int8")

    wide = _output_scopes(model.path) if cfg.wide_outputs else None
    leading = _leading_scopes(model.path, cfg.wide_leading) if cfg.wide_leading else None

    def configure(qt: Any) -> None:
        gran = _granularity(cfg.granularity)
        qt.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 8, 8, gran)
        for scopes in (leading, wide):  # 16x8 where the op has such a kernel (others stay int8)
            if scopes:
                qt.add_static_config(scopes, qtyping.TFLOperationName.ALL_SUPPORTED, 16, 8, gran)
        if wide:
            qt.add_static_config(".*", qtyping.TFLOperationName.OUTPUT, 16, 8, gran)

    out = ctx.out_path("int8", ".tflite")
    info: dict[str, Any] = {"weights": "int8", "activations": "int8", "granularity": cfg.granularity}
    info.update(calib_samples=len(calib), calibration=cfg.calibration, wide_outputs=cfg.wide_outputs)
    info.update(wide_leading=cfg.wide_leading)

    def calibrate(qt: Any, path: Path) -> Any:
        if cfg.calibration == "moving_average":
            return qt.calibrate({SIGNATURE: calib})
        # ai-edge-quantizer's statistics on two samples name the tensors; keiryo gives their ranges
        return activation_ranges(path, calib, cfg.calibration, qt.calibrate({SIGNATURE: calib[:2]}), ctx.threads)

    if cfg.rounding == "nearest" and not cfg.bias_correction:
        _run(model, out, "tflite.int8", configure, calibrate)
        return _finish(model, out, info)
    from keiryo.passes.quantize_rounding import MIN_ROUNDING_SAMPLES
    from keiryo.passes.tflite_rounding import refit_tflite, round_tflite

    if cfg.rounding != "nearest" and len(calib) < MIN_ROUNDING_SAMPLES:
        raise DataError(
            f"tflite.int8: rounding={cfg.rounding} got {len(calib)} calibration sample(s); it needs at least "
            f"{MIN_ROUNDING_SAMPLES} (raise --calib-size or calib_samples, or set rounding: nearest)"
        )
    per_channel = cfg.granularity == "channelwise"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tflite-int8-") as td:
        work = Path(td)
        rounded = work / "rounded-float.tflite"
        info["weight_rounding"] = round_tflite(
            model.path, rounded, calib, rounding="nearest" if cfg.rounding == "nearest" else "gptq",
            bias_correction=cfg.bias_correction, per_channel=per_channel, threads=ctx.threads,
        )  # fmt: skip
        if cfg.rounding != "refit":
            _run(model, out, "tflite.int8", configure, calibrate, rounded)
            return _finish(model, out, info)
        fixed: dict[str, Any] = {}  # the ranges of the rounded file, kept while the layers are refitted for them

        def calibrate_once(qt: Any, path: Path) -> Any:
            if not fixed:
                fixed.update(calibrate(qt, path))
            return copy.deepcopy(fixed)

        def quantize(path: Path, dst: Path) -> None:
            _run(model, dst, "tflite.int8 (refit)", configure, calibrate_once, path)

        info["refit"] = refit_tflite(
            model.path, rounded, calib, quantize, work, per_channel=per_channel, chunk=cfg.refit_chunk, threads=ctx.threads
        )
        _run(model, out, "tflite.int8", configure, calibrate_once, rounded)
        # kept only where the validation outputs are closer to fp32's than gptq's (refitting too many layers at once
        # overcorrects)
        assert ctx.data is not None  # representative_data checked it
        start = work / "refit-start-int8.tflite"
        err = {k: _output_error(model.path, f, ctx.data.val) for k, f in (("gptq", start), ("refit", out))}
        info["refit"].update(output_error_gptq=float(f"{err['gptq']:.4g}"), output_error=float(f"{err['refit']:.4g}"))
        info["refit"]["kept"] = err["refit"] <= err["gptq"]
        if not info["refit"]["kept"]:
            shutil.copyfile(start, out)
    return _finish(model, out, info)


def _output_error(fp32: Path, quantized: Path, split: Any) -> float:
    """Squared error of ``quantized``'s outputs relative to ``fp32``'s, over ``split`` (the validation split)."""
    from keiryo.evaluate import predict
    from keiryo.runtime.litert import LiteRTSession

    with LiteRTSession(fp32) as a, LiteRTSession(quantized) as b:
        ref, got = predict(a, split), predict(b, split)
    err = sum(float(np.sum((g - r) ** 2)) for r, g in zip(ref, got, strict=True))
    norm = sum(float(np.sum(r**2)) for r in ref)
    return err / max(norm, 1e-12)
