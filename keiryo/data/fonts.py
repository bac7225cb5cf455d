"""Digits rendered from the 21 TrueType fonts that ship inside matplotlib: a public, generated stand-in for
handwritten digits (public pretraining before DP fine-tuning on private digits, calibration that no private
record touched).

Each sample follows the UCI/scikit-learn digits preprocessing: a glyph (random font and stroke width, sheared,
rotated) scaled to fill the height of a 32x32 bitmap like the size-normalized handwritten originals, moved,
wobbled by an elastic distortion (Simard et al. 2003), binarized, and its ink counted over 4x4 blocks into an 8x8
image of 0..16. Nothing is downloaded. The distortion's strength was chosen by how well a classifier trained
only on these digits reads the real ones (65% for an MLP; 76% zero-shot for the DP bench's CNN, bench/privacy.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from keiryo.errors import DataError


def _elastic(img: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Simard et al.'s elastic distortion: each pixel moved by a smooth random field (pen wobble)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    dy = gaussian_filter(rng.uniform(-1, 1, img.shape), sigma) * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, img.shape), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    return map_coordinates(img, (yy + dy, xx + dx), order=1, mode="constant")


@cache
def font_files() -> tuple[str, ...]:
    """The TrueType fonts inside matplotlib that draw the ten digits (symbol-only faces are left out)."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    keep = ("DejaVu", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10")
    files = sorted(str(p) for p in root.glob("*.ttf") if p.name.startswith(keep) and "Display" not in p.name)
    if not files:
        raise DataError(f"font digits: no fonts found under {root}; expected matplotlib's bundled TrueType fonts")
    return tuple(files)


def _glyph(font_path: str, digit: int, thickness: int) -> np.ndarray:
    """The digit's ink, cropped to its bounding box (bool array)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 64)
    img = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(img).text((32, 16), str(digit), fill=255, font=font, stroke_width=thickness, stroke_fill=255)
    a = np.asarray(img) > 127
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def render_digits(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in 0..16 like ``load_digits().images``, labels (N,) int64), balanced classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    fonts = font_files()
    y = np.arange(samples, dtype=np.int64) % 10
    rng.shuffle(y)
    out = np.empty((samples, 8, 8), dtype=np.float32)
    for i, d in enumerate(y):
        g = _glyph(fonts[rng.integers(len(fonts))], int(d), int(rng.integers(0, 3)))
        im = Image.fromarray(g.astype(np.uint8) * 255)
        # shear and rotate the glyph, then scale it to the 32x32 box
        shear = rng.uniform(-0.3, 0.3)
        w, h = im.size
        im = im.transform(
            (w + int(abs(shear) * h) + 1, h),
            Image.Transform.AFFINE,
            (1, shear, -shear * h if shear > 0 else 0, 0, 1, 0),
            resample=Image.Resampling.BILINEAR,
        )
        im = im.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, expand=True)
        w, h = im.size
        # as in the originals, the digit fills the box's height and keeps its proportions across (clipped to 32)
        sh = 32
        sw = min(32, max(4, round(w * sh / h * rng.uniform(1.0, 1.3))))
        im = im.resize((sw, sh), Image.Resampling.BILINEAR)
        canvas = np.zeros((32, 32), dtype=np.float32)
        x0 = min(max((32 - sw) // 2 + int(rng.integers(-2, 3)), 0), 32 - sw)
        canvas[:, x0 : x0 + sw] = np.asarray(im, dtype=np.float32) / 255
        canvas = _elastic(canvas, rng, alpha=60.0, sigma=5.0)
        out[i] = (canvas > 0.5).reshape(8, 4, 8, 4).sum(axis=(1, 3))
    return out, y
