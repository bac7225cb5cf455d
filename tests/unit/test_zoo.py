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
    "sensor": [(3, 64), (1, 16)],
    "text_encoder": [(16,), (8,)],
}
SMALL = {
    "mobilenetv2": {"width": 0.25, "last_channel": 64},
    "resnet": {"depth": 8, "width": 8},
    "mlp": {},
    "conv1d": {},
    "transformer": {"dim": 16, "heads": 2, "layers": 1, "ffn": 32},
    "sensor": {"width": 8, "blocks": 2},
    "text_encoder": {"vocab": 50, "dim": 16, "heads": 2, "layers": 1, "ffn": 32},
}


def example(name, shape, batch=2):
    """Positional inputs for zoo model ``name``: token ids + mask for the text encoder, floats otherwise."""
    if name == "text_encoder":
        ids = torch.randint(1, 50, (batch, *shape), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(batch, *shape, dtype=torch.int64)
        mask[0, shape[0] // 2 :] = 0  # one padded sequence
        return ids, mask
    return (torch.randn(batch, *shape),)


@pytest.mark.parametrize("name", ZOO.names())
def test_every_zoo_model_builds_for_its_shapes_and_classes(name):
    assert name in SHAPES, f"add shapes for new zoo model {name}"
    for shape in SHAPES[name]:
        m = build(name, shape, 7, SMALL[name]).eval()
        with torch.no_grad():
            out = m(*example(name, shape))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["sensor", "text_encoder"])
def test_models_that_need_no_output_count_build_without_one(name):
    shape = SHAPES[name][0]
    m = build(name, shape, None, SMALL[name]).eval()
    with torch.no_grad():
        out = m(*example(name, shape))
    # the sensor regressor gives one value per sample; the text encoder its pooled embedding
    assert out.shape == ((2,) if name == "sensor" else (2, SMALL[name]["dim"]))
    assert torch.isfinite(out).all()


def test_text_encoder_ignores_padded_tokens():
    m = build("text_encoder", (16,), 3, SMALL["text_encoder"]).eval()
    ids, mask = example("text_encoder", (16,))
    other = ids.clone()
    other[0, 8:] = 7  # change only the padding of sequence 0
    with torch.no_grad():
        a, b = m(ids, mask), m(other, mask)
    assert torch.allclose(a, b, atol=1e-5)
    other[0, 3] = ids[0, 3] % 49 + 1  # a real token (a different id) does matter
    with torch.no_grad():
        assert not torch.allclose(m(other, mask)[0], a[0])


def test_classifiers_need_an_output_count_and_the_text_encoder_its_max_len():
    with pytest.raises(ConfigError, match="zoo:mlp needs the number of outputs"):
        build("mlp", (20,), None)
    with pytest.raises(ConfigError, match="must be >= 1, got 0"):
        build("sensor", (3, 64), 0)
    with pytest.raises(ConfigError, match="sequences of 200 tokens exceed max_len=128"):
        build("text_encoder", (200,), 2)


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
