import pytest
import torch

from keiryo.errors import ConfigError
from keiryo.model.zoo import ZOO, build

SHAPES = {
    "mobilenetv2": [(1, 8, 8), (3, 32, 32)],
    "resnet": [(1, 8, 8), (3, 16, 16)],
    "mlp": [(1, 8, 8), (20,)],
    "conv1d": [(3, 64), (1, 16)],
    "transformer": [(1, 8, 8), (16, 6)],
}
SMALL = {
    "mobilenetv2": {"width": 0.25, "last_channel": 64},
    "resnet": {"depth": 8, "width": 8},
    "mlp": {},
    "conv1d": {},
    "transformer": {"dim": 16, "heads": 2, "layers": 1, "ffn": 32},
}


@pytest.mark.parametrize("name", ZOO.names())
def test_every_zoo_model_builds_for_its_shapes_and_classes(name):
    assert name in SHAPES, f"add shapes for new zoo model {name}"
    for shape in SHAPES[name]:
        m = build(name, shape, 7, SMALL[name]).eval()
        with torch.no_grad():
            out = m(torch.randn(2, *shape))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


def test_mobilenetv2_width_multiplier_shrinks_the_model_and_uses_depthwise_convs():
    full = build("mobilenetv2", (3, 32, 32), 10)
    slim = build("mobilenetv2", (3, 32, 32), 10, {"width": 0.5})
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(slim) < 0.5 * n(full)
    dw = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(dw) == 17  # one depthwise conv per inverted residual block
    assert all(m.out_channels % 8 == 0 for m in full.modules() if isinstance(m, torch.nn.Conv2d))


def test_resnet_depth_is_configurable_and_validated():
    d8 = build("resnet", (1, 8, 8), 10, {"depth": 8})
    d20 = build("resnet", (1, 8, 8), 10, {"depth": 20})
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(d20) > convs(d8)
    with pytest.raises(ConfigError, match="6n\\+2"):
        build("resnet", (1, 8, 8), 10, {"depth": 10})


def test_zoo_rejects_unknown_option_wrong_rank_and_unknown_name():
    with pytest.raises(ConfigError, match="unknown field 'wdth'"):
        build("mobilenetv2", (1, 8, 8), 10, {"wdth": 0.5})
    with pytest.raises(ConfigError, match="rank 2"):
        build("conv1d", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="unknown zoo model 'vgg'"):
        build("vgg", (1, 8, 8), 10)
