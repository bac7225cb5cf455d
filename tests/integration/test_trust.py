"""The registry's TUF metadata: roles, thresholds, key rotation followed by clients, identity binding,
the read-only HTTP server, and the server refusing stale or replayed metadata while it keeps serving."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from keiryo.errors import ConfigError, IntegrityError, TrustError
from keiryo.packages.http import make_server
from keiryo.packages.remote import TrustedRegistry
from keiryo.packages.store import PackageStore
from keiryo.packages.verified import load_verified


def _client(store, tmp_path, name="c"):
    return TrustedRegistry(store.root, store.root / "tuf" / "1.root.json", tmp_path / name)


def test_roles_keys_expiry_and_custom_fields(signed, tmp_path):
    store = PackageStore(tmp_path / "r")
    store.init(root_keys=3, root_threshold=2)
    store.push(signed["v1"], signed["pub"])
    store.promote("tiny", "1.0.0", "production")
    root = store.trust.root_md().signed
    keyids = {role: set(root.roles[role].keyids) for role in ("root", "targets", "snapshot", "timestamp")}
    assert len(keyids["root"]) == 3 and root.roles["root"].threshold == 2
    assert all(not (keyids[a] & keyids[b]) for a in keyids for b in keyids if a < b)  # a key per role
    assert len(store.trust.root_md().signatures) == 3
    targets = store.trust.targets()
    manifest = targets["packages/tiny/1.0.0/keiryo.json"]
    assert manifest.custom["keiryo"] == {
        "name": "tiny",
        "version": "1.0.0",
        "serial": 1,
        "files": ["keiryo.json", "model.onnx", "model.sig"],
    }
    assert targets["packages/tiny/1.0.0/model.onnx"].length == (signed["v1"] / "model.onnx").stat().st_size
    assert targets["aliases/tiny"].custom["keiryo"]["aliases"]["production"]["version"] == "1.0.0"
    ts, snap, tg = store.trust.timestamp_md().signed, store.trust.snapshot_md().signed, store.trust.targets_md().signed
    assert (ts.version, snap.version, tg.version) == (3, 3, 3)  # init, push, promote: strictly increasing
    assert ts.expires < snap.expires < tg.expires < root.expires
    c = _client(store, tmp_path)
    assert c.refresh() == 3 and c.resolve("tiny@production") == ("tiny", "1.0.0") and c.resolve("tiny") == ("tiny", "1.0.0")
    with pytest.raises(ConfigError, match="already has TUF metadata"):
        store.init()
    with pytest.raises(ConfigError, match="root threshold 4"):
        PackageStore(tmp_path / "r2").init(root_keys=3, root_threshold=4)


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_key_rotation_is_followed_by_clients_and_old_keys_stop_working(signed, tmp_path, role):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    store = PackageStore(tmp_path / "r")
    store.init(root_keys=3, root_threshold=2)
    store.push(signed["v1"], signed["pub"])
    c = _client(store, tmp_path)
    c.refresh()
    old_key = next(store.trust.keys.glob(f"{role}*.pem"))
    old = CryptoSigner(load_pem_private_key(old_key.read_bytes(), None))
    store.trust.rotate(role)
    store.promote("tiny", "1.0.0", "production")
    assert c.refresh() and c.resolve("tiny@production") == ("tiny", "1.0.0")  # followed the new root
    assert list(store.trust.keys.glob("*.revoked-*.pem"))
    root = store.trust.root_md().signed
    assert (len(root.roles["root"].keyids), root.roles["root"].threshold) == (3, 2)  # rotation keeps the shape
    store.trust.rotate(role)  # and again: a client offline through both rotations walks the chain
    store.refresh()
    assert _client(store, tmp_path, "late").refresh() and c.refresh()
    if role == "timestamp":  # a timestamp signed with the revoked key is refused
        ts = Metadata.from_file(str(store.root / "tuf" / "timestamp.json"))
        ts.signed.version += 1
        ts.signatures.clear()
        ts.sign(old)
        ts.to_file(str(store.root / "tuf" / "timestamp.json"))
        with pytest.raises(TrustError, match="not signed by the trusted keys"):
            c.refresh()


def test_a_package_is_bound_to_its_name_and_version(signed, tmp_path):
    with pytest.raises(IntegrityError, match="the signed manifest is tiny 1.0.0, but it is published as tiny 8.8.8"):
        load_verified(signed["v1"], signed["pub"], name="tiny", version="8.8.8")
    bad = tmp_path / "bad"
    shutil.copytree(signed["v1"], bad)
    m = json.loads((bad / "keiryo.json").read_text())
    m["model_file"] = "../../etc/passwd"
    (bad / "keiryo.json").write_text(json.dumps(m))
    from keiryo.packages.signing import sign_dir

    sign_dir(bad, signed["priv"])
    with pytest.raises(IntegrityError, match="expected a plain file name inside the package"):
        load_verified(bad, signed["pub"])
    (bad / "link").symlink_to("/etc/hostname")
    with pytest.raises(IntegrityError, match="link is not a plain file"):
        load_verified(bad, signed["pub"])


def test_the_read_only_http_server_serves_metadata_and_packages_only(signed, tmp_path):
    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    (store.root / "packages" / "tiny" / ".9.partial-1-x").mkdir()
    (store.root / "packages" / "tiny" / ".9.partial-1-x" / "f").write_text("half")
    srv = make_server(store.root, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert httpx.get(url + "/tuf/timestamp.json").status_code == 200
        body = (signed["v1"] / "model.onnx").read_bytes()
        r = httpx.get(url + "/packages/tiny/1.0.0/model.onnx", headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == body[100:]
        for path in (
            "/.lock",
            "/log/tiny.jsonl",
            "/packages/tiny/.9.partial-1-x/f",
            "/tuf/../.lock",
            "/%2e%2e/etc/passwd",
            "/packages/tiny/1.0.0/../../../../etc/passwd",
        ):
            assert httpx.get(url + path).status_code == 404, path
        # a client over HTTP resolves and fetches as over a directory
        c = TrustedRegistry(url, store.root / "tuf" / "1.root.json", tmp_path / "c")
        files, trusted = c.fetch_package("tiny", "1.0.0")
        assert files["model.onnx"] == body
    finally:
        srv.shutdown()


def test_the_server_refuses_stale_or_replayed_metadata_and_keeps_serving(signed, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from keiryo.serve import ServeSettings, create_app

    store = PackageStore(tmp_path / "r", expiry_days={"timestamp": 3 / 86400})
    store.push(signed["v1"], signed["pub"])
    store.push(signed["v2"], signed["pub"])
    store.promote("tiny", "1.0.0", "production")
    old_ts = (store.root / "tuf" / "timestamp.json").read_bytes()
    settings = ServeSettings(
        models=["tiny@production"],
        public_key=str(signed["pub"]),
        api_keys=["k" * 16],
        poll_s=0.2,
        tuf_cache=str(tmp_path / "cache"),
    )
    H = {"Authorization": "Bearer " + "k" * 16}
    with TestClient(create_app(store.root, settings)) as c:
        meta = lambda: c.get("/v2/models/tiny", headers=H).json()["versions"]  # noqa: E731
        assert meta() == ["1.0.0"]
        store.promote("tiny", "2.0.0", "production")
        deadline = time.time() + 10
        while meta() != ["2.0.0"] and time.time() < deadline:
            time.sleep(0.1)
        assert meta() == ["2.0.0"]
        new_ts = (store.root / "tuf" / "timestamp.json").read_bytes()
        (store.root / "tuf" / "timestamp.json").write_bytes(old_ts)  # a replayed timestamp pointing at 1.0.0
        time.sleep(1.0)
        assert meta() == ["2.0.0"] and c.get("/v2/health/ready").status_code == 200
        (store.root / "tuf" / "timestamp.json").write_bytes(new_ts)
        time.sleep(3.5)  # then nothing is re-signed: the newest timestamp expires (a frozen registry)
        assert meta() == ["2.0.0"]
    logged = caplog.text
    assert "version went back" in logged and "expired" in logged
