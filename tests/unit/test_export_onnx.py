import numpy as np
import onnx
import pytest
import torch
from torch import nn

from keiryo.errors import InputFileError, ParityError, UnsupportedOpError
from keiryo.export import ParityConfig, check_parity, export
from keiryo.export.onnx import load_onnx
from keiryo.model import ModelHandle, ModelSpec
from keiryo.runtime import open_session


def test_onnx_export_has_dynamic_batch_no_stack_traces_and_passes_parity(tiny_trained, digits, tmp_path):
    art = export(tiny_trained, "onnx", tmp_path / "m.onnx")
    m = onnx.load(str(art.path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert all(len(n.metadata_props) == 0 for n in m.graph.node)
    with open_session("onnxruntime", art.path) as s:
        rep = check_parity(tiny_trained.module, s, digits.test.x, ParityConfig(), "test")
        assert s.run(digits.test.x[:5].numpy())[0].shape == (5, 10)
    assert rep.passed and rep.max_abs_diff < 1e-4 and rep.top1_agreement == 1.0
    assert not list(tmp_path.glob(".m.onnx.*"))  # no temp file left behind


def test_parity_over_tolerance_is_an_error_unless_overridden(tiny_trained, digits):
    def noisy(x):
        return tiny_trained.module(torch.from_numpy(x)).detach().numpy() + np.float32(0.05)

    with open_session("fake", noisy) as s:
        with pytest.raises(ParityError, match=r"max abs diff 0.05 \(tolerance 0.001\), top-1 agreement 100.00%"):
            check_parity(tiny_trained.module, s, digits.test.x, ParityConfig(), "fake export")
        rep = check_parity(tiny_trained.module, s, digits.test.x, ParityConfig(enforce=False), "fake export")
    assert not rep.passed and abs(rep.max_abs_diff - 0.05) < 1e-3


class _Histc(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x + torch.histc(x, bins=64).unsqueeze(0))


def test_unexportable_op_is_named(tmp_path):
    h = ModelHandle(_Histc(), (1, 8, 8), 10, ModelSpec(source="histc-model"))
    with pytest.raises(UnsupportedOpError, match=r"histc-model: torch.onnx cannot export op aten.histc.default") as ei:
        export(h, "onnx", tmp_path / "h.onnx")
    assert ei.value.op == "aten.histc.default"
    assert not (tmp_path / "h.onnx").exists()


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"this is not protobuf")
    with pytest.raises(InputFileError, match="broken.onnx: not a valid ONNX model"):
        load_onnx(p)
