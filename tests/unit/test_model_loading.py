import pytest
import torch

from keiryo.errors import ConfigError, DataError, InputFileError, ModelLoadError
from keiryo.model import ModelSpec, load_model, load_weights, save_weights

FACTORY = """
import torch
def make(input_shape, num_classes, hidden=16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))
def broken():
    return 42
"""


@pytest.fixture()
def factory_file(tmp_path):
    p = tmp_path / "mymodel.py"
    p.write_text(FACTORY)
    return p


def test_file_factory_with_options(factory_file):
    h = load_model(ModelSpec(source=f"{factory_file}:make", options={"hidden": 5}), (1, 8, 8), 10)
    assert h.num_params() == 64 * 5 + 5 + 5 * 10 + 10
    assert h.macs() == 64 * 5 + 5 * 10


def test_factory_errors_are_clear(factory_file, tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_model(f"{tmp_path}/nope.py:make", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_model(f"{factory_file}:missing", (1, 8, 8), 10)
    with pytest.raises(ModelLoadError, match="returned a int; expected a torch.nn.Module"):
        load_model(f"{factory_file}:broken", (1, 8, 8), 10)
    with pytest.raises(ModelLoadError, match="returned a dict; expected a torch.nn.Module"):
        load_model("keiryo.testing:not_a_module", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="module 'no_such_pkg.models' not found"):
        load_model("no_such_pkg.models:make", (1, 8, 8), 10)


def test_safetensors_and_state_dict_weights_round_trip(tiny_trained, tmp_path, digits):
    st = save_weights(tiny_trained.module, tmp_path / "w.safetensors")
    pt = tmp_path / "w.pt"
    torch.save(tiny_trained.module.state_dict(), pt)
    x = digits.test.x[:8]
    ref = tiny_trained.module(x)
    for w in (st, pt):
        h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(w)), (1, 8, 8), 10)
        assert torch.allclose(h.module(x), ref, atol=1e-6)
        assert h.content_hash() == tiny_trained.content_hash()


def test_pickle_payload_is_refused_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Payload()}, p)
    with pytest.raises(ModelLoadError, match="refused: the file contains pickled Python objects"):
        load_weights(p)


def test_mismatched_weights_list_the_keys(tmp_path):
    w = save_weights(torch.nn.Linear(3, 2), tmp_path / "lin.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing: features\.0\.weight.*unexpected: bias, weight"):
        load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(w)), (1, 8, 8), 10)
    h = load_model("keiryo.testing:tiny_cnn", (1, 8, 8), 10, options={"width": 4})
    w2 = save_weights(h.module, tmp_path / "w4.safetensors")
    with pytest.raises(ModelLoadError, match=r"shape mismatch: features\.0\.weight \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"):
        load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(w2)), (1, 8, 8), 10)


def test_nan_weights_corrupt_and_missing_files(tmp_path):
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    w = save_weights(lin, tmp_path / "nan.safetensors")
    with pytest.raises(ModelLoadError, match="NaN/Inf in 1 tensor"):
        load_weights(w)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputFileError, match="not a valid safetensors file"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(InputFileError, match="weights file not found"):
        load_weights(tmp_path / "none.safetensors")


def test_data_that_does_not_fit_the_model():
    # a fixed-architecture factory that ignores num_classes
    with pytest.raises(DataError, match="outputs 10 classes but the data has 3 classes"):
        load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"num_classes": 10}), (1, 8, 8), 3)
    with pytest.raises(DataError, match=r"cannot take the data's input shape \(2, 20\)"):
        load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"input_shape": (1, 8, 8)}), (20,), 10)
