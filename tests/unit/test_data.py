import numpy as np
import pytest
import torch

from keiryo.data import DataSpec, MemorySplit, load_data
from keiryo.data.splits import StreamSplit, parse_options
from keiryo.errors import ConfigError, DataError, InputFileError


def test_digits_split_is_deterministic_stratified_and_disjoint(digits):
    assert digits.input_names == ["image"] and digits.label_count == 10
    again = load_data(DataSpec(source="digits", calib_size=64))
    assert torch.equal(digits.test.inputs["image"], again.test.inputs["image"]) and torch.equal(digits.train.y, again.train.y)
    sizes = {k: len(getattr(digits, k)) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 == digits.total
    # stratified: every class is in every split in about the same share
    for split in (digits.train, digits.val, digits.test):
        counts = np.bincount(split.y.numpy(), minlength=10) / len(split)
        assert counts.min() > 0.07 and counts.max() < 0.13
    # disjoint: no test image appears in train
    train_rows = {r.tobytes() for r in digits.train.numpy()["image"]}
    assert sum(r.tobytes() in train_rows for r in digits.test.numpy()["image"]) < 5  # digits has a few exact duplicates
    other = load_data(DataSpec(source="digits", seed=1))
    assert not torch.equal(other.test.y, digits.test.y)


def test_calibration_subset_comes_from_train(digits):
    assert len(digits.calib) == 64
    train_rows = {r.tobytes() for r in digits.train.numpy()["image"]}
    assert all(r.tobytes() in train_rows for r in digits.calib.numpy()["image"])


def test_memory_split_slices_and_batches_named_inputs(digits):
    part = digits.test[:10]
    assert isinstance(part, MemorySplit) and len(part) == 10
    assert torch.equal(part.inputs["image"], digits.test.inputs["image"][:10]) and torch.equal(part.targets, digits.test.y[:10])
    batches = list(digits.test.batches(7))
    assert [len(y) for _, y in batches[:-1]] == [7] * (len(batches) - 1)
    assert torch.equal(torch.cat([x["image"] for x, _ in batches]), digits.test.inputs["image"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    shuffled = [y for _, y in digits.test.batches(7, shuffle=True, generator=g1)]
    again = [y for _, y in digits.test.batches(7, shuffle=True, generator=g2)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again, strict=True))
    assert not torch.equal(torch.cat(shuffled), digits.test.y)  # shuffled, yet every row once
    assert torch.equal(torch.cat(shuffled).sort().values, digits.test.y.sort().values)


def test_eval_and_val_sizes_cap_the_in_memory_splits():
    d = load_data(DataSpec(source="digits", eval_size=50, val_size=40, calib_size=30))
    assert (len(d.test), len(d.val), len(d.calib)) == (50, 40, 30)
    assert d.total == 1797 and len(d.train) > 1000


def test_digits_resize_and_channels():
    d = load_data("digits", size=16, channels=3)
    assert d.input_shape == (3, 16, 16)
    x = d.train.inputs["image"]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        load_data("digits", channels=2)
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        load_data("digits", colour=1)


def test_font_digits_are_public_digits_shaped_and_scaled_like_the_handwritten_ones():
    """font-digits: rendered from fonts inside matplotlib, preprocessed as UCI digits (ink counted over 4x4 blocks
    of a 32x32 bitmap), classes balanced, the same seed the same images; a classifier trained only on them reads
    real handwritten digits far above chance (what public pretraining needs)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from keiryo.data.fonts import render_digits

    fonts = load_data("font-digits", samples=2000)
    real = load_data("digits")
    x = fonts.calib.inputs["image"]
    assert x.shape[1:] == real.calib.inputs["image"].shape[1:] == (1, 8, 8)
    assert fonts.preprocessing["scale"] == real.preprocessing["scale"] and fonts.class_names == real.class_names
    levels = torch.unique(x * 16)
    assert levels.min() == 0 and levels.max() == 16 and torch.equal(levels, levels.round())  # counts of 16 pixels
    images, y = render_digits(500, seed=3)
    assert np.bincount(y).tolist() == [50] * 10
    again, _ = render_digits(500, seed=3)
    assert np.array_equal(images, again) and not np.array_equal(images, render_digits(500, seed=4)[0])
    assert abs(images.mean() - load_digits().images.mean()) < 1.5  # about as much ink as the handwritten digits
    flat, yy = render_digits(3000, seed=0)
    clf = LogisticRegression(max_iter=1000).fit(flat.reshape(len(flat), -1) / 16, yy)
    d = load_digits()
    assert (clf.predict(d.images.reshape(len(d.images), -1) / 16) == d.target).mean() > 0.45  # chance is 0.1
    assert load_data("font-digits", samples=50, size=16).calib.inputs["image"].shape[1:] == (1, 16, 16)


def test_npz_source_and_its_errors(tmp_path):
    from keiryo.testing import blobs

    x, y = blobs(200, 6, 3)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    d = load_data(str(tmp_path / "ok.npz"))
    assert d.input_names == ["x"] and d.input_shape == (6,) and d.label_count == 3
    x[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"nan.npz: x contains 1 NaN/Inf values \(first in sample 5\)"):
        load_data(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(DataError, match=r"label array 'y' not found; arrays are \['x'\]"):
        load_data(str(tmp_path / "noy.npz"))
    with pytest.raises(InputFileError, match="file not found"):
        load_data(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="bad.npz"):
        load_data(str(tmp_path / "bad.npz"))


def test_npz_with_several_named_inputs_and_a_label_option(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(90, 12)).astype(np.int64)
    mask = np.ones((90, 12), np.int64)
    cls = rng.integers(0, 3, size=90)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask, cls=cls)
    d = load_data(DataSpec(source=str(tmp_path / "t.npz"), options={"label": "cls"}))
    assert sorted(d.input_names) == ["attention_mask", "input_ids"]
    assert {t.name: t.dtype for t in d.inputs} == {"input_ids": "int64", "attention_mask": "int64"}
    assert d.label_count == 3
    # every row of every input stays with its label
    row = {r.tobytes(): int(c) for r, c in zip(ids, cls, strict=True)}
    assert all(row[r.tobytes()] == int(c) for r, c in zip(d.test.numpy()["input_ids"], d.test.y, strict=True))
    no_labels = load_data(DataSpec(source=str(tmp_path / "t.npz"), options={"label": None}))
    assert no_labels.target is None and no_labels.test.targets is None and len(no_labels.inputs) == 3


def test_csv_source(tmp_path):
    from keiryo.testing import blobs

    x, y = blobs(150, 4, 3)
    lines = ["a,b,species,c,d"] + [f"{r[0]},{r[1]},{'abc'[t]},{r[2]},{r[3]}" for r, t in zip(x, y, strict=False)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    d = load_data(DataSpec(source=str(tmp_path / "d.csv"), options={"label": "species"}))
    assert d.input_names == ["features"] and d.input_shape == (4,) and d.class_names == ["a", "b", "c"]
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_data(str(tmp_path / "d.csv"))


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataSpec(source=str(tmp_path), options={"size": 8}, val_fraction=0.2, test_fraction=0.2))
    assert d.input_names == ["image"] and d.input_shape == (3, 8, 8) and d.class_names == ["cat", "dog"]  # RGB by default
    assert isinstance(d.train, StreamSplit)  # read lazily, batch by batch
    x, y = next(d.train.batches(4))
    assert x["image"].shape == (4, 3, 8, 8) and x["image"].dtype == torch.float32 and y.shape == (4,)
    assert d.preprocessing["channels"] == 3 and d.preprocessing["size"] == 8
    (tmp_path / "cat" / "broken.png").write_bytes(b"nope")
    with pytest.raises(InputFileError, match="broken.png: not a readable image"):
        load_data(str(tmp_path))


def test_a_streamed_split_is_held_in_memory_only_under_the_byte_cap(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataSpec(source=str(tmp_path), options={"size": 8}, val_fraction=0.3, test_fraction=0.2))
    assert isinstance(d.val, StreamSplit)
    held = d.val.held()  # 3 x 8 x 8 float32 per image: far under the default cap
    assert isinstance(held, MemorySplit) and len(held) == len(d.val)
    streamed = torch.cat([b[0]["image"] for b in d.val.batches(4)])
    assert torch.equal(held.inputs["image"], streamed)
    assert d.val.held(max_bytes=3 * 8 * 8 * 4 * len(d.val) - 1) is d.val  # one byte over: stays streamed
    assert held.held() is held


def test_image_folder_preprocessing_is_declared_and_applied(tmp_path):
    from PIL import Image

    for cls, value in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 10), value).save(tmp_path / cls / f"{i}.png")
    opts = {"size": 8, "crop": 6, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channel_order": "BGR"}
    d = load_data(DataSpec(source=str(tmp_path), options=opts, val_fraction=0.2, test_fraction=0.2))
    assert d.input_shape == (3, 6, 6)
    assert d.preprocessing["crop"] == "center 6x6" and d.preprocessing["channel_order"] == "BGR"
    x, y = d.test.inputs["image"], d.test.y
    red = x[y == 0][0]  # BGR: red is the last channel; (v - 0.5) / 0.5 maps 0..1 to -1..1
    assert torch.allclose(red[2], torch.ones(6, 6)) and torch.allclose(red[0], -torch.ones(6, 6))
    grey = load_data(DataSpec(source=str(tmp_path), options={"size": 8, "channels": 1}, val_fraction=0.2, test_fraction=0.2))
    assert grey.input_shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="mean needs 3 value"):
        load_data(DataSpec(source=str(tmp_path), options={"mean": [0.5]}))


def test_factory_source():
    d = load_data("keiryo.testing:blob_datasets")
    assert d.input_names == ["input"] and d.input_shape == (8,) and d.label_count == 3
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_data("keiryo.testing:nope")


def test_unknown_source_is_a_clear_error():
    with pytest.raises(
        ConfigError, match=r"data 'imagenet': expected digits, .*a \.npz/\.safetensors/\.csv file, an image folder"
    ):
        load_data("imagenet")


def test_parse_options_keeps_lists_whole():
    assert parse_options(["hidden=[64,32],dropout=0.5", "name=x"]) == {"hidden": [64, 32], "dropout": 0.5, "name": "x"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_options(["oops"])
