from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from keiryo.errors import InputFileError, ParityError, UnsupportedOpError
from keiryo.export import ParityConfig, check_parity, export
from keiryo.export.onnx import load_onnx
from keiryo.model import IOSpec, ModelHandle, ModelSpec, TensorSpec
from keiryo.runtime import open_session


def test_onnx_export_has_dynamic_batch_no_stack_traces_and_passes_parity(tiny_trained, digits, tmp_path):
    art = export(tiny_trained, "onnx", tmp_path / "m.onnx")
    m = onnx.load(str(art.path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [i.name for i in m.graph.input] == ["image"] and [o.name for o in m.graph.output] == ["logits"]
    assert art.input_names == ["image"] and art.output_names == ["logits"]
    assert all(len(n.metadata_props) == 0 for n in m.graph.node)
    with open_session("onnxruntime", art.path) as s:
        rep = check_parity(tiny_trained, s, digits.test, ParityConfig(), "test")
        assert s.run(digits.test[:5].numpy())[0].shape == (5, 10)
    assert rep.passed and rep.max_abs_diff < 1e-4 and rep.top1_agreement == 1.0
    assert rep.samples == min(256, len(digits.test)) and set(rep.outputs) == {"logits"}
    assert rep.outputs["logits"]["top1_agreement"] == 1.0
    assert not list(tmp_path.glob(".m.onnx.*"))  # no temp file left behind


def _as_input(handle):
    """The same model and weights, with its input named "input" (the name the fake session takes)."""
    io = IOSpec(inputs=[t.model_copy(update={"name": "input"}) for t in handle.io.inputs], outputs=handle.io.outputs)
    return replace(handle, io=io)


def test_parity_over_tolerance_is_an_error_unless_overridden(tiny_trained, digits):
    h = _as_input(tiny_trained)
    x = {"input": digits.test.numpy()["image"]}

    def noisy(x):
        return tiny_trained.module(torch.from_numpy(x)).detach().numpy() + np.float32(0.05)

    with open_session("fake", noisy) as s:
        with pytest.raises(ParityError, match=r"output 'logits' max abs diff 0.05 \(tolerance 0.001\), top-1 agreement 100.00%"):
            check_parity(h, s, x, ParityConfig(), "fake export")
        rep = check_parity(h, s, x, ParityConfig(enforce=False), "fake export")
    assert not rep.passed and abs(rep.max_abs_diff - 0.05) < 1e-3 and rep.top1_agreement == 1.0
    assert abs(rep.outputs["logits"]["mean_abs_diff"] - 0.05) < 1e-3


def test_parity_checks_top1_and_shapes_per_output(tiny_trained, digits):
    h = _as_input(tiny_trained)
    x = {"input": digits.test.numpy()["image"]}

    def flipped(x):  # every top-1 becomes the bottom-1, the values stay within a loose tolerance
        return -tiny_trained.module(torch.from_numpy(x)).detach().numpy()

    with open_session("fake", flipped) as s:
        rep = check_parity(h, s, x, ParityConfig(max_abs_diff=1e6, enforce=False), "fake export")
    assert not rep.passed and rep.top1_agreement == 0.0 and rep.max_abs_diff < 1e6
    with open_session("fake", lambda x: np.zeros((len(x), 3), np.float32)) as s:
        with pytest.raises(ParityError, match=r"output 'logits' has shape \(256, 3\), torch \(256, 10\)"):
            check_parity(h, s, x, ParityConfig(), "fake export")
    # outputs that are not (batch, classes) have no top-1: agreement is None and only the values count
    flat = replace(h, module=_RowSum())
    x = {"input": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)}
    with open_session("fake", lambda x: x.sum(1)) as s:
        rep = check_parity(flat, s, x, ParityConfig(), "row sums")
    assert rep.passed and rep.top1_agreement is None and rep.max_abs_diff < 1e-6 and rep.samples == 4


class _RowSum(nn.Module):
    def forward(self, x):
        return x.sum(1)


class _Histc(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x + torch.histc(x, bins=64).unsqueeze(0))


def test_unexportable_op_is_named(tmp_path):
    io = IOSpec(
        inputs=[TensorSpec(name="input", shape=["batch", 1, 8, 8])], outputs=[TensorSpec(name="output", shape=["batch", 10])]
    )
    h = ModelHandle(_Histc(), io, ModelSpec(source="histc-model"))
    with pytest.raises(UnsupportedOpError, match=r"histc-model: torch.onnx cannot export op aten.histc.default") as ei:
        export(h, "onnx", tmp_path / "h.onnx")
    assert ei.value.op == "aten.histc.default"
    assert not (tmp_path / "h.onnx").exists()


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"this is not protobuf")
    with pytest.raises(InputFileError, match="broken.onnx: not a valid ONNX model"):
        load_onnx(p)
