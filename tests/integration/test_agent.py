"""``keiryo agent``: updates with TUF checks, health window, commit/rollback, anti-rollback floor,
the local endpoint, and what a restart finds after a kill or a power cut at every named point."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from keiryo.agent import Agent, AgentConfig, State
from keiryo.agent.agent import FAULT_POINTS
from keiryo.errors import RuntimeSessionError
from keiryo.packages import keygen, package
from keiryo.packages.store import PackageStore
from keiryo.testing.faults import run_killed

FAST = {"poll_s": 0.1, "health_window_s": 0.3, "health_interval_s": 0.1}


@pytest.fixture(scope="module")
def world(tiny_results, tmp_path_factory):
    """A registry with tiny 1.0.0 (fp32) and 2.0.0 (int8) published, production -> 1.0.0."""
    out, _ = tiny_results
    d = tmp_path_factory.mktemp("agent")
    priv, pub = keygen(d / "key.pem")
    pkgs = {
        v: package(out, name="tiny", version=v, private_key=priv, out=d / f"tiny-{v}", candidate=c)
        for v, c in (("1.0.0", "fp32"), ("2.0.0", "int8"))
    }
    return {"dir": d, "priv": priv, "pub": pub, "pkgs": pkgs, "results": out}


def _registry(world, path: Path, *, expiry_days=None) -> PackageStore:
    store = PackageStore(path, expiry_days=expiry_days)
    for v in ("1.0.0", "2.0.0"):
        store.push(world["pkgs"][v], world["pub"])
    store.promote("tiny", "1.0.0", "production")
    return store


def _agent(world, store: PackageStore, state: Path, **kw) -> Agent:
    cfg = AgentConfig(
        source=str(store.root),
        name="tiny",
        trusted_root=str(store.root / "tuf" / "1.root.json"),
        public_key=str(world["pub"]),
        state_dir=str(state),
        **{**FAST, **kw},
    )
    return Agent(cfg)


def _verifies(state: Path, world) -> str:
    """The version ``current`` points at, fully verified (signature, identity, golden vectors)."""
    from keiryo.packages.verified import load_verified

    target = Path(os.readlink(state / "current")).name.removeprefix("tiny-")
    _, session = load_verified(state / "versions" / f"tiny-{target}", world["pub"], name="tiny", version=target)
    session.close()
    return target


def test_install_update_commit_and_serve_locally(world, tmp_path, digits):
    from keiryo.agent.endpoint import Endpoint

    store = _registry(world, tmp_path / "reg")
    agent = _agent(world, store, tmp_path / "dev")
    assert agent.recover() is None and agent.check() == "updated"
    assert agent.active.version == "1.0.0" and agent.rec.committed.version == "1.0.0"
    x = digits.test.inputs["image"][:2].numpy()
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    with Endpoint(agent, port=0) as ep:
        url = f"http://127.0.0.1:{ep.port}"
        assert httpx.get(url + "/v2/health/ready").status_code == 200
        r = httpx.post(url + "/v2/models/tiny/infer", json=body)
        assert r.status_code == 200 and r.json()["model_version"] == "1.0.0"
        assert httpx.post(url + "/v2/models/other/infer", json=body).status_code == 404
        store.promote("tiny", "2.0.0", "production")
        assert agent.check() == "updated"
        r = httpx.post(url + "/v2/models/tiny/infer", json=body)
        assert r.status_code == 200 and r.json()["model_version"] == "2.0.0"
        assert agent.check() == "current"
    assert [e["event"] for e in agent.dir.events()] == ["swapped", "committed", "swapped", "committed"]
    assert agent.rec.committed.version == "2.0.0" and _verifies(tmp_path / "dev", world) == "2.0.0"
    # a restart serves the committed version straight from disk, verified
    again = _agent(world, store, tmp_path / "dev")
    assert again.recover() == "2.0.0"


def test_a_failed_health_window_rolls_back_within_the_window_and_says_why(world, tmp_path, digits):
    store = _registry(world, tmp_path / "reg")
    agent = _agent(world, store, tmp_path / "dev", health_window_s=1.0)
    agent.recover()
    assert agent.check() == "updated"
    store.promote("tiny", "2.0.0", "production")
    bad = {"image": np.zeros((1, 3, 3, 3), np.float32)}  # what a client of the old input shape would send

    def client():
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            act = agent.active
            if act is not None and act.version == "2.0.0":
                with pytest.raises(RuntimeSessionError, match="onnxruntime run failed"):
                    agent.infer(bad)
                return
            time.sleep(0.01)

    t = threading.Thread(target=client)
    t.start()
    start = time.monotonic()
    assert agent.check() == "rolled_back"
    took = time.monotonic() - start
    t.join()
    assert agent.active.version == "1.0.0" and took < 1.0 + 1.0  # back within one window (+ load time)
    last = agent.dir.events()[-1]
    assert last["event"] == "rollback" and last["reason"] == "health_errors" and last["to"] == "1.0.0"
    assert agent.check() == "rejected" and "2.0.0" in agent.rec.bad  # not retried until a newer alias record
    assert _verifies(tmp_path / "dev", world) == "1.0.0"


def test_the_floor_refuses_an_unsigned_downgrade_and_follows_a_signed_rollback(world, tmp_path):
    from keiryo.packages.trust import alias_entry, alias_target

    store = _registry(world, tmp_path / "reg")
    store.promote("tiny", "2.0.0", "production")
    agent = _agent(world, store, tmp_path / "dev")
    agent.recover()
    assert agent.check() == "updated" and agent.rec.committed.version == "2.0.0"
    # a registry that moves the alias back without saying it is a rollback (a bug, or a targets key misused)
    rec = {"version": "1.0.0", "serial": store.serial("tiny", "1.0.0"), "history": [], "rollback": False}
    store.trust.update_targets(lambda t: t.__setitem__(alias_target("tiny"), alias_entry("tiny", {"production": rec}, "2.0.0")))
    assert agent.check() == "refused" and agent.active.version == "2.0.0"
    assert agent.dir.events()[-1]["reason"] == "below_floor"
    # the registry's own downgrade commands sign a rollback: the device follows it
    store.promote("tiny", "2.0.0", "production")
    store.promote("tiny", "1.0.0", "production", downgrade=True)
    assert agent.check() == "updated" and agent.rec.committed.version == "1.0.0"


# -- attacks: one test per TUF attack class, each refused while the model keeps serving ---------------


@pytest.fixture()
def serving(world, tmp_path):
    """An agent serving 1.0.0 from a registry whose production alias was then moved to 2.0.0."""
    store = _registry(world, tmp_path / "reg")
    agent = _agent(world, store, tmp_path / "dev")
    agent.recover()
    assert agent.check() == "updated"
    return store, agent


def _meta(store, name):
    return store.root / "tuf" / name


def _refused(agent, rule: str) -> None:
    before = agent.active.version
    assert agent.check() == "refused"
    ev = agent.dir.events()[-1]
    assert ev["event"] == "refused" and rule in ev["detail"], ev
    assert agent.active.version == before and agent.rec.state == State.IDLE


def test_attack_rollback_replayed_old_timestamp(serving):
    store, agent = serving
    old = _meta(store, "timestamp.json").read_bytes()
    store.promote("tiny", "2.0.0", "staging")
    assert agent.check() == "current"  # the device has seen the newer timestamp
    _meta(store, "timestamp.json").write_bytes(old)
    _refused(agent, "version went back")


def test_attack_replayed_old_snapshot(serving):
    store, agent = serving
    v = store.trust.snapshot_md().signed.version
    store.promote("tiny", "2.0.0", "staging")
    shutil.copy(_meta(store, f"{v}.snapshot.json"), _meta(store, f"{v + 1}.snapshot.json"))
    _refused(agent, f"version went back or did not move (a rollback or replay): Expected snapshot version {v + 1}, got {v}")


def test_attack_freeze_expired_timestamp(world, tmp_path):
    store = _registry(world, tmp_path / "reg", expiry_days={"timestamp": 2 / 86400})
    agent = _agent(world, store, tmp_path / "dev")
    agent.recover()
    assert agent.check() == "updated"
    time.sleep(2.5)  # a mirror that stops updating: its timestamp expires
    _refused(agent, "expired")
    store.refresh()  # the real registry re-signs: the device carries on
    assert agent.check() == "current"


def test_attack_fast_forward_with_an_untrusted_key(serving):
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    store, agent = serving
    ts = Metadata.from_file(str(_meta(store, "timestamp.json")))
    ts.signed.version = 10**9
    ts.signatures.clear()
    ts.sign(CryptoSigner.generate_ed25519())
    ts.to_file(str(_meta(store, "timestamp.json")))
    _refused(agent, "not signed by the trusted keys")
    store.refresh()  # a real timestamp afterwards is still accepted: the device's version was not poisoned
    assert agent.check() == "current"


def test_attack_mix_and_match_targets_from_another_version(serving):
    store, agent = serving
    v = store.trust.targets_md().signed.version
    store.promote("tiny", "2.0.0", "production")
    shutil.copy(_meta(store, f"{v}.targets.json"), _meta(store, f"{v + 1}.targets.json"))
    _refused(agent, f"Expected targets v{v + 1}, got v{v}")


def test_attack_arbitrary_package_copied_in_by_hand(world, serving, tmp_path):
    """The first finding: a package signed for another name, copied under this name with the alias
    pointed at it by editing the metadata, without the registry's keys."""
    store, agent = serving
    other = package(
        world["results"], name="other", version="5.0.0", private_key=world["priv"], out=tmp_path / "o", candidate="fp32"
    )
    shutil.copytree(other, store.root / "packages" / "tiny" / "8.8.8")
    # the attacker edits the metadata to point production at it and bumps each role's version so
    # that clients fetch it; without the keys the old signatures are all they can leave in place
    v = store.trust.targets_md().signed.version
    docs = {
        r: json.loads(_meta(store, f).read_text())
        for r, f in (("targets", f"{v}.targets.json"), ("snapshot", f"{v}.snapshot.json"), ("timestamp", "timestamp.json"))
    }
    docs["targets"]["signed"]["targets"]["aliases/tiny"]["custom"]["keiryo"]["aliases"]["production"] = {
        "version": "8.8.8",
        "serial": 99,
        "history": [],
        "rollback": False,
    }
    docs["targets"]["signed"]["version"] = v + 1
    docs["snapshot"]["signed"]["version"] = v + 1
    docs["snapshot"]["signed"]["meta"]["targets.json"]["version"] = v + 1
    docs["timestamp"]["signed"]["version"] += 1
    docs["timestamp"]["signed"]["meta"]["snapshot.json"]["version"] = v + 1
    _meta(store, f"{v + 1}.targets.json").write_text(json.dumps(docs["targets"]))
    _meta(store, f"{v + 1}.snapshot.json").write_text(json.dumps(docs["snapshot"]))
    _meta(store, "timestamp.json").write_text(json.dumps(docs["timestamp"]))
    _refused(agent, "not signed by the trusted keys")
    assert agent.active.version == "1.0.0"


def test_attack_endless_data_target_longer_than_signed(serving):
    store, agent = serving
    store.promote("tiny", "2.0.0", "production")
    f = store.path("tiny@2.0.0") / "model.onnx"
    f.write_bytes(f.read_bytes() + b"\0" * 100_000)
    assert agent.check() == "rejected"
    ev = agent.dir.events()[-1]
    assert ev["reason"] == "download_or_verify" and "longer than its signed length" in ev["detail"]
    assert agent.active.version == "1.0.0" and not (agent.dir.version_dir("2.0.0")).exists()


def test_attack_endless_metadata(serving):
    store, agent = serving
    f = _meta(store, "timestamp.json")
    f.write_bytes(f.read_bytes() + b" " * 20_000)
    _refused(agent, "longer than allowed")


def test_a_changed_byte_and_a_package_signed_by_an_unknown_key_are_rejected(world, serving, tmp_path):
    store, agent = serving
    store.promote("tiny", "2.0.0", "production")
    f = store.path("tiny@2.0.0") / "model.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert agent.check() == "rejected" and "sha256 does not match" in agent.dir.events()[-1]["detail"]
    # a package the registry accepted under another signer's key: the device's key refuses it
    spriv, spub = keygen(tmp_path / "stranger.pem")
    pkg = package(world["results"], name="tiny", version="3.0.0", private_key=spriv, out=tmp_path / "s3", candidate="fp32")
    store.push(pkg, spub)
    store.promote("tiny", "3.0.0", "production")
    assert agent.check() == "rejected"
    ev = agent.dir.events()[-1]
    assert ev["reason"] == "download_or_verify" and "not made with" in ev["detail"]
    assert agent.active.version == "1.0.0"


def test_bad_input_missing_trusted_root_and_unknown_package(world, serving, tmp_path):
    store, agent = serving
    cfg = agent.cfg.model_copy(update={"trusted_root": str(tmp_path / "nope.json"), "state_dir": str(tmp_path / "fresh")})
    fresh = Agent(cfg)
    assert fresh.check() == "refused" and "nope.json" in fresh.dir.events()[-1]["detail"]
    cfg = agent.cfg.model_copy(update={"name": "ghost", "state_dir": str(tmp_path / "ghost")})
    ghost = Agent(cfg)
    assert ghost.check() == "refused" and "no package named 'ghost'" in ghost.dir.events()[-1]["detail"]


def test_offline_mode_serves_within_the_maximum_staleness_only(world, serving):
    store, agent = serving
    cfg = agent.cfg.model_copy(update={"offline": True, "max_staleness_s": 0.5})
    off = Agent(cfg)
    assert off.recover() == "1.0.0" and off.check() == "offline"
    x = {"image": np.zeros((1, 1, 8, 8), np.float32)}
    off.rec = off.rec.model_copy(update={"last_check": time.time()})
    assert off.infer(x)[0].version == "1.0.0"
    time.sleep(0.6)
    with pytest.raises(Exception, match="stale: the last good update check was"):
        off.infer(x)


# -- crash and power-loss matrix --------------------------------------------------------------------

ROLLBACK_POINTS = ["agent.rollback.mid", "agent.rollback.done"]
POINTS = [p for p in FAULT_POINTS if p not in ROLLBACK_POINTS]


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory):
    """A device committed to 1.0.0 whose registry now says 2.0.0 (and a copy where 2.0.0 fails its health check)."""
    d = tmp_path_factory.mktemp("crash")
    store = _registry(world, d / "reg")
    agent = _agent(world, store, d / "dev")
    agent.recover()
    assert agent.check() == "updated"
    store.promote("tiny", "2.0.0", "production")
    return store, d / "dev"


def _child(world, store, state, fault: str, **kw) -> int | None:
    """One update cycle in a forked child that SIGKILLs itself at ``fault``; returns its signal."""

    def cycle():
        a = _agent(world, store, state, **kw)
        a.recover()
        a.check()

    return run_killed(fault, cycle)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "powerloss"])
def test_crash_matrix_every_restart_serves_a_verified_model_and_converges(world, baseline, tmp_path, mode):
    store, base = baseline
    trials = 0
    for point in POINTS + ROLLBACK_POINTS:
        state = tmp_path / f"{mode}-{point}"
        shutil.copytree(base, state, symlinks=True)
        kw = {"max_errors": 0}
        if point in ROLLBACK_POINTS:
            kw["health_command"] = "exit 7"  # 2.0.0 fails its health check: the rollback path runs
        fault = point if mode == "kill" else f"{point}:powerloss"
        assert _child(world, store, state, fault, **kw) == signal.SIGKILL, f"{point} was never reached"
        # the restart: a complete, verified model serves, never a mix
        a = _agent(world, store, state, **kw)
        served = a.recover()
        assert served in ("1.0.0", "2.0.0") and a.active.version == served, point
        assert _verifies(state, world) == served, point
        if served == "2.0.0":  # only ever after the commit was durable
            assert a.rec.committed.version == "2.0.0", point
        # the next run converges
        outcome = a.check()
        want = "1.0.0" if point in ROLLBACK_POINTS else "2.0.0"
        assert a.rec.committed.version == want and a.active.version == want, (point, outcome)
        assert a.rec.state == State.IDLE and not list((state / "versions").glob(".*")), point
        trials += 1
    assert trials == len(POINTS + ROLLBACK_POINTS) >= 12


def test_the_agent_runs_without_torch(world, baseline, tmp_path):
    store, base = baseline
    state = tmp_path / "dev"
    shutil.copytree(base, state, symlinks=True)
    code = f"""
import sys, json
sys.modules["torch"] = None  # any import of torch now fails
from keiryo.agent import Agent, AgentConfig
cfg = AgentConfig(source={str(store.root)!r}, name="tiny", trusted_root={str(store.root / "tuf" / "1.root.json")!r},
                  public_key={str(world["pub"])!r}, state_dir={str(state)!r}, health_window_s=0.2, health_interval_s=0.1)
a = Agent(cfg)
a.recover()
print(json.dumps([a.check(), a.active.version, "torch" in sys.modules and sys.modules["torch"] is not None]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["updated", "2.0.0", False]


def test_an_encrypted_package_is_decrypted_in_memory_and_refused_without_its_key(world, tmp_path, monkeypatch):
    """Server and agent load an AES-256-GCM encrypted model with the device's key, never writing plaintext;
    without the key the update is refused naming the key's fingerprint and the old model keeps serving."""
    from keiryo.privacy.encryption import write_x25519_pair

    dev_priv, dev_pub = write_x25519_pair(tmp_path / "device.pem")
    enc = package(
        world["results"],
        name="tiny",
        version="3.0.0",
        private_key=world["priv"],
        out=tmp_path / "enc",
        candidate="int8",
        encrypt_to=dev_pub,
    )
    plain = (world["pkgs"]["2.0.0"] / "model.onnx").read_bytes()
    assert (enc / "model.onnx").read_bytes() != plain
    store = _registry(world, tmp_path / "reg")
    agent = _agent(world, store, tmp_path / "dev")
    agent.recover()
    assert agent.check() == "updated"
    store.push(enc, world["pub"])
    store.promote("tiny", "3.0.0", "production")
    monkeypatch.delenv("KEIRYO_DECRYPTION_KEY", raising=False)
    assert agent.check() == "rejected" and agent.active.version == "1.0.0"
    assert "the model is encrypted for key sha256:" in agent.dir.events()[-1]["detail"]
    keyed = Agent(agent.cfg.model_copy(update={"decryption_key": str(dev_priv), "state_dir": str(tmp_path / "dev2")}))
    keyed.recover()
    assert keyed.check() == "updated" and keyed.active.version == "3.0.0"
    x = {"image": np.zeros((1, 1, 8, 8), np.float32)}
    assert keyed.infer(x)[1]["logits"].shape == (1, 10)
    # the plaintext model is nowhere on the device's disk
    assert not any(f.is_file() and f.read_bytes() == plain for f in (tmp_path / "dev2").rglob("*"))


def test_agent_cli_check_and_status(world, tmp_path, capsys):
    from test_cli import one_line_error, run_cli

    store = _registry(world, tmp_path / "reg")
    args = ["--source", str(store.root), "--name", "tiny", "--trusted-root", str(store.root / "tuf" / "1.root.json")]
    args += ["--public-key", str(world["pub"]), "--state-dir", str(tmp_path / "dev")]
    code, out, err = run_cli("agent", "check", *args, "--health-window-s", "0.2", capsys=capsys)
    assert code == 0, err
    assert json.loads(out) == {"outcome": "updated", "active": "1.0.0"}
    code, out, _ = run_cli("agent", "status", "--state-dir", str(tmp_path / "dev"), "--name", "tiny", capsys=capsys)
    st = json.loads(out)
    assert st["current"] == "1.0.0" and st["committed"]["version"] == "1.0.0" and st["events"][-1]["event"] == "committed"
    code, _, err = run_cli("agent", "check", *args[:-2], "--state-dir", str(tmp_path / "d2"), "--name", "../x", capsys=capsys)
    assert code != 0 and "package name" in one_line_error(err)


def test_a_download_that_breaks_off_is_resumed_and_never_blacklisted(world, tmp_path):
    """Over HTTP, the connection drops halfway through the model file: the cycle ends "unavailable" (the
    version is not refused, the old model serves), and the next cycle asks for the rest with a Range
    request and commits."""
    from http.server import ThreadingHTTPServer

    from keiryo.packages.http import _handler

    store = _registry(world, tmp_path / "reg")
    ranges: list[str] = []
    cut = {"once": True}
    base = _handler(store.root.resolve())

    class Flaky(base):
        def do_GET(self):
            if self.path.endswith("/2.0.0/model.onnx"):
                ranges.append(self.headers.get("Range", ""))
                if cut.pop("once", False):
                    data = (store.root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.close()  # the link drops
                    return
            super().do_GET()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        agent = _agent(world, store, tmp_path / "dev")
        agent = Agent(agent.cfg.model_copy(update={"source": f"http://127.0.0.1:{srv.server_address[1]}/"}))
        agent.recover()
        assert agent.check() == "updated"
        store.promote("tiny", "2.0.0", "production")
        assert agent.check() == "unavailable" and agent.active.version == "1.0.0"
        assert agent.dir.events()[-1]["reason"] == "transfer" and "2.0.0" not in agent.rec.bad
        assert agent.check() == "updated" and agent.active.version == "2.0.0"
        assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed, not restarted
    finally:
        srv.shutdown()
