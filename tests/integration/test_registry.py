"""The filesystem registry: immutable versions, aliases, promotion log, rollback, concurrency, refusals."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import pytest
from test_cli import one_line_error, run_cli

from keiryo.errors import ConfigError, IntegrityError, PackageNotFoundError
from keiryo.packages import keygen
from keiryo.packages.store import PackageStore


def test_push_promote_rollback_and_log(signed, tmp_path):
    store = PackageStore(tmp_path / "r")
    assert store.push(signed["v1"], signed["pub"], by="ci") == ("tiny", "1.0.0")
    store.push(signed["v2"], signed["pub"], by="ci")
    assert store.versions("tiny") == ["1.0.0", "2.0.0"] and store.resolve("tiny") == ("tiny", "2.0.0")
    assert store.promote("tiny", "1.0.0", "production", by="alice") is None
    assert store.promote("tiny", "2.0.0", "production", by="bob") == "1.0.0"
    assert store.resolve("tiny@production") == ("tiny", "2.0.0") and store.resolve("tiny@1.0.0") == ("tiny", "1.0.0")
    assert store.show("tiny@production")["aliases"] == ["production"]
    assert store.rollback("tiny", "production", by="carol") == ("2.0.0", "1.0.0")
    assert store.resolve("tiny@production") == ("tiny", "1.0.0")
    with pytest.raises(ConfigError, match="no earlier version to roll back to"):
        store.rollback("tiny", "production")
    log = store.log("tiny")
    assert [(e["action"], e.get("from"), e.get("to") or e.get("version"), e["by"]) for e in log] == [
        ("push", None, "1.0.0", "ci"),
        ("push", None, "2.0.0", "ci"),
        ("promote", None, "1.0.0", "alice"),
        ("promote", "1.0.0", "2.0.0", "bob"),
        ("rollback", "2.0.0", "1.0.0", "carol"),
    ]
    assert all(e["time"].endswith("Z") for e in log)


def test_versions_are_immutable_and_bad_input_is_refused(signed, tmp_path):
    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    with pytest.raises(ConfigError, match="already published; versions are immutable"):
        store.push(signed["v1"], signed["pub"])
    bad = tmp_path / "bad"
    shutil.copytree(signed["v2"], bad)
    (bad / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="changed: model.onnx"):
        store.push(bad, signed["pub"])
    _, other = keygen(tmp_path / "other.pem")
    with pytest.raises(IntegrityError, match="not made with"):
        store.push(signed["v2"], other)
    assert store.versions("tiny") == ["1.0.0"]  # nothing half-published
    assert not [p for p in (store.root / "packages" / "tiny").iterdir() if p.name.startswith(".")]
    for ref, exc in [("../etc", ConfigError), ("tiny@nope", PackageNotFoundError), ("ghost", PackageNotFoundError)]:
        with pytest.raises(exc):
            store.resolve(ref)
    with pytest.raises(ConfigError, match="alias"):
        store.promote("tiny", "1.0.0", "../prod")
    with pytest.raises(PackageNotFoundError):
        store.promote("tiny", "9.9.9", "production")


def _push(root, pkg, pub, q):
    try:
        PackageStore(root).push(pkg, pub)
        q.put("ok")
    except ConfigError as e:
        q.put(str(e))


def test_concurrent_publishers_of_one_version_one_wins(signed, tmp_path):
    root = tmp_path / "r"
    q: mp.Queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_push, args=(root, signed["v1"], signed["pub"], q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(q.get(timeout=5) for _ in procs)
    assert got.count("ok") == 1 and all("already published" in g for g in got if g != "ok")
    assert PackageStore(root).versions("tiny") == ["1.0.0"]
    assert [e["action"] for e in PackageStore(root).log("tiny")] == ["push"]


def test_registry_cli(signed, tmp_path, capsys):
    reg = ["--registry", str(tmp_path / "r")]
    code, out, err = run_cli("registry", "push", str(signed["v1"]), "--public-key", str(signed["pub"]), *reg, capsys=capsys)
    assert code == 0 and "pushed tiny 1.0.0" in out, err
    code, out, _ = run_cli("registry", "promote", "tiny@1.0.0", "--alias", "staging", *reg, "--by", "dana", capsys=capsys)
    assert code == 0 and "tiny@staging: (none) -> 1.0.0" in out
    code, out, _ = run_cli("registry", "show", "tiny@staging", *reg, capsys=capsys)
    shown = json.loads(out)
    assert shown["version"] == "1.0.0" and shown["aliases"] == ["staging"] and shown["format"] == "onnx"
    code, out, _ = run_cli("registry", "list", *reg, capsys=capsys)
    assert code == 0 and "staging -> 1.0.0" in out
    code, out, _ = run_cli("registry", "log", "tiny", *reg, capsys=capsys)
    assert [json.loads(line)["action"] for line in out.splitlines()] == ["push", "promote"]
    code, _, err = run_cli("registry", "rollback", "tiny", "--alias", "staging", *reg, capsys=capsys)
    assert code != 0 and "no earlier version" in one_line_error(err)
    code, _, err = run_cli("registry", "show", "tiny@prod", *reg, capsys=capsys)
    assert code != 0 and "has no alias or version 'prod'" in one_line_error(err)


def test_a_pushed_package_is_its_names_latest_for_clients_before_any_alias(signed, tmp_path):
    from keiryo.packages.remote import open_registry

    store = PackageStore(tmp_path / "reg")
    store.push(signed["v1"], signed["pub"])
    reg = open_registry(store.root, None, tmp_path / "cache")
    assert reg.names() == ["tiny"] and reg.resolve("tiny") == ("tiny", "1.0.0") and reg.aliases("tiny") == []
    store.push(signed["v2"], signed["pub"])
    reg.refresh()
    assert reg.resolve("tiny") == ("tiny", "2.0.0")
