import numpy as np
import pytest
import torch

from keiryo.data import DataSpec, load_data
from keiryo.data.splits import parse_options
from keiryo.errors import ConfigError, DataError, InputFileError


def test_digits_split_is_deterministic_stratified_and_disjoint(digits):
    again = load_data(DataSpec(source="digits", calib_size=64))
    assert torch.equal(digits.test.x, again.test.x) and torch.equal(digits.train.y, again.train.y)
    sizes = {k: len(getattr(digits, k)) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    # stratified: every class is in every split in about the same share
    for split in (digits.train, digits.val, digits.test):
        counts = np.bincount(split.y.numpy(), minlength=10) / len(split)
        assert counts.min() > 0.07 and counts.max() < 0.13
    # disjoint: no test image appears in train
    train_rows = {r.tobytes() for r in digits.train.x.numpy()}
    assert sum(r.tobytes() in train_rows for r in digits.test.x.numpy()) < 5  # digits has a few exact duplicates
    other = load_data(DataSpec(source="digits", seed=1))
    assert not torch.equal(other.test.y, digits.test.y)


def test_calibration_subset_comes_from_train(digits):
    assert len(digits.calib) == 64
    train_rows = {r.tobytes() for r in digits.train.x.numpy()}
    assert all(r.tobytes() in train_rows for r in digits.calib.x.numpy())


def test_digits_resize_and_channels():
    d = load_data("digits", size=16, channels=3)
    assert d.input_shape == (3, 16, 16)
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        load_data("digits", channels=2)
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        load_data("digits", colour=1)


def test_npz_source_and_its_errors(tmp_path):
    from keiryo.testing import blobs

    x, y = blobs(200, 6, 3)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    d = load_data(str(tmp_path / "ok.npz"))
    assert d.input_shape == (6,) and d.num_classes == 3
    x[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"nan.npz: x contains 1 NaN/Inf values \(first in sample 5\)"):
        load_data(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_data(str(tmp_path / "noy.npz"))
    with pytest.raises(InputFileError, match="file not found"):
        load_data(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="bad.npz"):
        load_data(str(tmp_path / "bad.npz"))


def test_csv_source(tmp_path):
    from keiryo.testing import blobs

    x, y = blobs(150, 4, 3)
    lines = ["a,b,species,c,d"] + [f"{r[0]},{r[1]},{'abc'[t]},{r[2]},{r[3]}" for r, t in zip(x, y, strict=False)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    d = load_data(DataSpec(source=str(tmp_path / "d.csv"), options={"label": "species"}))
    assert d.input_shape == (4,) and d.class_names == ["a", "b", "c"]
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_data(str(tmp_path / "d.csv"))


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataSpec(source=str(tmp_path), options={"size": 8, "channels": 3}, val_fraction=0.2, test_fraction=0.2))
    assert d.input_shape == (3, 8, 8) and d.class_names == ["cat", "dog"]
    (tmp_path / "cat" / "broken.png").write_bytes(b"nope")
    with pytest.raises(InputFileError, match="broken.png: not a readable image"):
        load_data(str(tmp_path))


def test_factory_source():
    d = load_data("keiryo.testing:blob_datasets")
    assert d.input_shape == (8,) and d.num_classes == 3
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_data("keiryo.testing:nope")


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ConfigError, match="expected 'digits', a .npz or .csv file"):
        load_data("imagenet")


def test_parse_options_keeps_lists_whole():
    assert parse_options(["hidden=[64,32],dropout=0.5", "name=x"]) == {"hidden": [64, 32], "dropout": 0.5, "name": "x"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_options(["oops"])
