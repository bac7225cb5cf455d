"""Shared fixtures: small real data and tiny trained models, built once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from keiryo.data import DataSpec, load_data
from keiryo.model import ModelHandle, ModelSpec, load_model
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train

# tests/federated runs in .venv-federated (Flower cannot share this environment); here it is run by
# tests/integration/test_federated_env.py, not collected
collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["federated/*"]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Trusted TUF metadata and other caches go to a session folder, never the user's ~/.cache
    (a registry made anew at a reused temporary path must not meet an earlier run's pinned root)."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def classification(handle: ModelHandle):
    return get_task("classification").bind(handle.output_names)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits at their native 8x8, 1 channel."""
    return load_data(DataSpec(source="digits", calib_size=64))


@pytest.fixture(scope="session")
def tiny_trained(digits) -> ModelHandle:
    """keiryo.testing.tiny_cnn trained for a few epochs on digits (~5 s)."""
    h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"width": 8}), digits, output_name="logits")
    train(h, digits, classification(h), TrainConfig(epochs=15, lr=1e-2, patience=15), progress=False)
    return h


@pytest.fixture(scope="session")
def tiny_weights(tiny_trained, tmp_path_factory) -> Path:
    from keiryo.model import save_weights

    return save_weights(tiny_trained.module, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_results(tiny_trained, digits, tmp_path_factory):
    """One compress run (fp32, int8, int8-dynamic, fp16) shared by the tests that read its output."""
    from keiryo.benchmark import BenchConfig
    from keiryo.pipeline import RunOptions, compress, load_recipe
    from keiryo.search import Constraint

    out = tmp_path_factory.mktemp("compress") / "out"
    opts = RunOptions(bench=BenchConfig(iterations=20, warmup=3, throughput_iterations=3), progress=False)
    results = compress(
        tiny_trained,
        digits,
        [load_recipe(n) for n in ("int8", "int8-dynamic", "fp16")],
        out,
        constraints=[Constraint(metric="accuracy_drop", op="<=", bound=2.0)],
        opts=opts,
    )
    return out, results


@pytest.fixture(autouse=True)
def _threads():
    """Keep torch's thread count stable across tests (sessions change it)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_zoo_trained(digits) -> ModelHandle:
    """A small zoo MobileNetV2 (width 0.25) trained briefly on digits 8x8."""
    h = load_model(
        ModelSpec(source="zoo:mobilenetv2", options={"width": 0.25, "last_channel": 32}), digits, 10, output_name="logits"
    )
    train(h, digits, classification(h), TrainConfig(epochs=3), progress=False)
    return h


@pytest.fixture(scope="session")
def signed(tiny_results, tmp_path_factory):
    """Two signed packages of the tiny model (1.0.0 fp32, 2.0.0 int8), the signing keys and the results folder."""
    from keiryo.packages import keygen, package

    out, _ = tiny_results
    d = tmp_path_factory.mktemp("signed")
    priv, pub = keygen(d / "key.pem")
    v1 = package(out, name="tiny", version="1.0.0", private_key=priv, out=d / "tiny-1.0.0", candidate="fp32")
    v2 = package(out, name="tiny", version="2.0.0", private_key=priv, out=d / "tiny-2.0.0", candidate="int8")
    return {"v1": v1, "v2": v2, "priv": priv, "pub": pub, "results": out}
