import numpy as np
import pytest

from keiryo.benchmark import BenchConfig, measure_file, run_benchmark
from keiryo.errors import ConfigError, InputFileError, RuntimeSessionError
from keiryo.export import export
from keiryo.runtime import RUNTIMES, Session, open_session


@pytest.fixture(scope="module")
def tiny_onnx(tiny_trained, tmp_path_factory):
    return export(tiny_trained, "onnx", tmp_path_factory.mktemp("rt") / "tiny.onnx")


def _source(name, tiny_trained, tiny_onnx):
    return {"onnxruntime": tiny_onnx.path, "torch": tiny_trained, "fake": None}[name]


@pytest.mark.parametrize("name", ["fake", "onnxruntime", "torch"])
def test_every_runtime_follows_the_session_protocol(name, tiny_trained, tiny_onnx, digits):
    assert name in RUNTIMES or name in ("fake", "onnxruntime", "torch")
    x = digits.test.x[:4].numpy()
    with open_session(name, _source(name, tiny_trained, tiny_onnx), threads=1) as s:
        assert isinstance(s, Session)
        assert s.threads == 1
        out = s.run(x)
        same = s.run({s.input_names[0]: x})
    assert isinstance(out, list) and np.array_equal(out[0], same[0])
    assert out[0].shape[0] == 4


def test_onnxruntime_matches_torch(tiny_trained, tiny_onnx, digits):
    x = digits.test.x[:32].numpy()
    with open_session("torch", tiny_trained) as t, open_session("onnxruntime", tiny_onnx.path) as o:
        assert np.abs(t.run(x)[0] - o.run(x)[0]).max() < 1e-4


def test_session_errors(tiny_onnx, tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        open_session("tensorrt", tiny_onnx.path)
    with open_session("onnxruntime", tiny_onnx.path) as s:
        with pytest.raises(RuntimeSessionError, match="input names"):
            s.run({"wrong": np.zeros((1, 1, 8, 8), np.float32)})
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputFileError, match="corrupt.onnx: onnxruntime cannot load this model"):
        open_session("onnxruntime", bad)


def test_run_benchmark_reports_ordered_percentiles():
    with open_session("fake", None) as s:
        r = run_benchmark(s, np.zeros((1, 4), np.float32), BenchConfig(iterations=50, warmup=2, throughput_iterations=2))
        assert s.calls == 2 + 50 + 1 + 2
    assert 0 < r.latency_p50_ms <= r.latency_p95_ms <= r.latency_p99_ms
    assert r.iterations == 50 and r.threads == 1 and r.throughput_per_s > 0


def test_measure_file_runs_isolated_and_reports_its_own_peak_rss(tiny_onnx, digits):
    r = measure_file(tiny_onnx.path, "onnxruntime", digits.test.x[:1].numpy(), BenchConfig(iterations=10, warmup=2))
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
