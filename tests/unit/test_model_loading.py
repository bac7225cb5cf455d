from dataclasses import replace

import pytest
import torch

from keiryo.data import TargetInfo
from keiryo.errors import ConfigError, DataError, InputFileError, ModelLoadError
from keiryo.model import IOSpec, ModelSpec, TensorSpec, load_model, load_weights, save_weights
from keiryo.tasks import get_task

FACTORY = """
import torch
def make(input_shape, num_classes, hidden=16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))
def broken():
    return 42
"""


MULTI = """
import torch
class Pair(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = torch.nn.Linear(4, 3), kind
    def forward(self, x):
        y = self.lin(x)
        if self.kind == "pair":
            return y, y[:, :2]
        if self.kind == "named":
            return {"scores": y, "embedding": y[:, :2], "unused": None}
        if self.kind == "text":
            return "nope"
        if self.kind == "unbatched":
            return y[0]
        return y * float("nan")
def pair(): return Pair("pair")
def named(): return Pair("named")
def text(): return Pair("text")
def unbatched(): return Pair("unbatched")
def nan(): return Pair("nan")
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
    x = digits.test[:8].inputs
    ref = tiny_trained(x)
    for w in (st, pt):
        h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(w)), digits, output_name="logits")
        assert torch.allclose(h(x), ref, atol=1e-6)
        assert h.content_hash() == tiny_trained.content_hash()
    # the hash covers the I/O description too: same weights, other input name -> another model
    renamed = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", weights=str(st)), (1, 8, 8), 10, output_name="logits")
    assert renamed.content_hash() != tiny_trained.content_hash()


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


def test_data_that_does_not_fit_the_model(digits):
    # a fixed-architecture factory (input shape and class count set by options, not by the data)
    with pytest.raises(DataError, match=r"cannot take the data's inputs \(input \(2, 20\) float32, batch first\)"):
        load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"input_shape": (1, 8, 8)}), (20,), 10)
    # the class count is checked by the task: labels 0..9 do not fit 3 logits
    h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"num_classes": 3}), digits, output_name="logits")
    assert h.head_width == 3
    task = get_task("classification").bind(h.output_names)
    first = next(i for i, label in enumerate(digits.test.y.tolist()) if label >= 3)
    label = int(digits.test.y[first])
    with pytest.raises(
        DataError, match=rf"digits \[test\]: label {label} \(sample {first}\) is outside the model's output range 0\.\.2"
    ):
        task.check(h.io.outputs, digits)
    # a label seen only outside the in-memory splits still counts (the source's label count)
    ten = load_model(ModelSpec(source="keiryo.testing:tiny_cnn"), digits, output_name="logits")
    task = get_task("classification").bind(ten.output_names)
    task.check(ten.io.outputs, digits)
    more = replace(digits, target=TargetInfo("int64", (), 11))
    with pytest.raises(DataError, match=r"^digits: label 10 is outside the model's output range 0\.\.9"):
        task.check(ten.io.outputs, more)
    # more logits than labels is fine: the labels may cover a subset of the classes
    wide = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"num_classes": 12}), digits, output_name="logits")
    get_task("classification").bind(wide.output_names).check(wide.io.outputs, digits)
    # and an output that is not (batch, classes) logits is not a classifier
    flat = load_model(ModelSpec(source="zoo:sensor", options={"width": 4, "blocks": 1}), (3, 16), None)
    with pytest.raises(DataError, match=r"output 'output' has shape \['batch'\]; expected \(batch, classes\) logits"):
        get_task("classification").check(flat.io.outputs, digits)


def test_load_model_describes_inputs_and_outputs(digits):
    h = load_model("keiryo.testing:tiny_cnn", digits, output_name="logits")
    assert h.io.describe() == "(image:float32[batch,1,8,8]) -> (logits:float32[batch,10])"
    assert h.input_names == ["image"] and h.output_names == ["logits"]
    assert h.input_shape == (1, 8, 8) and h.head_width == 10  # the data's label count by default
    ex = h.example_inputs(3)
    assert list(ex) == ["image"] and ex["image"].shape == (3, 1, 8, 8) and ex["image"].dtype == torch.float32
    assert h(ex).shape == (3, 10)
    # a per-sample shape tuple is one float32 input named "input"; output_name defaults to "output"
    t = load_model("keiryo.testing:tiny_cnn", (1, 8, 8), 4)
    assert t.io.describe() == "(input:float32[batch,1,8,8]) -> (output:float32[batch,4])"
    # an IOSpec or a list of TensorSpecs keeps the given names and dtypes
    specs = [TensorSpec(name="pixels", shape=["batch", 1, 8, 8])]
    assert load_model("keiryo.testing:tiny_cnn", IOSpec(inputs=specs), 5).input_names == ["pixels"]
    assert load_model("keiryo.testing:tiny_cnn", specs, 5).head_width == 5


def test_load_model_with_named_token_inputs_and_several_outputs(tmp_path):
    ids = TensorSpec(name="input_ids", dtype="int64", shape=["batch", 12])
    mask = TensorSpec(name="attention_mask", dtype="int64", shape=["batch", 12])
    h = load_model(
        ModelSpec(source="zoo:text_encoder", options={"vocab": 40, "dim": 16, "heads": 2, "layers": 1}), [mask, ids], 3
    )
    assert h.input_names == ["attention_mask", "input_ids"] and h.head_width == 3
    ex = h.example_inputs(2)
    assert ex["input_ids"].dtype == torch.int64 and h(ex).shape == (2, 3)  # called by keyword: order does not matter
    emb = load_model("zoo:text_encoder", [ids, mask], None, options={"vocab": 40, "dim": 16, "heads": 2, "embedding": True})
    assert emb.io.outputs[0].shape == ["batch", 16]
    (tmp_path / "multi.py").write_text(MULTI)
    two = load_model(f"{tmp_path}/multi.py:pair", (4,), output_name="head")
    assert two.output_names == ["head_0", "head_1"] and two.head_width == 3
    named = load_model(f"{tmp_path}/multi.py:named", (4,))
    assert named.output_names == ["scores", "embedding"] and [o.shape for o in named.io.outputs] == [["batch", 3], ["batch", 2]]
    with pytest.raises(ModelLoadError, match="returned a str; expected a tensor"):
        load_model(f"{tmp_path}/multi.py:text", (4,))
    with pytest.raises(ModelLoadError, match=r"output 'output' has shape \(3,\) for a batch of 2; expected batch first"):
        load_model(f"{tmp_path}/multi.py:unbatched", (4,))
    with pytest.raises(ModelLoadError, match="produced NaN/Inf in output 'output'"):
        load_model(f"{tmp_path}/multi.py:nan", (4,))
