"""PyTorch -> ONNX through ``torch.onnx.export`` (the dynamo exporter), batch dimension dynamic.

The exporter's per-node stack-trace metadata is stripped (it is ~200 KB of
source paths on a small CNN and would distort size figures); the graph is
checked with ``onnx.checker`` and written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ExportError, InputFileError, first_line
from keiryo.export import Artifact, register_exporter
from keiryo.export._failures import conversion_error

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class OnnxExportConfig(KeiryoConfig):
    opset: int = Field(18, ge=13, le=23)
    dynamic_batch: bool = True


def strip_metadata(model: Any) -> None:
    """Drop per-node metadata (stack traces) and doc strings; they are not part of the computation."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def toposort(model: Any) -> None:
    """Sort graph nodes topologically in place (some converters append nodes out of order)."""
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            names = ", ".join(n.name or n.op_type for n in rest[:5])
            raise ExportError(f"ONNX graph has a cycle or dangling inputs at nodes: {names}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def load_onnx(path: str | Path) -> Any:
    """Load and check an ONNX file; a corrupt file is an :class:`InputFileError`."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: ONNX file not found")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as e:
        msg = first_line(e)
        raise InputFileError(f"{p}: not a valid ONNX model ({msg[:300]})") from e
    return model


def save_onnx(model: Any, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@register_exporter("onnx", runtime="onnxruntime", suffix=".onnx", config=OnnxExportConfig)
def export_onnx(handle: Any, out_path: Path, cfg: OnnxExportConfig) -> Artifact:
    import inspect

    import onnx
    import torch

    from keiryo._quiet import quiet

    module = handle.module.eval()
    x = handle.example_input(2)
    dyn = None
    if cfg.dynamic_batch:  # torch.export keys dynamic shapes by forward()'s first parameter name
        first = next(iter(inspect.signature(module.forward).parameters), "x")
        dyn = {first: {0: torch.export.Dim("batch", min=1, max=4096)}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / "model.onnx"
        try:
            with quiet("torch.onnx"):
                torch.onnx.export(
                    module,
                    (x,),
                    str(tmp),
                    dynamo=True,
                    external_data=False,
                    opset_version=cfg.opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=dyn,
                    verbose=False,
                )
        except Exception as e:
            raise conversion_error(e, handle.spec.source, "torch.onnx", "register an ONNX translation", module, x) from e
        model = onnx.load(str(tmp))
    strip_metadata(model)
    model.producer_name = "keiryo"
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{handle.spec.source}: exported ONNX graph is invalid: {first_line(e)}") from e
    save_onnx(model, out_path)
    ops = sorted({n.op_type for n in model.graph.node})
    return Artifact(out_path, "onnx", "onnxruntime", [INPUT_NAME], [OUTPUT_NAME], {"opset": cfg.opset, "op_types": ops})
