"""PyTorch -> TFLite (LiteRT) through ``litert-torch``; the file runs on the ``ai-edge-litert`` interpreter.

The model is exported at batch 1 (what an edge device runs) with a ``serving_default`` signature
whose input is named ``input`` and output ``logits``, the same names as the ONNX export, and
written atomically. Format-level variants (fp16 weights, dynamic-range int8, full-integer int8)
are the ``tflite.*`` passes in :mod:`keiryo.passes.quantize_tflite`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keiryo._atomic import write_atomic
from keiryo.config import KeiryoConfig
from keiryo.errors import BackendUnavailableError, ExportError
from keiryo.export import Artifact, register_exporter
from keiryo.export._failures import conversion_error


class TfliteExportConfig(KeiryoConfig):
    """No options yet. What TFLite fixes: batch 1 and every other axis at the data's size (the
    sequence length of token inputs included); input and output names and dtypes are kept."""


def _named(handle: Any) -> Any:
    import torch

    from keiryo.model.io import call_module, flatten_outputs

    class Named(torch.nn.Module):
        """Gives the signature the model's tensor names: forward(**inputs) -> {output name: tensor}."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            outs, _ = flatten_outputs(call_module(self.inner, inputs, handle.io.input_names))
            return dict(zip(handle.io.output_names, outs, strict=True))

    return Named(handle.module).eval()


def tflite_info(path: Path) -> dict[str, Any]:
    """Op census and input/output dtypes of a .tflite file, read by the interpreter."""
    from keiryo.runtime.litert import LiteRTSession, op_census

    s = LiteRTSession(path, 1)
    census = op_census(path)
    return {
        "op_types": sorted(census),
        "op_census": census,
        "input_dtypes": s.input_dtypes,
        "batch": s.batch,
    }


@register_exporter("tflite", runtime="litert", suffix=".tflite", config=TfliteExportConfig)
def export_tflite(handle: Any, out_path: Path, cfg: TfliteExportConfig) -> Artifact:
    from keiryo._quiet import quiet, silence_native_output

    try:
        with quiet("torch.utils._pytree", "torchao"), silence_native_output():  # torchao/TF print at import
            import litert_torch
    except ImportError as e:
        raise BackendUnavailableError("TFLite export (litert-torch)", "tflite") from e

    module = handle.module.eval()
    x = handle.example_inputs(1)
    try:
        with quiet("litert_torch", "absl", "torch._export", "torch.export"), silence_native_output():
            edge = litert_torch.convert(_named(handle), sample_kwargs=x)
            blob = edge.model_content()
    except Exception as e:
        raise conversion_error(e, handle.spec.source, "litert-torch", "register a lowering", module, x) from e
    if not blob:
        raise ExportError(f"{handle.spec.source}: litert-torch produced an empty model")
    write_atomic(out_path, bytes(blob))
    try:
        info = tflite_info(out_path)
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    info["fixed_shapes"] = {t.name: list(t.concrete(1)) for t in handle.io.inputs}
    return Artifact(out_path, "tflite", "litert", handle.io.input_names, handle.io.output_names, info)
