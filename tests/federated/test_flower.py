"""keiryo's Flower apps: the wire mod and the server's decoding in-process, the simulation engine with a client
crashing mid-round, and the same apps as real processes (a SuperLink and two SuperNodes on loopback).

These run in .venv-federated (no Flower release installs beside the dev extras: see the ``federated`` extra
in pyproject.toml); tests/integration/test_federated_env.py runs this folder there from the main suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from keiryo.data import load_data  # noqa: E402
from keiryo.errors import ConfigError  # noqa: E402
from keiryo.model import load_model  # noqa: E402
from keiryo.privacy.federated import CompressionConfig, FederatedConfig, LocalDPConfig, dp_record, run_federated  # noqa: E402
from keiryo.privacy.flower_apps import RESIDUAL_KEY, CompressedUpdates, decode_update, write_flower_project  # noqa: E402
from keiryo.tasks import get_task  # noqa: E402
from keiryo.train import evaluate_torch  # noqa: E402

MLP = {"hidden": [32]}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc.weight": rng.normal(size=(32, 64)).astype(np.float32), "fc.bias": rng.normal(size=32).astype(np.float32)}


def test_wire_mod_sends_compressed_deltas_the_server_decodes_and_keeps_the_residual_in_the_node_state():
    sent = _weights(0)
    trained = {k: v + _weights(1)[k] * 0.01 for k, v in sent.items()}
    msg = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def app(m: Message, c: Context) -> Message:
        body = {"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}), "metrics": MetricRecord({"num-examples": 10})}
        return Message(RecordDict(body), reply_to=m)

    reply = CompressedUpdates(CompressionConfig(top_k=0.1))(msg, ctx, app)
    wire = reply.content["arrays"]
    w = wire["fc.weight"]
    assert w.stype == "keiryo.topk-delta" and w.dtype == "int8" and w.shape == (205,)
    assert len(w.data) == 2048 // 8 + 205 + 4  # bitmask + int8 values + scale: 1/8 of the fp32 delta and less
    assert wire["fc.bias"].stype == "keiryo.delta" and len(wire["fc.bias"].data) == 32 * 4 + 4  # small: whole, fp32
    back = decode_update(wire, msg.content["arrays"])
    delta = back["fc.weight"].numpy() - sent["fc.weight"]
    true = trained["fc.weight"] - sent["fc.weight"]
    kept = np.abs(delta) > 0
    assert kept.sum() == 205 and np.abs(delta[kept] - true[kept]).max() <= np.abs(true).max() / 127
    assert np.allclose(back["fc.bias"].numpy(), trained["fc.bias"])
    residual = ctx.state.array_records[RESIDUAL_KEY]["fc.weight"].numpy()
    assert np.allclose(residual + delta, true, atol=1e-6)  # what was not sent waits for the next round


def test_config_and_dp_accounting():
    with pytest.raises(ConfigError, match="clients"):
        FederatedConfig.parse({"clients": 1})
    with pytest.raises(ConfigError, match="alpha"):
        FederatedConfig.parse({"alpha": 0})
    rec = dp_record(LocalDPConfig(epsilon=0.5, delta=1e-5, clipping_norm=1.0), {"0": 40, "1": 20, "2": 0})
    assert rec["per_client"]["1"]["epsilon_basic"] == 10.0 and rec["per_client"]["2"]["epsilon_rdp"] == 0.0
    assert rec["model"]["rounds"] == 40 and rec["model"]["epsilon_rdp"] < rec["model"]["epsilon_basic"]  # RDP is tighter
    assert rec["per_round"]["noise_std"] == pytest.approx((2 * np.log(1.25e5)) ** 0.5 / 0.5)  # Flower's LocalDpMod sigma


def test_simulation_goes_on_without_a_client_that_crashes_mid_round(tmp_path, monkeypatch, caplog):
    """5 simulated clients (Flower's simulation engine), FedAvg over int8 + top-k updates; client 1 raises in
    round 2: that round aggregates the other 4, the log and federated.json say so, the run finishes."""
    monkeypatch.setenv("KEIRYO_FAULT", "federate.client-1.round-2:raise")
    cfg = FederatedConfig.parse({"clients": 5, "rounds": 4, "alpha": 0.5, "model_options": MLP, "out": str(tmp_path)})
    with caplog.at_level("INFO", logger="flwr"):
        s = run_federated(cfg)
    err = caplog.text
    by_round = {r["round"]: r for r in s["rounds"]}
    assert [by_round[r]["clients_ok"] for r in (1, 2, 3, 4)] == [5, 4, 5, 5]
    assert by_round[2]["partitions"] == [0, 2, 3, 4]
    (fail,) = s["failures"]
    assert fail["round"] == 2 and fail["reason"] == "RuntimeError: injected client crash at federate.client-1.round-2"
    assert "keiryo: round 2: client node" in err and "RuntimeError: injected client crash" in err
    assert "the round goes on with the other 4 client(s)" in err
    # compressed updates: at least 8x fewer bytes than fp32 weights, every round
    assert all(r["fp32_bytes"] >= 8 * r["upload_bytes"] for r in s["rounds"])
    acc = [c["accuracy"] for c in s["curve"]]
    assert len(acc) == 5 and acc[-1] > acc[0] + 0.2, acc
    # the global model is a keiryo weights file like any trained one (compress / optimize / package take it)
    data = load_data("digits")
    h = load_model("zoo:mlp", data, options=MLP, weights=tmp_path / "model.safetensors")
    got = evaluate_torch(h, data.test, get_task("classification").bind(h.output_names))["accuracy"]
    written = json.loads((tmp_path / "federated.json").read_text())
    assert got == pytest.approx(s["test"]["accuracy"]) == pytest.approx(written["test"]["accuracy"])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_the_same_apps_as_real_processes_on_loopback(tmp_path):
    """flower-superlink, two flower-supernode processes and ``flwr run`` on 127.0.0.1: FedProx, Flower's
    LocalDpMod and the compressed updates, configured through the run config of the project keiryo writes."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path / "flwr")}
    env.pop("KEIRYO_FAULT", None)
    appio, fleet, control, *nodes = _free_ports(5)
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{control}"\ninsecure = true\n'
    )
    out = tmp_path / "out"
    cfg = FederatedConfig.parse(
        {
            "clients": 2,
            "rounds": 2,
            "model_options": MLP,
            "strategy": "fedprox",
            "proximal_mu": 0.1,
            "dp": {"epsilon": 0.9, "clipping_norm": 5.0},
            "out": str(out),
        }
    )
    app = write_flower_project(cfg, tmp_path / "app")
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> None:
        f = (logs / f"{name}.log").open("wb")
        cmd = [str(bindir / args[0]), *args[1:]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path))

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            f"--serverappio-api-address=127.0.0.1:{appio}",
            f"--fleet-api-address=127.0.0.1:{fleet}",
            f"--control-api-address=127.0.0.1:{control}",
        )
        for i, port in enumerate(nodes):
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                f"--superlink=127.0.0.1:{fleet}",
                f"--clientappio-api-address=127.0.0.1:{port}",
                f"--node-config=partition-id={i} num-partitions=2",
            )
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(app), "loopback", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 30
        while not (out / "federated.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (out / "federated.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    s = json.loads((out / "federated.json").read_text())
    assert "keiryo: round 2: 2 client update(s)" in run.stdout + run.stderr
    assert [r["clients_ok"] for r in s["rounds"]] == [2, 2] and s["config"]["strategy"] == "fedprox"
    assert all(r["fp32_bytes"] >= 8 * r["upload_bytes"] for r in s["rounds"])
    priv = s["privacy"]
    assert priv["per_client"]["0"]["rounds"] == 2 and priv["per_client"]["1"]["epsilon_basic"] == pytest.approx(1.8)
    assert priv["model"]["rounds"] == 2
    assert (out / "model.safetensors").stat().st_size > 0


def test_cli_writes_a_flower_project_for_real_supernodes(tmp_path, capsys):
    from keiryo.cli.main import main

    code = main(["federate", "--out", str(tmp_path / "o"), "--clients", "3", "--flower-project", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0 and "flower-superlink --insecure" in out and "num-partitions=3" in out
    text = (tmp_path / "p" / "pyproject.toml").read_text()
    assert 'serverapp = "keiryo.privacy.flower_apps:server_app"' in text and '"clients\\":3' in text
    assert main(["federate", "--out", str(tmp_path / "o"), "--updates", "fp16"]) == 2
