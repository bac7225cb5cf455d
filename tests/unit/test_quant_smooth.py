"""SmoothQuant-style activation smoothing (keiryo.passes.quantize_smooth) and the int8 passes' smooth_alpha option."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from keiryo.errors import ConfigError, DataError, PassError
from keiryo.export import export
from keiryo.model import load_model
from keiryo.passes import PassContext, apply
from keiryo.passes.quantize_ort import Int8DynamicConfig, Int8StaticConfig
from keiryo.passes.quantize_smooth import smooth_matmuls
from keiryo.runtime import open_session


class OutlierEncoder(nn.Module):
    """A post-LN transformer FFN block over 8 tokens of 8 pixels. Two LayerNorm channels are 40x the others (as in
    BERT): that LayerNorm's output feeds the FFN's first MatMul and the residual Add; a GELU feeds the second
    MatMul; a last LayerNorm feeds only the head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.ffn1 = nn.Linear(32, 64)
        self.ffn2 = nn.Linear(64, 32)
        self.ln2 = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            for m in (self.inp, self.ffn1, self.ffn2, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
            self.ln.weight[:2] = 40.0
            self.ln2.weight[5] = 30.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.flatten(1).reshape(-1, 8, 8)
        h = self.ln(self.inp(x))
        h = h + self.ffn2(F.gelu(self.ffn1(h)))
        return self.head(self.ln2(h)).mean(1)


@pytest.fixture(scope="module")
def encoder(digits, tmp_path_factory):
    h = load_model(f"{__file__}:OutlierEncoder", digits, output_name="logits")
    return export(h, "onnx", tmp_path_factory.mktemp("smooth") / "fp32.onnx")


def run(path, x):
    with open_session("onnxruntime", path) as s:
        return s.run(x)[0]


def test_smoothing_is_exact_in_float_and_folds_where_the_producer_is_private(encoder, digits, tmp_path):
    x = digits.calib.numpy()
    rep = smooth_matmuls(encoder.path, tmp_path / "s.onnx", x, 0.7)
    # 4 MatMuls: the input projection (after a Reshape: Mul inserted), the FFN's first (LayerNorm shared with the
    # residual: Mul inserted), the FFN's second (folded into the GELU's constant), the head (folded into ln2)
    assert len(rep.matmuls) == 4 and len(rep.folded_into) == 2 and len(rep.mul_nodes) == 2
    assert rep.max_activation_ratio > 10
    g = onnx.load(str(tmp_path / "s.onnx")).graph
    assert sum(n.op_type == "Mul" and n.name in rep.mul_nodes for n in g.node) == 2
    t = digits.test.numpy()
    assert np.allclose(run(tmp_path / "s.onnx", t), run(encoder.path, t), rtol=1e-4, atol=1e-4)
    # min_ratio leaves activations without outlier channels alone
    rep = smooth_matmuls(encoder.path, tmp_path / "m.onnx", x, 0.7, min_ratio=8.0)
    assert rep.skipped and len(rep.matmuls) + len(rep.skipped) == 4


def test_smoothing_cuts_the_dynamic_int8_error_on_outlier_channels(encoder, digits, tmp_path):
    ctx = PassContext(data=digits, workdir=tmp_path)
    plain = apply(encoder, Int8DynamicConfig(), ctx)
    ctx = PassContext(data=digits, workdir=tmp_path / "s")
    smooth = apply(encoder, Int8DynamicConfig(smooth_alpha=0.7, smooth_min_ratio=1.0), ctx)
    assert smooth.info["smoothed_matmuls"] == 4 and smooth.info["smooth_alpha"] == 0.7
    census = smooth.info["op_census"]
    assert census.get("MatMulInteger", 0) + census.get("DynamicQuantizeMatMul", 0) == 4  # all four still int8
    t = digits.test.numpy()
    ref = run(encoder.path, t)
    err = {k: float(np.abs(run(r.model.path, t) - ref).mean()) for k, r in (("plain", plain), ("smooth", smooth))}
    assert err["smooth"] < 0.5 * err["plain"], err


def test_static_int8_with_smoothing_keeps_the_inserted_muls_float(encoder, digits, tmp_path):
    res = apply(encoder, Int8StaticConfig(smooth_alpha=0.7, smooth_min_ratio=1.0), PassContext(data=digits, workdir=tmp_path))
    assert res.info["smooth_muls"] == 2 and res.info["smooth_float_inputs"] >= 2
    g = onnx.load(str(res.model.path)).graph
    producer = {o: n for n in g.node for o in n.output}
    muls = [n for n in g.node if n.name.startswith("smooth_mul/")]
    assert len(muls) == 2
    for m in muls:  # the Mul reads the float activation, not a DequantizeLinear of it
        assert producer[m.input[0]].op_type != "DequantizeLinear"
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) >= 4
    plain = apply(encoder, Int8StaticConfig(), PassContext(data=digits, workdir=tmp_path / "plain"))
    t = digits.test.numpy()
    ref = run(encoder.path, t)
    err = {k: float(np.abs(run(r.model.path, t) - ref).mean()) for k, r in (("plain", plain), ("smooth", res))}
    assert err["smooth"] < 0.5 * err["plain"], err


def test_smoothing_options_are_checked(encoder, tmp_path):
    with pytest.raises(ConfigError):
        Int8DynamicConfig.parse({"smooth_alpha": 1.5})
    with pytest.raises(DataError):
        apply(encoder, Int8DynamicConfig(smooth_alpha=0.5), PassContext(workdir=tmp_path))
    with pytest.raises(PassError):
        smooth_matmuls(encoder.path, tmp_path / "x.onnx", {"image": np.zeros((1, 1, 8, 8), np.float32)}, 2.0)
