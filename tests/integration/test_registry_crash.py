"""Registry, TUF metadata and package writes killed (SIGKILL, power cut) at every named point: a restart
finds the old state or the new, never a mix; no stray folder breaks a later command; torn log lines
are tolerated; the log is written ahead of the change it records. Relative paths work everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import run_cli

from keiryo.packages import package, verify
from keiryo.packages.store import PackageStore
from keiryo.testing.faults import run_killed

PUSH_POINTS = [
    "registry.push.copied",
    "registry.push.renamed",
    "registry.push.logged",
    "tuf.targets_written",
    "tuf.snapshot_written",
]
ALIAS_POINTS = ["registry.promote.logged", "tuf.targets_written", "tuf.snapshot_written"]


@pytest.mark.parametrize("mode", ["", ":powerloss"])
def test_push_killed_anywhere_is_invisible_and_can_be_redone(signed, tmp_path, mode):
    for point in PUSH_POINTS:
        store = PackageStore(tmp_path / f"r-{point}{mode}")
        store.push(signed["v1"], signed["pub"])
        store.promote("tiny", "1.0.0", "production")
        assert run_killed(point + mode, lambda s=store: s.push(signed["v2"], signed["pub"])) == signal.SIGKILL, point
        # readers see the state before the push: old versions, old aliases; show/list/log all work
        assert store.versions("tiny") == ["1.0.0"] and store.resolve("tiny@production") == ("tiny", "1.0.0"), point
        assert store.show("tiny")["version"] == "1.0.0"
        log = store.log("tiny")
        if point in ("registry.push.logged", "tuf.targets_written", "tuf.snapshot_written"):
            assert log[-1]["action"] == "push" and log[-1]["committed"] is False  # written ahead, never applied
        # and the push can be redone: leftovers are cleared, the version is published once
        assert store.push(signed["v2"], signed["pub"]) == ("tiny", "2.0.0"), point
        assert store.versions("tiny") == ["1.0.0", "2.0.0"]
        assert not [p for p in (store.root / "packages" / "tiny").iterdir() if p.name.startswith(".")], point


def test_promote_and_rollback_killed_anywhere_leave_the_old_alias(signed, tmp_path):
    for point in ALIAS_POINTS:
        store = PackageStore(tmp_path / f"r-{point}")
        for v in ("v1", "v2"):
            store.push(signed[v], signed["pub"])
        store.promote("tiny", "1.0.0", "production")
        assert run_killed(point, lambda s=store: s.promote("tiny", "2.0.0", "production")) == signal.SIGKILL
        assert store.resolve("tiny@production") == ("tiny", "1.0.0"), point
        assert store.promote("tiny", "2.0.0", "production") == "1.0.0"
        fault = point.replace("promote", "rollback")
        assert run_killed(fault, lambda s=store: s.rollback("tiny", "production")) == signal.SIGKILL
        assert store.resolve("tiny@production") == ("tiny", "2.0.0"), point
        assert store.rollback("tiny", "production") == ("2.0.0", "1.0.0")
        applied = [(e["action"], e["committed"]) for e in store.log("tiny") if e["action"] != "push"]
        assert applied[-1] == ("rollback", True) and ("promote", False) in applied


def test_a_torn_log_line_is_skipped_and_the_next_entry_starts_on_its_own_line(signed, tmp_path, capsys):
    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    with open(store.root / "log" / "tiny.jsonl", "a") as f:
        f.write('{"time": "2026-11-30T00:00:00Z", "act')  # a crash mid-append
    reg = ["--registry", str(store.root)]
    for args in (["list"], ["show", "tiny"], ["promote", "tiny@1.0.0", "--alias", "production"], ["log", "tiny"]):
        code, out, err = run_cli("registry", *args, *reg, capsys=capsys)
        assert code == 0, (args, err)
    assert [e["action"] for e in store.log("tiny")] == ["push", "promote"]
    lines = (store.root / "log" / "tiny.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["action"] == "promote"


def test_a_stray_partial_folder_breaks_nothing(signed, tmp_path, capsys):
    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    (store.root / "packages" / "tiny" / ".2.0.0.partial-abc" / "pkg").mkdir(parents=True)
    (store.root / "packages" / "tiny" / "9.9.9").mkdir()  # a push killed after its rename, never committed
    assert store.versions("tiny") == ["1.0.0"] and store.show("tiny")["version"] == "1.0.0"
    code, out, _ = run_cli("registry", "show", "tiny", "--registry", str(store.root), capsys=capsys)
    assert code == 0 and json.loads(out)["version"] == "1.0.0"
    store.push(signed["v2"], signed["pub"])
    assert sorted(p.name for p in (store.root / "packages" / "tiny").iterdir()) == ["1.0.0", "2.0.0", "9.9.9"]


@pytest.mark.parametrize("point", ["package.signed", "atomic_dir.before_swap", "atomic_dir.mid_swap"])
def test_package_overwrite_killed_mid_swap_never_loses_the_old_package(signed, tmp_path, point):
    out = tmp_path / "pkg"
    package(signed["results"], name="tiny", version="1.0.0", private_key=signed["priv"], out=out, candidate="fp32")

    def again():
        package(
            signed["results"], name="tiny", version="1.0.1", private_key=signed["priv"], out=out, candidate="int8", overwrite=True
        )

    assert run_killed(point, again) == signal.SIGKILL
    # whatever the kill left, the package verifies (old or new, whole); the next overwrite succeeds
    rep = verify(out, signed["pub"])
    assert rep["manifest"]["version"] in ("1.0.0", "1.0.1")
    again()
    assert verify(out, signed["pub"])["manifest"]["version"] == "1.0.1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_quick_start_works_with_relative_paths(signed, tmp_path):
    """verify, registry push, serve --registry and deploy docker, all given paths relative to the cwd."""
    import shutil

    shutil.copytree(signed["v1"], tmp_path / "pk" / "tiny-1.0.0")
    shutil.copy(signed["pub"], tmp_path / "pub.pem")
    exe = str(Path(sys.executable).parent / "keiryo")

    def cli(*args):
        return subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    for args in (
        ["verify", "pk/tiny-1.0.0", "--public-key", "pub.pem"],
        ["registry", "push", "pk/tiny-1.0.0", "--public-key", "pub.pem", "--registry", "reg"],
        ["registry", "promote", "tiny@1.0.0", "--alias", "production", "--registry", "reg"],
        ["deploy", "docker", "pk/tiny-1.0.0", "--public-key", "pub.pem", "--out", "ctx"],
    ):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stderr)
    assert (tmp_path / "ctx" / "registry" / "tuf" / "1.root.json").is_file() and not (tmp_path / "ctx" / "registry.keys").exists()
    # serve --registry reg (relative) loads and verifies the model: the app starts and answers ready
    from fastapi.testclient import TestClient

    from keiryo.serve import ServeSettings, create_app

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        settings = ServeSettings(
            models=["tiny@production"], public_key="pub.pem", api_keys=["k" * 16], poll_s=None, tuf_cache=str(tmp_path / "cache")
        )
        with TestClient(create_app("reg", settings)) as c:
            assert c.get("/v2/health/ready").status_code == 200
    finally:
        os.chdir(cwd)


def test_deploy_agent_writes_a_systemd_unit_and_refuses_injection(signed, tmp_path, capsys):
    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    root = store.root / "tuf" / "1.root.json"
    base = ["deploy", "agent", str(signed["v1"]), "--public-key", str(signed["pub"]), "--trusted-root", str(root)]
    code, out, err = run_cli(*base, "--source", "http://registry.local:8100/", "--out", str(tmp_path / "a"), capsys=capsys)
    assert code == 0, err
    unit = (tmp_path / "a" / "keiryo-agent-tiny.service").read_text()
    assert 'agent run --source "http://registry.local:8100/" --name tiny --alias production' in unit
    assert "StateDirectory=keiryo/tiny" in unit and "Restart=always" in unit and "NoNewPrivileges=yes" in unit
    assert (tmp_path / "a" / "root.json").read_bytes() == root.read_bytes()
    code, _, err = run_cli(*base, "--source", 'http://x/"\nExecStartPre=/bin/sh', "--out", str(tmp_path / "b"), capsys=capsys)
    assert code != 0 and "no spaces or quotes" in err and not (tmp_path / "b").exists()
