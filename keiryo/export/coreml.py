"""PyTorch -> Core ML (ML program, ``.mlpackage``) through ``coremltools``.

Core ML runs models only on Apple platforms. On Linux keiryo proves what it can without
running the model (:func:`validate_mlpackage`): the package loads, the input and output names,
shapes and dtypes are the expected ones, the op types are listed, and the weight compression
a variant promises (palette, int8, sparse ops) is present in the program. Prediction parity
runs on macOS (the ``coreml`` runtime) and is reported as skipped, with that reason, elsewhere.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import BackendUnavailableError, ExportError, InputFileError, first_line
from keiryo.export import Artifact, register_exporter
from keiryo.export._failures import conversion_error
from keiryo.model.io import call_args
from keiryo.runtime.coreml import CAN_PREDICT

# Program ops that carry compressed weights, by the compression they prove.
COMPRESSION_OPS = {
    "palettized": ("constexpr_lut_to_dense",),
    "int8": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "sparse": ("constexpr_sparse_to_dense", "constexpr_sparse_blockwise_shift_scale"),
}


class CoremlExportConfig(KeiryoConfig):
    precision: Literal["fp32", "fp16"] = Field("fp32", description="compute precision; fp16 also halves the weights")
    deployment_target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] = "iOS17"


def coremltools() -> Any:
    from keiryo._quiet import quiet, silence_native_output

    try:
        with quiet("coremltools"), silence_native_output():  # it prints which native proxies it lacks on Linux
            import coremltools as ct
    except ImportError as e:
        raise BackendUnavailableError("Core ML export (coremltools)", "coreml") from e
    return ct


def weights_bytes(path: Path) -> int:
    """Bytes of the package's weight blobs (``Data/com.apple.CoreML/weights``)."""
    return sum(f.stat().st_size for f in path.rglob("weights/*") if f.is_file())


def op_census(spec: Any) -> dict[str, int]:
    c: Counter[str] = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                c[op.type] += 1
    return dict(c)


_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8"}


def _features(feats: Any) -> list[dict[str, Any]]:
    out = []
    for f in feats:
        arr = f.type.multiArrayType
        out.append({"name": f.name, "shape": [int(s) for s in arr.shape], "dtype": _DTYPES.get(arr.dataType, str(arr.dataType))})
    return out


def validate_mlpackage(
    path: str | Path,
    *,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """Structural validation of an .mlpackage (works on Linux); raises :class:`ExportError` on a mismatch.

    ``inputs``/``outputs`` are the expected ``[{name, shape, dtype}]``; ``compression`` is a
    key of :data:`COMPRESSION_OPS` whose ops must be present.
    """
    ct = coremltools()
    p = Path(path)
    if not (p / "Manifest.json").is_file():
        raise InputFileError(f"{p}: not a Core ML package (no Manifest.json)")
    try:
        spec = ct.models.MLModel(str(p), skip_model_load=True).get_spec()
    except Exception as e:
        raise InputFileError(f"{p}: coremltools cannot load this package ({first_line(e, 300)})") from e
    if not spec.HasField("mlProgram"):
        raise ExportError(f"{p}: expected an ML program, got a {spec.WhichOneof('Type')} model")
    got_in, got_out = _features(spec.description.input), _features(spec.description.output)
    for what, want, got in (("inputs", inputs, got_in), ("outputs", outputs, got_out)):
        if want is not None and want != got:
            raise ExportError(f"{p}: {what} are {got}, expected {want}")
    census = op_census(spec)
    found = {kind: sum(census.get(o, 0) for o in ops) for kind, ops in COMPRESSION_OPS.items()}
    if compression is not None and not found[compression]:
        raise ExportError(f"{p}: expected {compression} weights ({'/'.join(COMPRESSION_OPS[compression])} ops), found none")
    return {
        "inputs": got_in,
        "outputs": got_out,
        "op_types": sorted(census),
        "op_census": census,
        "compressed_weight_ops": {k: v for k, v in found.items() if v},
        "weights_bytes": weights_bytes(p),
        "spec_version": int(spec.specificationVersion),
        "validated": "structure" if not CAN_PREDICT else "structure+predict",
    }


def save_package(model: Any, out_path: Path) -> None:
    """Save an MLModel to ``out_path`` atomically (a package is a directory: built aside, then renamed)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        pkg = tmp / out_path.name
        model.save(str(pkg))
        if out_path.exists():
            shutil.rmtree(out_path)
        pkg.rename(out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@register_exporter("coreml", runtime="coreml", suffix=".mlpackage", config=CoremlExportConfig)
def export_coreml(handle: Any, out_path: Path, cfg: CoremlExportConfig) -> Artifact:
    ct = coremltools()
    import numpy as np
    import torch

    from keiryo._quiet import quiet, silence_native_output

    module = handle.module.eval()
    ex = handle.example_inputs(1)
    palettes = handle.metadata.get("compression", {}).get("palettes", {})
    pipeline = ct.PassPipeline.DEFAULT
    if palettes:
        # Folding batch norm into a conv rescales each output channel and scatters the cluster
        # pass's shared values; keep batch norm separate so the weights stay on their centroids.
        pipeline = ct.PassPipeline()
        pipeline.remove_passes(["common::fuse_conv_batchnorm"])
    try:
        with quiet("coremltools"), silence_native_output(), torch.no_grad():
            args, kwargs = call_args(module, ex, handle.io.input_names)
            program = torch.export.export(module, args, kwargs or None).run_decompositions({})
            ml = ct.convert(
                program,
                inputs=[
                    ct.TensorType(name=t.name, shape=tuple(ex[t.name].shape), dtype=np.dtype(_coreml_dtype(t.dtype)))
                    for t in handle.io.inputs
                ],
                outputs=[ct.TensorType(name=t.name, dtype=np.float32) for t in handle.io.outputs],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32,
                minimum_deployment_target=getattr(ct.target, cfg.deployment_target),
                pass_pipeline=pipeline,
            )
    except Exception as e:
        raise conversion_error(e, handle.spec.source, "coremltools", "register a MIL op translation", module, ex) from e
    save_package(ml, out_path)
    dtype = "float32"  # fp16 compute keeps fp32 inputs and outputs
    try:
        info = validate_mlpackage(
            out_path,
            inputs=[{"name": t.name, "shape": list(ex[t.name].shape), "dtype": _coreml_dtype(t.dtype)} for t in handle.io.inputs],
            outputs=[{"name": t.name, "shape": list(t.concrete(1)), "dtype": dtype} for t in handle.io.outputs],
        )
    except Exception:
        shutil.rmtree(out_path, ignore_errors=True)
        raise
    info["precision"] = cfg.precision
    if palettes:  # the clustering pass's centroids: coreml.palettize stores exactly these
        info["clustered"] = {name: int(len(c)) for name, c in palettes.items()}
    info["fixed_shapes"] = {t.name: list(ex[t.name].shape) for t in handle.io.inputs}
    return Artifact(out_path, "coreml", "coreml", handle.io.input_names, handle.io.output_names, info)


def _coreml_dtype(dtype: str) -> str:
    """Core ML takes float32/float16/int32 inputs: int64 token ids travel as int32."""
    return {"int64": "int32", "float64": "float32", "bool": "int32", "uint8": "int32", "int8": "int32"}.get(dtype, dtype)
