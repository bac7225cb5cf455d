"""Models beyond single-input image classifiers, end to end: several named int64 inputs, dict outputs,
regression, embeddings without labels, classifiers whose labels cover a subset of their classes,
failing recipes, and the errors a user gets for data that does not fit."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from keiryo.benchmark import BenchConfig
from keiryo.cli import main
from keiryo.data import DataSpec, load_data
from keiryo.errors import DataError
from keiryo.model import load_model, save_weights
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.tasks import get_task

FAST = RunOptions(bench=BenchConfig(iterations=10, warmup=2, throughput_iterations=2, throughput_batch=4), progress=False)

USER_MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Encoder(nn.Module):
        """A user's sentence encoder: token ids + mask in, a dict with the embedding out."""

        def __init__(self, vocab=300, dim=48):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.layer = nn.TransformerEncoderLayer(dim, 4, 96, dropout=0.0, batch_first=True)
            self.proj = nn.Linear(dim, 32)

        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids)
            keep = attention_mask.unsqueeze(-1).float()
            h = self.layer(x) * keep
            return {"embedding": self.proj(h.sum(1) / keep.sum(1).clamp_min(1.0))}


    def build(vocab=300):
        torch.manual_seed(0)
        return Encoder(vocab)


    class Pairs(torch.utils.data.Dataset):
        """Dict items of int64 token ids and masks, no labels (an embedding model)."""

        def __init__(self, n=160, seq=16, seed=0):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(2, 300, (n, seq), generator=g)
            lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
            self.mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i] * self.mask[i], "attention_mask": self.mask[i]}


    def pairs(seed=0):
        return Pairs(seed=seed)


    def wrong_arity(seed=0):
        class Bad(torch.utils.data.Dataset):
            def __len__(self):
                return 20

            def __getitem__(self, i):
                x = torch.zeros(4)
                return (x, x, 1) if i == 7 else (x, 1)

        return Bad()
    '''
)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "usermodel.py").write_text(USER_MODEL)
    return d


def test_user_text_encoder_with_two_int64_inputs_and_a_dict_output(user_files, tmp_path):
    src = f"{user_files / 'usermodel.py'}"
    data = load_data(DataSpec(source=f"{src}:pairs", calib_size=32))
    assert [(t.name, t.dtype, t.shape) for t in data.inputs] == [
        ("input_ids", "int64", ["batch", 16]),
        ("attention_mask", "int64", ["batch", 16]),
    ]
    assert data.target is None
    task = get_task("embedding")
    h = load_model(f"{src}:build", data, output_name=task.default_output)
    weights = save_weights(h.module, tmp_path / "enc.safetensors")
    h = load_model(f"{src}:build", data, weights=weights)
    assert h.output_names == ["embedding"] and h.io.outputs[0].shape == ["batch", 32]
    task.bind(h.output_names)
    res = compress(h, data, [load_recipe("int8-dynamic"), load_recipe("int8")], tmp_path / "out", opts=FAST, task=task)
    assert res["task"]["name"] == "embedding" and res["failed"] == 0
    assert [t["name"] for t in res["model"]["io"]["inputs"]] == ["input_ids", "attention_mask"]
    by = {c["name"]: c for c in res["candidates"]}
    fp32 = by["fp32"]["metrics"]
    # the fp32 export reproduces the torch embeddings, checked per output on its runtime
    assert fp32["export_parity"]["outputs"]["embedding"]["max_abs_diff"] < 1e-3
    assert fp32["cosine"] > 0.9999 and fp32["recall_at_1"] == 1.0
    dyn = by["int8-dynamic"]["metrics"]
    assert 0.95 < dyn["cosine"] <= 1.0 and dyn["cosine_ci95"][0] <= dyn["cosine"] <= dyn["cosine_ci95"][1]
    assert dyn["samples"] == len(data.test) and dyn["input_shapes"] == {"input_ids": [1, 16], "attention_mask": [1, 16]}
    assert dyn["size_bytes"] < fp32["size_bytes"]


def test_regression_on_sensor_series_trains_and_quantizes(tmp_path):
    from keiryo.train import TrainConfig, train

    data = load_data(DataSpec(source="sensors", options={"samples": 600, "length": 32}, calib_size=64))
    assert data.target is not None and data.target.dtype == "float32" and data.target.shape == ()
    task = get_task("regression")
    h = load_model("zoo:sensor", data, output_name="prediction", options={"width": 16, "blocks": 3})
    task.bind(h.output_names)
    task.check(h.io.outputs, data)
    before = task.metrics([h.module(data.test.inputs["series"]).detach().numpy()], data.test.targets.numpy(), [np.zeros(1)])
    res = train(h, data, task, TrainConfig(epochs=12, lr=3e-3), progress=False)
    assert res.metric == "mae" and res.test_metrics["mae"] < before["mae"] * 0.5  # it learned
    out = compress(h, data, [load_recipe("int8")], tmp_path / "out", opts=FAST, task=task)
    by = {c["name"]: c["metrics"] for c in out["candidates"]}
    assert set(by["int8"]) >= {"mae", "rmse", "r2", "mae_ci95", "fidelity", "mae_increase_pct"}
    assert by["int8"]["mae"] < before["mae"] * 0.6


def test_a_1000_class_head_with_labels_covering_a_subset(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.choice(np.arange(0, 1000, 25), size=240)  # 40 distinct labels among 1000 classes
    x = rng.normal(size=(240, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"))
    h = load_model("zoo:mlp", data, 1000, output_name="logits", options={"hidden": [16]})
    task = get_task("classification").bind(h.output_names)
    task.check(h.io.outputs, data)  # labels may cover any subset of the model's classes
    m = task.metrics([np.eye(1000)[y[:10]]], y[:10], [np.eye(1000)[y[:10]]])
    assert m["accuracy"] == 1.0 and m["top5_accuracy"] == 1.0 and m["accuracy_ci95"][0] < 1.0


def test_labels_outside_the_output_range_name_the_first_one(tmp_path):
    x = np.zeros((60, 4), np.float32)
    y = np.arange(60) % 12
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"))
    h = load_model("zoo:mlp", data, 10, output_name="logits")
    with pytest.raises(DataError, match=r"label 1[01] \(sample \d+\) is outside the model's output range 0..9"):
        get_task("classification").bind(h.output_names).check(h.io.outputs, data)


def test_regression_targets_for_a_classification_head_fail_before_any_work(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.savez(tmp_path / "r.npz", x=x, y=x[:, 0] * 1.5)
    code = main(["compress", "-m", "zoo:mlp", "--model-opt", "hidden=[8]", "-d", str(tmp_path / "r.npz"),
                 "--task", "classification", "-r", "int8", "-o", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3  # DataError
    assert "targets are not class labels" in err and "--task regression" in err and not (tmp_path / "o").exists()


def test_data_names_that_do_not_match_the_model_name_both_sides(user_files, tmp_path, capsys):
    np.savez(tmp_path / "t.npz", tokens=np.ones((30, 8), np.int64), y=np.arange(30) % 2)
    code = main(["compress", "-m", f"{user_files / 'usermodel.py'}:build", "-d", str(tmp_path / "t.npz"),
                 "-r", "int8", "-o", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "internal error" not in err
    assert "cannot take the data's inputs (tokens (2, 8) int64" in err and "forward(input_ids, attention_mask)" in err


def test_a_dataset_item_of_the_wrong_arity_names_the_index(user_files):
    with pytest.raises(DataError, match=r"dataset\[7\]: item has 3 elements but the first item had 2"):
        load_data(DataSpec(source=f"{user_files / 'usermodel.py'}:wrong_arity"))


def test_a_failing_recipe_is_recorded_and_the_others_kept(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad-prune\nsteps:\n  - type: prune.structured\n    params: {exclude: [no.such.layer]}\n"
                   "  - type: quantize.int8_static\n")  # fmt: skip
    out = tmp_path / "o"
    code = main(["compress", "-m", "zoo:mlp", "--model-opt", "hidden=[16]", "-d", "digits", "-r", "int8", "-r", str(bad),
                 "-o", str(out), "--iterations", "5"])  # fmt: skip
    err = capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    by = {c["name"]: c for c in res["candidates"]}
    assert code == 4 and "1 of 3 candidates failed" in err
    assert by["int8"]["status"] == "ok" and (out / by["int8"]["artifact"]).is_file()
    assert by["bad-prune"]["status"] == "failed" and by["bad-prune"]["failed_step"] == "prune.structured"
    assert "no.such.layer" in by["bad-prune"]["error"]
    assert res["failed"] == 1 and res["best"] in ("fp32", "int8")


def test_entropy_and_percentile_calibration_on_a_set_not_a_multiple_of_the_batch(tmp_path):
    data = load_data(DataSpec(source="digits", calib_size=37))
    h = load_model("zoo:mlp", data, output_name="logits", options={"hidden": [16]})
    recipes = [load_recipe("int8"), load_recipe("int8-entropy"), load_recipe("int8-percentile")]
    res = compress(h, data, recipes, tmp_path / "o", opts=FAST)
    assert res["failed"] == 0, [c.get("error") for c in res["candidates"]]
    sha = {c["name"]: c["sha256"] for c in res["candidates"]}
    assert len({sha["int8"], sha["int8-entropy"], sha["int8-percentile"]}) == 3  # three calibrations, three files


def test_image_folder_streams_train_and_holds_only_eval_and_calib(tmp_path):
    from PIL import Image

    from keiryo.data.splits import MemorySplit, StreamSplit

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(30):
            arr = (rng.uniform(0, 1, (40, 50, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    spec = DataSpec(
        source=str(tmp_path / "imgs"),
        options={"size": 20, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        eval_size=5,
        calib_size=4,
    )
    data = load_data(spec)
    assert isinstance(data.train, StreamSplit) and isinstance(data.test, MemorySplit)
    assert len(data.test) == 5 and len(data.calib) == 4 and data.total == 60
    assert data.inputs[0].shape == ["batch", 3, 16, 16] and data.class_names == ["cat", "dog"]
    assert data.preprocessing["crop"] == "center 16x16" and data.preprocessing["mean"] == [0.5, 0.5, 0.5]
    x, y = next(data.train.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x["image"].shape == (8, 3, 16, 16) and y.dtype == torch.int64
    assert float(x["image"].min()) < -1.0 and float(x["image"].max()) > 1.0  # normalised with mean/std (raw is 0..1)


def test_doctor_without_data_from_input_specs(capsys):
    opts = "dim=32,heads=2,layers=1,ffn=64,vocab=100"
    inputs = ["--input", "input_ids:int64[16]", "--input", "attention_mask:int64[16]"]
    code = main(["doctor", "-m", "zoo:text_encoder", "--model-opt", opts, *inputs, "--num-classes", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    rep = json.loads(out)
    assert rep["exports"]["onnx"]["ok"] and rep["params"] > 0


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("keiryo ")


def test_a_byte_identical_file_is_measured_once(tmp_path, monkeypatch):
    """Two recipes that end in the same file (a fallback that kept no layer in float, say): the second is not measured."""
    import keiryo.pipeline.runner as runner
    from keiryo.measure import measure_baseline
    from keiryo.pipeline.runner import record_measured, run_recipe

    data = load_data(DataSpec(source="digits", calib_size=32))
    h = load_model("zoo:mlp", data, output_name="logits", options={"hidden": [16]})
    task = get_task("classification").bind(h.output_names)
    base = measure_baseline(h, data, task, FAST.bench)
    measured = tmp_path / "measured"
    first = run_recipe(load_recipe("int8"), h, data, tmp_path / "a", base, FAST, task=task, measured=measured)
    assert first.ok and first.duplicate_of is None and first.sha256
    record_measured(measured, first.sha256, "trial-1", first.metrics)

    def no_second_measurement(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(runner, "measure_artifact", no_second_measurement)
    same = load_recipe("int8").model_copy(update={"name": "int8-again"})
    second = run_recipe(same, h, data, tmp_path / "b", base, FAST, task=task, measured=measured)
    assert second.ok and second.duplicate_of == "trial-1" and second.sha256 == first.sha256
    assert second.metrics["accuracy"] == first.metrics["accuracy"]
    other = run_recipe(load_recipe("fp16"), h, data, tmp_path / "c", base, FAST, task=task, measured=measured)
    assert not other.ok and other.failed_step == "measure"  # a different file is measured (here: the patched harness)


def test_tflite_export_of_a_two_input_token_model_fixes_batch_and_seq(tmp_path):
    """TFLite states what it fixes (batch 1 and the data's sequence length), exports at it and matches torch per output."""
    pytest.importorskip("litert_torch")
    from keiryo.pipeline.runner import export_variant

    data = load_data(DataSpec(source="tokens", options={"samples": 60, "vocab": 50, "seq": 12}, calib_size=8))
    h = load_model(
        "zoo:text_encoder", data, output_name="logits", options={"vocab": 50, "dim": 16, "heads": 2, "layers": 1, "ffn": 32}
    )
    rep = export_variant(load_recipe("fp32", target="tflite"), h, data, tmp_path / "t.tflite", FAST)
    art = rep["artifact"]
    assert art.input_names == ["input_ids", "attention_mask"] and art.output_names == ["logits"]
    assert art.info["fixed_shapes"] == {"input_ids": [1, 12], "attention_mask": [1, 12]}
    assert rep["parity"]["passed"] and rep["parity"]["outputs"]["logits"]["max_abs_diff"] < 1e-4
    assert rep["metrics"]["fidelity"] == 1.0
