import numpy as np
import pytest

from keiryo.benchmark import BenchConfig, measure_file, run_benchmark
from keiryo.errors import ConfigError, InputFileError, RuntimeSessionError
from keiryo.export import export
from keiryo.model import TensorSpec, load_model
from keiryo.runtime import RUNTIMES, Session, open_session


@pytest.fixture(scope="module")
def tiny_onnx(tiny_trained, tmp_path_factory):
    return export(tiny_trained, "onnx", tmp_path_factory.mktemp("rt") / "tiny.onnx")


def _source(name, tiny_trained, tiny_onnx):
    return {"onnxruntime": tiny_onnx.path, "torch": tiny_trained, "fake": None}[name]


@pytest.mark.parametrize("name", ["fake", "onnxruntime", "torch"])
def test_every_runtime_follows_the_session_protocol(name, tiny_trained, tiny_onnx, digits):
    assert name in RUNTIMES or name in ("fake", "onnxruntime", "torch")
    x = digits.test[:4].numpy()["image"]
    with open_session(name, _source(name, tiny_trained, tiny_onnx), threads=1) as s:
        assert isinstance(s, Session)
        assert s.threads == 1
        out = s.run(x)
        same = s.run({s.input_names[0]: x})
        if name != "fake":  # the model's own names, from its IOSpec (torch) or the exported graph
            assert s.input_names == ["image"] and s.output_names == ["logits"]
            assert out[0].shape == (4, 10)
    assert isinstance(out, list) and np.array_equal(out[0], same[0])
    assert out[0].shape[0] == 4


def test_onnxruntime_matches_torch(tiny_trained, tiny_onnx, digits):
    x = digits.test[:32].numpy()
    with open_session("torch", tiny_trained) as t, open_session("onnxruntime", tiny_onnx.path) as o:
        assert np.abs(t.run(x)[0] - o.run(x)[0]).max() < 1e-4


def test_predict_runs_a_split_a_dict_or_an_array_in_batches(tiny_trained, tiny_onnx, digits):
    from keiryo.evaluate import predict
    from keiryo.testing import top1_accuracy

    with open_session("onnxruntime", tiny_onnx.path) as s:
        whole = s.run(digits.test.numpy())
        by_split = predict(s, digits.test, batch_size=7)
        by_dict = predict(s, digits.test.numpy(), batch_size=50)
        by_array = predict(s, digits.test.inputs["image"])
        acc = top1_accuracy(s, digits.test)
    assert len(by_split) == 1 and by_split[0].shape == (len(digits.test), 10)
    for got in (by_split, by_dict, by_array):
        np.testing.assert_allclose(got[0], whole[0], atol=1e-5)
    assert acc == float((whole[0].argmax(1) == digits.test.y.numpy()).mean()) and acc > 0.8
    with open_session("torch", tiny_trained) as t:
        assert abs(top1_accuracy(t, digits.test) - acc) < 0.01


def test_session_errors(tiny_onnx, tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        open_session("tensorrt", tiny_onnx.path)
    with open_session("onnxruntime", tiny_onnx.path) as s:
        with pytest.raises(RuntimeSessionError, match="input names"):
            s.run({"wrong": np.zeros((1, 1, 8, 8), np.float32)})
    two_inputs = load_model(
        "zoo:text_encoder", [_ids("input_ids"), _ids("attention_mask")], 2, options={"vocab": 20, "dim": 8, "heads": 2}
    )
    with open_session("torch", two_inputs) as s:
        assert s.input_names == ["input_ids", "attention_mask"]
        with pytest.raises(RuntimeSessionError, match="pass a dict, not one array"):
            s.run(np.ones((1, 6), np.int64))
        with pytest.raises(RuntimeSessionError, match="do not match the model's"):
            s.run({"input_ids": np.ones((1, 6), np.int64)})
        assert s.run({"input_ids": np.ones((3, 6), np.int64), "attention_mask": np.ones((3, 6), np.int64)})[0].shape == (3, 2)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputFileError, match="corrupt.onnx: onnxruntime cannot load this model"):
        open_session("onnxruntime", bad)


def _ids(name):
    return TensorSpec(name=name, dtype="int64", shape=["batch", 6])


def test_run_benchmark_reports_ordered_percentiles():
    with open_session("fake", None) as s:
        r = run_benchmark(
            s, {"input": np.zeros((1, 4), np.float32)}, BenchConfig(iterations=50, warmup=2, throughput_iterations=2)
        )
        assert s.calls == 2 + 50 + 1 + 2
    assert 0 < r.latency_p50_ms <= r.latency_p95_ms <= r.latency_p99_ms
    assert r.iterations == 50 and r.threads == 1 and r.throughput_per_s > 0


def test_measure_file_runs_isolated_and_reports_its_own_peak_rss(tiny_onnx, digits):
    r = measure_file(tiny_onnx.path, "onnxruntime", digits.test[:1].numpy(), BenchConfig(iterations=10, warmup=2))
    # a fresh interpreter with numpy + onnxruntime: tens of MB, not the parent's (torch-laden) footprint
    assert r.peak_rss_mb is not None and 20 < r.peak_rss_mb < 400
    assert r.latency_p50_ms > 0


def test_latency_can_be_measured_at_a_larger_batch():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x.reshape(x.shape[0], -1)

    with open_session("fake", fn) as s:
        r = run_benchmark(
            s, np.zeros((1, 4), np.float32), BenchConfig(iterations=5, warmup=1, throughput_iterations=1, latency_batch=8)
        )
    assert r.latency_batch == 8 and seen[:6] == [8] * 6


def test_benchmark_feeds_every_named_input():
    """A model of two inputs is timed with both: rows of the sample repeated to the batch sizes."""
    h = load_model(
        "zoo:text_encoder", [_ids("input_ids"), _ids("attention_mask")], 2, options={"vocab": 20, "dim": 8, "heads": 2}
    )
    sample = {"input_ids": np.ones((3, 6), np.int64), "attention_mask": np.ones((3, 6), np.int64)}
    with open_session("torch", h) as s:
        seen = []
        run = s.run

        def spy(feed):
            seen.append({k: v.shape for k, v in feed.items()})
            return run(feed)

        s.run = spy
        r = run_benchmark(s, sample, BenchConfig(iterations=5, warmup=1, throughput_iterations=1, throughput_batch=5))
    assert r.throughput_batch == 5 and r.iterations == 5
    assert seen[0] == {"input_ids": (1, 6), "attention_mask": (1, 6)}
    assert seen[-1] == {"input_ids": (5, 6), "attention_mask": (5, 6)}
