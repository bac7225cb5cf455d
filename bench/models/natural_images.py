"""Natural-image crops labelled by a pretrained model, as a keiryo data factory (``bench/models/natural_images.py:crops``).

The pictures are scikit-image's bundled samples (``skimage.data``: astronaut, chelsea, coffee, rocket, the
stereo motorcycle, hubble, retina, IHC, and the grey camera, coins, moon, brick, grass, gravel, page, text,
clock, cell; nothing is downloaded). Each sample is a random crop (10-100% of the shorter side, aspect 3:4 to
4:3), randomly flipped, rescaled to ``size`` x ``size``, normalized for the model. Crop ``i`` of a split is drawn
from its own generator (seed, split, i): the train, val and test crops are different crops, and the same call
gives the same crops in any process.

The label of a crop is the fp32 model's top-1 class, so a candidate's accuracy on these crops is its top-1
agreement with the fp32 model. Labels are computed once (batched) and cached under the system temp folder,
keyed by the model's weight file and the split sizes.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
import efficientnet_lite  # noqa: E402

COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
GREY = ("camera", "coins", "moon", "brick", "grass", "gravel", "page", "text", "clock", "cell")
SPLITS = {"train": 0, "val": 1, "test": 2}


@cache
def pictures() -> tuple[np.ndarray, ...]:
    """The bundled sample pictures as HxWx3 uint8 (grey ones repeated over three channels)."""
    from skimage import data

    out = [getattr(data, n)() for n in COLOUR]
    out += list(data.stereo_motorcycle()[:2])
    out += [np.repeat(getattr(data, n)()[..., None], 3, axis=2) for n in GREY]
    return tuple(np.ascontiguousarray(a[..., :3]) for a in out)


def crop(seed: int, split: str, i: int, size: int) -> np.ndarray:
    """Crop ``i`` of ``split`` as a float32 (3, size, size) array in [0, 1]."""
    from PIL import Image

    rng = np.random.default_rng([seed, SPLITS[split], i])
    pics = pictures()
    pic = pics[rng.integers(len(pics))]
    h, w = pic.shape[:2]
    side = min(h, w) * rng.uniform(0.1, 1.0) ** 0.5  # area fraction uniform in [0.1, 1]
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = int(min(h, side * aspect**0.5)), int(min(w, side / aspect**0.5))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(pic[y0 : y0 + ch, x0 : x0 + cw]).resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(x[:, :, ::-1] if rng.random() < 0.5 else x)


class Crops(Dataset):
    """``{"image": normalized crop, "label": fp32 top-1}`` items of one split."""

    def __init__(self, split: str, n: int, labels: np.ndarray, seed: int, size: int, mean: Any, std: Any):
        self.split, self.n, self.labels, self.seed, self.size = split, n, labels, seed, size
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = (crop(self.seed, self.split, i, self.size) - self.mean) / self.std
        return {"image": x.astype(np.float32), "label": np.int64(self.labels[i])}


def labels_for(model: str, split: str, n: int, seed: int, size: int, batch: int = 32) -> np.ndarray:
    """The fp32 model's top-1 class of each crop (cached on disk)."""
    key = hashlib.sha256(f"{efficientnet_lite.weights_path(model)}|{split}|{n}|{seed}|{size}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "keiryo-bench-crops" / f"{model}-{split}-{key}.npy"
    if path.is_file():
        return np.load(path)
    net = efficientnet_lite.build(model)
    mean = np.asarray(efficientnet_lite.MEAN, np.float32)[:, None, None]
    std = np.asarray(efficientnet_lite.STD, np.float32)[:, None, None]
    out = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            xs = np.stack([(crop(seed, split, i, size) - mean) / std for i in range(s, min(n, s + batch))])
            out.append(net(torch.from_numpy(xs)).argmax(1).numpy())
    labels = np.concatenate(out).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, labels)
    return labels


def crops(model: str = "lite0", train: int = 512, val: int = 200, test: int = 1000, size: int = 224, seed: int = 0) -> dict:
    """train / val / test splits of crops labelled by ``model`` (a bench/models/efficientnet_lite.py variant)."""
    sizes = {"train": train, "val": val, "test": test}
    return {
        s: Crops(s, n, labels_for(model, s, n, seed, size), seed, size, efficientnet_lite.MEAN, efficientnet_lite.STD)
        for s, n in sizes.items()
    }
