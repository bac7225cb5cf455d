"""PyTorch -> ONNX through ``torch.onnx.export`` (the dynamo exporter), with the model's IOSpec.

Every input and output keeps its name; the batch axis is dynamic, and so is the sequence
axis of token inputs (integer inputs of shape (batch, seq)) when the model allows it: if
``torch.export`` cannot keep ``seq`` dynamic, the export is retried at the data's sequence
length and the fixed axis is recorded in the artifact's info.

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


class OnnxExportConfig(KeiryoConfig):
    opset: int = Field(18, ge=13, le=23)
    dynamic_batch: bool = True
    dynamic_seq: bool = Field(True, description="keep the seq axis of token inputs dynamic when the model allows it")


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


def dynamic_shapes(handle: Any, batch: bool, seq: bool) -> tuple[Any, dict[str, dict[int, str]]]:
    """torch.export dynamic_shapes (one entry per input, in the IOSpec's order) and the named axes per input."""
    import torch

    axes: dict[str, dict[int, str]] = {}
    for t in handle.io.inputs:
        a: dict[int, str] = {}
        if batch:
            a[0] = "batch"
        if seq and len(t.shape) == 2 and t.dtype in ("int64", "int32"):
            a[1] = "seq"
        axes[t.name] = a
    if not any(axes.values()):
        return None, axes
    dims: dict[str, Any] = {"batch": torch.export.Dim("batch", min=1, max=4096)}
    seq_len = max((int(t.shape[1]) for t in handle.io.inputs if 1 in axes[t.name]), default=0)
    if seq_len:
        dims["seq"] = torch.export.Dim("seq", min=2, max=max(seq_len, 2))
    per_input = tuple({i: dims[name] for i, name in axes[t.name].items()} or None for t in handle.io.inputs)
    return (per_input,), axes  # one entry: the *inputs varargs of flat_module


def flat_module(handle: Any) -> Any:
    """The model as ``forward(*inputs) -> tuple of outputs`` in the IOSpec's order (dict outputs flattened),
    so every exporter sees one calling convention and names tensors from the IOSpec alone."""
    import torch

    from keiryo.model.io import call_module, flatten_outputs

    names = list(handle.io.input_names)

    class Flat(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outs, _ = flatten_outputs(call_module(self.inner, dict(zip(names, inputs, strict=True)), names))
            return tuple(outs)

    return Flat(handle.module).eval()


def rename_values(model: Any, mapping: dict[str, str]) -> None:
    """Rename graph values (inputs, outputs, node I/O) in place; a value that already holds a wanted name
    (the exporter names values after their op, e.g. ``embedding``) is moved aside first."""
    g = model.graph
    used = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    full = dict(mapping)
    for new in mapping.values():
        if new in used and new not in mapping:
            k = 1
            while f"{new}__{k}" in used:
                k += 1
            full[new] = f"{new}__{k}"

    def r(name: str) -> str:
        return full.get(name, name)

    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = r(v.name)
    for init in g.initializer:
        init.name = r(init.name)
    for n in g.node:
        n.input[:] = [r(x) for x in n.input]
        n.output[:] = [r(x) for x in n.output]


def _torch_export(handle: Any, tmp: Path, cfg: OnnxExportConfig, seq: bool) -> dict[str, dict[int, str]]:
    import torch

    from keiryo._quiet import quiet

    ex = handle.example_inputs(2)
    for t in handle.io.inputs:  # token ids of 1 are valid for any vocabulary; masks of 1 keep every token
        if t.dtype in ("int64", "int32"):
            ex[t.name] = torch.ones_like(ex[t.name])
    dyn, axes = dynamic_shapes(handle, cfg.dynamic_batch, seq)
    with quiet("torch.onnx"):
        torch.onnx.export(
            flat_module(handle),
            tuple(ex[n] for n in handle.io.input_names),
            str(tmp),
            dynamo=True,
            external_data=False,
            opset_version=cfg.opset,
            dynamic_shapes=dyn,
            verbose=False,
        )
    return axes


@register_exporter("onnx", runtime="onnxruntime", suffix=".onnx", config=OnnxExportConfig)
@register_exporter("web", runtime="web", suffix=".onnx", config=OnnxExportConfig, format="onnx")  # onnxruntime-web
def export_onnx(handle: Any, out_path: Path, cfg: OnnxExportConfig) -> Artifact:
    import onnx

    info: dict[str, Any] = {"opset": cfg.opset}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / "model.onnx"
        wants_seq = cfg.dynamic_seq and any(len(t.shape) == 2 and t.dtype in ("int64", "int32") for t in handle.io.inputs)
        try:
            try:
                axes = _torch_export(handle, tmp, cfg, wants_seq)
            except Exception as first:
                if not wants_seq:
                    raise
                axes = _torch_export(handle, tmp, cfg, False)
                info["fixed_axes"] = {"seq": int(handle.io.inputs[0].shape[1]), "why": first_line(first, 200)}
        except Exception as e:
            ex = handle.example_inputs(2)
            raise conversion_error(e, handle.spec.source, "torch.onnx", "register an ONNX translation", handle.module, ex) from e
        model = onnx.load(str(tmp))
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if len(got_in) != len(handle.io.inputs) or len(got_out) != len(handle.io.outputs):
        raise ExportError(
            f"{handle.spec.source}: the ONNX graph has {len(got_in)} input(s) and {len(got_out)} output(s); expected "
            f"{handle.io.input_names} -> {handle.io.output_names} (an input the model ignores is dropped by the exporter)"
        )
    rename_values(
        model,
        {**dict(zip(got_in, handle.io.input_names, strict=True)), **dict(zip(got_out, handle.io.output_names, strict=True))},
    )
    strip_metadata(model)
    model.producer_name = "keiryo"
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{handle.spec.source}: exported ONNX graph is invalid: {first_line(e)}") from e
    save_onnx(model, out_path)
    info["op_types"] = sorted({n.op_type for n in model.graph.node})
    info["dynamic_axes"] = {k: {str(i): n for i, n in a.items()} for k, a in axes.items()}
    return Artifact(out_path, "onnx", "onnxruntime", handle.io.input_names, handle.io.output_names, info)
