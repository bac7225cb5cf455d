"""Format-level quantization of ONNX files with ``onnxruntime.quantization``.

- ``quantize.int8_static``: QDQ, per-channel int8 weights, uint8 activations
  (U8S8, the fast path on x86 with VNNI), calibrated on the calibration split
  with minmax, entropy, percentile or mse (least-error, clip-aware ranges:
  :mod:`keiryo.passes.quantize_ranges`); weights rounded to nearest or by GPTQ,
  optionally with bias correction (:mod:`keiryo.passes.quantize_rounding`).
- ``quantize.int8_dynamic``: int8 weights (per output channel), activations quantized at run time
  (MatMul/Gemm/attention-heavy models).
- both int8 passes take ``smooth_alpha``: SmoothQuant-style activation smoothing of the MatMul/Gemm inputs on
  the calibration split first (:mod:`keiryo.passes.quantize_smooth`).
- ``quantize.fp16``: fp16 weights and compute, fp32 inputs/outputs kept.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from keiryo._quiet import quiet
from keiryo.config import KeiryoConfig
from keiryo.errors import DataError, PassError, first_line
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass


class SmoothingOptions(KeiryoConfig):
    """SmoothQuant-style smoothing, an option of both int8 passes (keiryo/passes/quantize_smooth.py)."""

    smooth_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="SmoothQuant: move activation outliers of MatMul/Gemm inputs into the weights (s = max|x|^alpha / "
        "max|w|^(1-alpha), per input channel, measured on the calibration split); None: off",
    )
    smooth_min_ratio: float = Field(
        5.0, ge=1, description="smoothing skips activations whose largest channel max is below this many times the median"
    )


class Int8StaticConfig(SmoothingOptions):
    calibration: Literal["minmax", "entropy", "percentile", "mse"] = Field(
        "minmax", description="activation ranges: minmax | entropy (KL) | percentile | mse (least expected error, clip-aware)"
    )
    percentile: float = Field(99.999, gt=90, le=100, description="for calibration=percentile")
    entropy_bins: int = Field(
        2048, ge=256, le=16384, description="for calibration=entropy: histogram bins the KL threshold search runs over"
    )
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    quantize_bias: bool = Field(False, description="int32 biases (True) or keep fp32 biases (smaller file, exact bias)")
    calib_samples: int | None = Field(None, ge=1, description="calibration samples (default: the whole calibration split)")
    calib_batch: int = Field(16, ge=1)
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names kept in float (per-layer fallback)")
    op_types: list[str] | None = Field(None, description="only quantize these op types (default: all supported)")
    preprocess: bool = Field(True, description="run onnxruntime's quant_pre_process (shape inference + fusion) first")
    rounding: Literal["nearest", "gptq", "refit"] = Field(
        "nearest",
        description="weight rounding: nearest int8 level; gptq (Hessian-aware, on the calibration inputs); refit (gptq, "
        "then each int8 layer's weights and bias solved for the input the int8 model gives it, to match the fp32 "
        "layer's output, and GPTQ-rounded again: keiryo/passes/quantize_refit.py)",
    )
    refit_chunk: int = Field(
        2,
        ge=1,
        description="for rounding=refit: layers refitted together, in graph order, before the int8 inputs are read "
        "again (1: each layer sees every refitted one before it; more: faster)",
    )
    bias_correction: Literal["off", "weights", "full"] = Field(
        "off",
        description="add each layer's mean output error to its bias: weights (the int8 weights' error on fp32 inputs) "
        "or full (against the int8 model's own inputs too: upstream activation error is corrected)",
    )
    rounding_samples: int = Field(128, ge=1, description="calibration samples the rounding and bias correction read")
    float_outputs: bool = Field(
        False, description="the graph outputs (logits, embeddings) leave the last int8 layer in float, not on a 256-level grid"
    )
    granularity: Literal["fixed", "measured"] = Field(
        "fixed",
        description="fixed: per_channel for every weight, asymmetric activations; measured: chosen layer by layer "
        "on the calibration inputs, the simpler form wherever it costs at most granularity_tolerance more error: "
        "per-tensor weights (error of the layer's output) and symmetric activations (the tensor's rounding error)",
    )
    granularity_tolerance: float = Field(
        0.05, ge=0, le=1, description="granularity=measured: extra relative error the simpler form may cost"
    )
    float_when_free: int = Field(
        0,
        ge=0,
        description="the first N quantizable layers in graph order are timed on onnxruntime (batch 1), each left "
        "float in turn with those before it; those that keep the int8 file's p50 within float_free_tolerance stay "
        "float (high-resolution layers with few channels, a CNN's stem and first depthwise conv, often run as fast "
        "in float and cost int8 the most fidelity). Applied by the pass (quantize_fallback.free_float_layers)",
    )
    float_free_tolerance: float = Field(
        0.03, ge=0, le=1, description="float_when_free: p50 increase over the all-int8 file a float layer may cost"
    )
    float_free_max_share: float = Field(
        0.02,
        ge=0,
        le=1,
        description="float_when_free: the float layers together hold at most this share of the quantizable weights "
        "(the file stays int8-sized; EfficientNet-Lite0's stem and first depthwise conv: 0.03%)",
    )
    wide_activations: int = Field(
        0,
        ge=0,
        description="this many activations, those whose int8 rounding alone costs the most output error on the "
        "calibration inputs (measured), get 16-bit activations; their consumers run in float",
    )


class Int8DynamicConfig(SmoothingOptions):
    per_channel: bool = Field(
        True,
        description="int8 weight scale per output channel (True) or per tensor; per channel kept all-MiniLM-L6-v2's "
        "embeddings at cosine 0.993 where per tensor gave 0.964, same size and speed (docs/techniques.md)",
    )
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather"],
        description="op types quantized; Gather quantizes embedding tables (int8 rows, dequantized after the lookup)",
    )
    exclude_nodes: list[str] = Field(default_factory=list)
    calib_samples: int = Field(128, ge=1, description="calibration rows smoothing measures activations on")


class Fp16Config(KeiryoConfig):
    keep_io_types: bool = Field(True, description="keep fp32 inputs/outputs (callers need not change)")
    op_block_list: list[str] = Field(default_factory=list, description="op types kept in fp32")


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _node_census(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def finish(src: Artifact, out: Path, info: dict[str, Any]) -> PassResult:
    """Check the written graph, count its ops, and wrap it as the pass result."""
    from keiryo.errors import InputFileError
    from keiryo.export.onnx import load_onnx

    try:
        load_onnx(out)  # checked: a broken graph fails here, not at serving time
    except InputFileError as e:
        out.unlink(missing_ok=True)
        raise PassError(f"{out.name}: the pass produced an invalid ONNX graph: {e}") from e
    info["op_census"] = _node_census(out)
    art = Artifact(out, "onnx", src.runtime, list(src.input_names), list(src.output_names), {**src.info, **info})
    return PassResult(art, info)


def quantize_int8_static(
    src: Path,
    out: Path,
    x: dict[str, np.ndarray],
    cfg: Int8StaticConfig,
    *,
    exclude: list[str] | None = None,
    include: list[str] | None = None,
    cache: Path | None = None,
    report: dict[str, Any] | None = None,
) -> None:
    """int8 static quantization of ``src`` into ``out`` (QDQ); ``x`` feeds every named input; ``cache`` reuses ranges;
    ``report`` receives what the per-tensor precision options chose (``wide_activations``, ``float_outputs``)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

    exclude = [*(exclude or []), *float_only_nodes(src)]
    n = len(next(iter(x.values())))
    # onnxruntime's histogram calibrators (entropy, percentile) pool every batch's outputs with
    # np.asarray(list_of_batches) (calibrate.py, HistogramCollector.collect_value), so a shorter last
    # batch raises "inhomogeneous shape" (onnxruntime#18792). Give them batches of one size: the largest
    # divisor of n not above calib_batch. The ranges are the same: the outputs are pooled anyway.
    batch = min(cfg.calib_batch, n)
    if cfg.calibration != "minmax":
        batch = max(d for d in range(1, batch + 1) if n % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{k: v[i : i + batch] for k, v in x.items()} for i in range(0, n, batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "mse": CalibrationMethod.MinMax,  # the ranges come from the cache written below
    }[cfg.calibration]
    extra: dict[str, Any] = {"QuantizeBias": cfg.quantize_bias}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    with quiet(), tempfile.TemporaryDirectory(prefix="keiryo-calib-") as td:
        fp32_src = src
        weights = None
        if cfg.granularity == "measured":  # measured on the float weights, before any rounding
            from keiryo.passes.quantize_granularity import weight_choice

            weights = weight_choice(src, x, cfg, cache)  # each measured weight gets its own override below
        kept_float = float_layers(fp32_src, [*cfg.exclude_nodes, *exclude], include)
        pc = {k: c["per_channel"] for k, c in weights.items()} if weights is not None else None
        if cfg.rounding != "nearest" or cfg.bias_correction != "off":
            src, extra["TensorQuantOverrides"] = rounded_weights(src, x, cfg, Path(td), cache, pc)
            if kept_float:  # the rounding covers every layer (cached across fallback trials); float ones get theirs back
                from keiryo.passes.quantize_rounding import restore_float_layers

                src = restore_float_layers(src, fp32_src, kept_float, Path(td) / "rounded-float.onnx")
                floats = {n.input[1] for n in _graph(fp32_src).node if n.name in kept_float}
                extra["TensorQuantOverrides"] = {k: v for k, v in extra["TensorQuantOverrides"].items() if k not in floats}
        try:
            if cfg.calibration == "mse" and not (cache is not None and cache.is_file()):
                from keiryo.passes.quantize_ranges import mse_ranges

                cache = mse_ranges(
                    src, Reader, cfg.op_types, cfg.activation_type == "int8", cache or Path(td) / "mse.json", Path(td)
                )
            if cfg.calibration == "entropy" and not (cache is not None and cache.is_file()):
                # quantize_static builds its entropy calibrator with 128 bins and 128 quantized bins, so the
                # KL search has one candidate (the full range): the same ranges as minmax. Compute them with
                # cfg.entropy_bins here and hand them over as a calibration cache.
                cache = entropy_ranges(src, Reader(), cfg, cache or Path(td) / "entropy.json", Path(td))
            if cfg.wide_activations or weights is not None:
                cache = cache or Path(td) / "ranges.json"
                if not cache.is_file():  # the ranges the measurements below use: quantize_static reads them too
                    from keiryo.passes.quantize_ranges import minmax_ranges

                    minmax_ranges(src, Reader, cfg.op_types, cache, Path(td))
                if cfg.wide_activations:
                    wide = widest(src, cache, x, cfg, report)
                    extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}), **wide}
                if weights is not None:
                    from keiryo.passes.quantize_granularity import granularity_overrides

                    chosen = granularity_overrides(src, cache, x, cfg, weights, report)
                    extra["TensorQuantOverrides"] = {**chosen, **extra.get("TensorQuantOverrides", {})}
            if cfg.bias_correction == "full" or cfg.rounding == "refit":
                cache = cache or Path(td) / "ranges.json"  # the quantizations after the first keep its ranges
            if cfg.bias_correction == "full" and cfg.rounding != "refit":  # a refit solves each int8 layer's bias itself
                from keiryo.passes.quantize_rounding import correct_biases_on_int8_inputs

                run_quantize_static(src, out, Reader, method, cfg, exclude, include, extra, cache)
                rows = min(cfg.rounding_samples, n)
                # corrected in a copy: ``src`` may be the rounded file kept beside ``cache``, which the next
                # quantization with that cache (other float layers, other rungs) must read as rounded, not as
                # corrected for this one's int8 inputs
                src = Path(shutil.copyfile(src, Path(td) / "bias-corrected.onnx"))
                correct_biases_on_int8_inputs(fp32_src, src, out, {k: v[:rows] for k, v in x.items()})
            run_quantize_static(src, out, Reader, method, cfg, exclude, include, extra, cache)
            if cfg.rounding == "refit":
                from keiryo.passes.quantize_refit import refit_sequentially

                def requantize(refitted: Path, pinned: dict[str, list[dict[str, Any]]]) -> None:
                    extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}), **pinned}
                    run_quantize_static(refitted, out, Reader, method, cfg, exclude, include, extra, cache)

                grid = pc if pc is not None else cfg.per_channel
                summary = refit_sequentially(fp32_src, src, out, x, grid, requantize, Path(td), chunk=cfg.refit_chunk)
                if report is not None:
                    report["refit"] = summary
            pinned = keep_float_layers_float(out, kept_float)
            if report is not None and pinned:
                report["float_layers_pinned"] = pinned
            if cfg.float_outputs:
                from keiryo.passes.quantize_precision import float_graph_outputs

                freed = float_graph_outputs(out)
                if report is not None:
                    report["float_outputs"] = freed
        except Exception as e:
            out.unlink(missing_ok=True)
            raise PassError(f"int8 static quantization failed on {src.name}: {type(e).__name__}: {first_line(e, 300)}") from e


def _graph(src: Path) -> Any:
    import onnx

    return onnx.load(str(src), load_external_data=False).graph


def float_layers(src: Path, exclude: list[str], include: list[str] | None) -> set[str]:
    """The weight layers (Conv, Gemm) of ``src`` that quantization leaves in float: the excluded ones, and with an
    ``include`` list every layer not on it."""
    layers = {n.name for n in _graph(src).node if n.op_type in ("Conv", "Gemm")}
    kept = layers & set(exclude)
    if include is not None:
        kept |= layers - set(include)
    return kept


def keep_float_layers_float(qdq: Path, nodes: set[str]) -> list[str]:
    """Stop onnxruntime from quantizing the float layers of ``qdq`` behind keiryo's back (in place); the layers
    pinned.

    onnxruntime (1.21+) runs ``WeightBiasQuantization`` at every session's basic optimization level: a Conv or Gemm
    with float weights whose input comes from a per-tensor DequantizeLinear and whose output reaches a
    QuantizeLinear (through Relu/Clip at most) gets its weights quantized **symmetric per tensor** at load, so a
    layer kept float for fidelity runs with coarser weights than the int8 ones (on EfficientNet-Lite0 one
    depthwise layer left float cost 10 points of agreement). The transformer only takes a per-tensor input
    DequantizeLinear: each such layer gets its own DequantizeLinear of the same values with per-channel
    parameters (the same scale and zero point repeated over the input channels, axis 1), which dequantizes
    exactly alike and leaves the layer float in any onnxruntime session."""
    import onnx
    from onnx import helper, numpy_helper

    if not nodes:
        return []
    model = onnx.load(str(qdq))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    pinned: list[str] = []
    added: list[Any] = []
    for node in model.graph.node:
        if node.name not in nodes or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        w = inits.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or w is None or dq.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size != 1:
            continue
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = int(w.dims[1]) * int(group)
        else:  # Gemm: input (N, K); weight (K, M), or (M, K) with transB
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            channels = int(w.dims[1] if trans_b else w.dims[0])
        tag = f"{node.name}_keiryo_float_input"
        model.graph.initializer.append(numpy_helper.from_array(np.full(channels, scale.reshape(()), scale.dtype), f"{tag}_scale"))
        inputs = [dq.input[0], f"{tag}_scale"]
        if zp is not None:
            model.graph.initializer.append(
                numpy_helper.from_array(np.full(channels, zp.reshape(()), zp.dtype), f"{tag}_zero_point")
            )
            inputs.append(f"{tag}_zero_point")
        added.append(helper.make_node("DequantizeLinear", inputs, [tag], name=f"{tag}_DequantizeLinear", axis=1))
        node.input[0] = tag
        pinned.append(node.name)
    if pinned:
        model.graph.node.extend(added)
        from keiryo.export.onnx import toposort

        toposort(model)
        onnx.save(model, str(qdq))
    return pinned


def float_only_nodes(src: Path) -> list[str]:
    """Nodes kept in float whatever the config: ``InstanceNormalization`` (how GroupNorm exports, the DP-SGD form
    of BatchNorm). onnxruntime's CPU provider has no int8 kernel for it, so quantizing it only adds Q/DQ pairs, and
    onnxruntime's QDQ quantizer fails on models with several of them ("Quantization parameter shared mode is not
    supported for weight yet", or with the neighbouring Reshapes excluded, a graph that does not load)."""
    return [n.name for n in _graph(src).node if n.op_type == "InstanceNormalization" and n.name]


def widest(
    src: Path, cache: Path, x: dict[str, np.ndarray], cfg: Int8StaticConfig, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The 16-bit overrides of the ``cfg.wide_activations`` most sensitive activations (ranking cached beside ``cache``)."""
    import json

    from keiryo.passes.quantize_precision import _ranges, activation_sensitivity, wide_overrides

    ranking_file = cache.with_suffix(".sensitivity.json")
    if ranking_file.is_file():
        ranking = json.loads(ranking_file.read_text())
    else:
        ranking = activation_sensitivity(src, _ranges(cache), x, signed=cfg.activation_type == "int8")
        ranking_file.write_text(json.dumps(ranking))
    if cfg.float_outputs:  # those stay float anyway: widening them would waste a slot
        import onnx

        outs = {o.name for o in onnx.load(str(src), load_external_data=False).graph.output}
        ranking = [r for r in ranking if r[0] not in outs]
    chosen = [name for name, _ in ranking[: cfg.wide_activations]]
    if report is not None:
        report["wide_activations"] = chosen
    return wide_overrides(src, chosen)


def run_quantize_static(
    src: Path,
    out: Path,
    reader: Any,
    method: Any,
    cfg: Int8StaticConfig,
    exclude: list[str] | None,
    include: list[str] | None,
    extra: dict[str, Any],
    cache: Path | None,
) -> None:
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(
        str(src),
        str(out),
        reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=cfg.per_channel,
        activation_type=_qtype(cfg.activation_type),
        weight_type=_qtype(cfg.weight_type),
        calibrate_method=method,
        nodes_to_exclude=(list(cfg.exclude_nodes) + list(exclude or [])) or None,
        nodes_to_quantize=include,
        op_types_to_quantize=cfg.op_types,
        extra_options=extra,
        calibration_cache_path=cache,
    )


def rounded_weights(
    src: Path,
    x: dict[str, np.ndarray],
    cfg: Int8StaticConfig,
    workdir: Path,
    cache: Path | None,
    per_channel: dict[str, bool] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``src`` with weights on the int8 grid (GPTQ and/or bias correction) and the overrides pinning their scales;
    ``per_channel``: the grid of each weight where chosen per layer (else ``cfg.per_channel``).

    With a calibration ``cache`` (the per-layer fallback quantizes many times), the rounded file is kept beside it.
    """
    import json

    from keiryo.passes.quantize_rounding import overrides_from_json, overrides_to_json, round_weights

    keep = cache.with_suffix(".rounded.onnx") if cache is not None else None
    if keep is not None and keep.is_file() and keep.with_suffix(".json").is_file():
        return keep, overrides_from_json(json.loads(keep.with_suffix(".json").read_text()))
    dst = keep or workdir / "rounded.onnx"
    rows = min(cfg.rounding_samples, len(next(iter(x.values()))))
    overrides, _ = round_weights(
        src,
        dst,
        {k: v[:rows] for k, v in x.items()},
        rounding="gptq" if cfg.rounding == "refit" else cfg.rounding,
        bias_correction=cfg.bias_correction,
        per_channel=cfg.per_channel if per_channel is None else per_channel,
        nodes=None,
    )
    if keep is not None:
        keep.with_suffix(".json").write_text(json.dumps(overrides_to_json(overrides)))
    return dst, overrides


def entropy_ranges(src: Path, reader: Any, cfg: Int8StaticConfig, cache: Path, workdir: Path) -> Path:
    """Activation ranges by KL-divergence (TensorRT-style) over ``cfg.entropy_bins`` histogram bins, saved as an
    onnxruntime calibration cache that ``quantize_static`` then reads."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cal = create_calibrator(
        src,
        cfg.op_types or [],
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": cfg.entropy_bins, "num_quantized_bins": 128},
    )
    cal.collect_data(reader)
    save_tensors_data(cal.compute_data(), cache)
    return cache


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's quant_pre_process: shape inference and graph fusion before quantization."""
    from onnxruntime.quantization import quant_pre_process

    with quiet():
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception as e:
            raise PassError(f"onnxruntime pre-processing failed on {src.name}: {e}") from e
    return dst


def calibration_data(ctx: PassContext, cfg: Int8StaticConfig, what: str) -> dict[str, np.ndarray]:
    """The calibration split's named inputs (every input the model takes), up to ``cfg.calib_samples`` rows."""
    if ctx.data is None:
        raise DataError(f"{what} needs calibration data; pass --data")
    x = ctx.data.calib.numpy()
    return {k: v[: cfg.calib_samples] for k, v in x.items()} if cfg.calib_samples else x


@register_pass("quantize.int8_static", Int8StaticConfig, stage="onnx", summary="int8 static PTQ (QDQ, per-channel, calibrated)")
def int8_static(model: Artifact, cfg: Int8StaticConfig, ctx: PassContext) -> PassResult:
    x = calibration_data(ctx, cfg, "quantize.int8_static")
    out = ctx.out_path("int8_static", ".onnx")
    chosen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as td:
        src = preprocess(model.path, Path(td) / "pre.onnx") if cfg.preprocess else model.path
        exclude = None
        if cfg.smooth_alpha is not None:
            src, exclude = _smoothed(src, Path(td) / "smooth.onnx", x, cfg.smooth_alpha, cfg.smooth_min_ratio, chosen)
        cache: Path | None = None
        free: list[str] = []
        if cfg.float_when_free:  # the timing trials and the file itself share one calibration and rounding
            from keiryo.passes.quantize_fallback import free_float_layers

            cache = Path(td) / "ranges.json"
            free, chosen["float_when_free"] = free_float_layers(src, x, cfg, cache, Path(td), ctx.threads, exclude)
        quantize_int8_static(src, out, x, cfg, exclude=[*(exclude or []), *free], cache=cache, report=chosen)
        if exclude:
            from keiryo.passes.quantize_smooth import float_inputs

            chosen["smooth_float_inputs"] = float_inputs(out, exclude)
    info = {
        "calibration": cfg.calibration,
        "calib_samples": int(len(next(iter(x.values())))),
        "per_channel": cfg.per_channel,
        "activation_type": cfg.activation_type,
        "weight_type": cfg.weight_type,
        "excluded_nodes": list(cfg.exclude_nodes),
        "rounding": cfg.rounding,
        "bias_correction": cfg.bias_correction,
        **chosen,
    }
    return finish(model, out, info)


def _smoothed(
    src: Path, dst: Path, x: dict[str, np.ndarray], alpha: float, min_ratio: float, info: dict[str, Any]
) -> tuple[Path, list[str]]:
    """``src`` smoothed into ``dst`` (quantize_smooth); the nodes that stay float (inserted ``Mul`` nodes and those
    whose constants absorbed the smoothing)."""
    from keiryo.passes.quantize_smooth import smooth_matmuls

    rep = smooth_matmuls(src, dst, x, alpha, min_ratio=min_ratio)
    info.update(rep.as_info())
    return dst, rep.float_nodes


@register_pass(
    "quantize.int8_dynamic", Int8DynamicConfig, stage="onnx", summary="int8 dynamic PTQ (weights int8, activations at run time)"
)
def int8_dynamic(model: Artifact, cfg: Int8DynamicConfig, ctx: PassContext) -> PassResult:
    from onnxruntime.quantization import quantize_dynamic

    out = ctx.out_path("int8_dynamic", ".onnx")
    info: dict[str, Any] = {"op_types": list(cfg.op_types), "per_channel": cfg.per_channel}
    with tempfile.TemporaryDirectory() as td:
        src, exclude = model.path, list(cfg.exclude_nodes)
        if cfg.smooth_alpha is not None:
            x = ctx.require_data("quantize.int8_dynamic with smooth_alpha").calib.numpy()
            x = {k: v[: cfg.calib_samples] for k, v in x.items()}
            src, muls = _smoothed(src, Path(td) / "smooth.onnx", x, cfg.smooth_alpha, cfg.smooth_min_ratio, info)
            exclude += muls
        with quiet():
            try:
                quantize_dynamic(
                    str(src),
                    str(out),
                    per_channel=cfg.per_channel,
                    weight_type=_qtype(cfg.weight_type),
                    op_types_to_quantize=cfg.op_types,
                    nodes_to_exclude=exclude or None,
                )
            except Exception as e:
                out.unlink(missing_ok=True)
                raise PassError(
                    f"quantize.int8_dynamic failed on {model.path.name}: {type(e).__name__}: {first_line(e, 300)}"
                ) from e
    census = _node_census(out)
    quantized = sum(
        v
        for k, v in census.items()
        if k in {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QAttention", "DynamicQuantizeLSTM", "DequantizeLinear"}
    )
    if quantized == 0:
        info["warning"] = f"no node of types {cfg.op_types} was quantized; the model is unchanged apart from metadata"
    return finish(model, out, info)


@register_pass("quantize.fp16", Fp16Config, stage="onnx", summary="fp16 weights and compute (fp32 I/O)")
def fp16(model: Artifact, cfg: Fp16Config, ctx: PassContext) -> PassResult:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from keiryo.export.onnx import save_onnx, toposort

    out = ctx.out_path("fp16", ".onnx")
    with quiet():
        try:
            m16 = convert_float_to_float16(
                onnx.load(str(model.path)), keep_io_types=cfg.keep_io_types, op_block_list=cfg.op_block_list or None
            )
        except Exception as e:
            raise PassError(f"quantize.fp16 failed on {model.path.name}: {type(e).__name__}: {first_line(e, 300)}") from e
    toposort(m16)
    save_onnx(m16, out)
    return finish(model, out, {"keep_io_types": cfg.keep_io_types, "op_block_list": list(cfg.op_block_list)})
