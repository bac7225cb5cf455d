"""The page's server side without a browser: sessions, the image spec from a manifest, served names."""

from __future__ import annotations

import asyncio

import pytest

from keiryo.app.imaging import browser_support, image_spec
from keiryo.app.sessions import COOKIE, AppSessions, SessionCookies
from keiryo.errors import ConfigError
from keiryo.serve import ServeSettings

DIGITS = {
    "format": "onnx",
    "task": {"name": "classification"},
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 16, 16]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    "labels": [str(i) for i in range(10)],
    "preprocessing": {"source": "sklearn.load_digits", "scale": "pixel / 16", "size": 16, "channels": 1},
}


def test_sessions_expire_and_cannot_be_forged_or_replayed_across_restarts():
    s = AppSessions(ttl_s=60)
    tok = s.issue(now=1000.0)
    assert s.valid(tok, now=1059.0) and not s.valid(tok, now=1061.0)
    exp, _, sig = tok.partition(".")
    assert not s.valid(f"{int(exp) + 3600}.{sig}", now=1000.0)  # a later expiry under the old signature
    assert not s.valid(tok[:-1] + ("0" if tok[-1] != "0" else "1"), now=1000.0)
    for junk in (None, "", "x", "1.2.3", "9" * 200, "abc.def"):
        assert not s.valid(junk, now=1000.0)
    assert not AppSessions(ttl_s=60).valid(tok, now=1000.0)  # another process (a restart): another secret
    assert s.code_ok(s.login_code) and not s.code_ok("guess") and not s.code_ok(None)
    c = s.set_cookie(tok)
    assert c.startswith(f"{COOKIE}={tok};") and "HttpOnly" in c and "SameSite=Strict" in c and "Secure" not in c
    assert "Secure" in AppSessions(secure=True).set_cookie(tok)


def test_the_cookie_middleware_only_adds_the_internal_key_for_a_valid_cookie_and_no_authorization():
    s = AppSessions(ttl_s=60)
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"authorization"))

    mw = SessionCookies(app, s)
    good = f"other=1; {COOKIE}={s.issue()}".encode()
    cases = [
        [(b"cookie", good)],
        [(b"cookie", f"{COOKIE}=1.forged".encode())],
        [(b"cookie", good), (b"authorization", b"Bearer mine")],
        [],
    ]
    for headers in cases:
        asyncio.run(mw({"type": "http", "headers": headers}, None, None))
    assert seen == [f"Bearer {s.internal_key}".encode(), None, b"Bearer mine", None]


def test_image_spec_from_manifests_and_the_reasons_a_model_is_not_for_the_page():
    spec, why = image_spec(DIGITS)
    assert why is None and spec["fit"] == "bbox" and spec["grid"] == 8 and spec["levels"] == 16
    assert spec["input"] == {"name": "image", "shape": [1, 1, 16, 16]} and spec["labels"][3] == "3"
    folder = {
        **DIGITS,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "labels": ["a", "b"],  # the wrong count: indices are shown instead
        "preprocessing": {"source": "image_folder", "resize": "shorter side to 256, bilinear", "crop": "center 224x224",
                          "channel_order": "BGR", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
    }  # fmt: skip
    spec, _ = image_spec(folder)
    assert spec["fit"] == "crop" and spec["resize"] == 256 and spec["channel_order"] == "BGR" and spec["std"] == [0.2] * 3
    assert spec["labels"] == ["0", "1", "2", "3"]
    bad = [
        ({"task": {"name": "regression"}}, "regression"),
        ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, 12]}]}, "not a float"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 5, 8, 8]}]}, "1 or 3 channels"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]}, "fixed height"),
        ({"inputs": DIGITS["inputs"] * 2}, "2 inputs"),
        ({"outputs": [{"name": "e", "datatype": "FP32", "shape": [-1, 4, 8]}]}, "class scores"),
    ]
    for change, reason in bad:
        spec, why = image_spec({**DIGITS, **change})
        assert spec is None and reason in why, (change, why)
    assert browser_support(DIGITS) == (True, None)
    assert "encrypted" in browser_support({**DIGITS, "encryption": {"alg": "x"}})[1]
    assert "tflite" in browser_support({**DIGITS, "format": "tflite"})[1]


def test_served_names_map_to_refs_and_bad_ones_are_refused():
    models = ["digits@production", "digits@staging=digits@staging", "x=text"]
    s = ServeSettings(models=models, public_key="p", api_keys=["k" * 16])
    assert s.served_refs() == {"digits": "digits@production", "digits@staging": "digits@staging", "x": "text"}
    for bad in (["a", "a@staging"], ["../x=digits"], ["=digits"], ["x="]):
        with pytest.raises(ConfigError, match="--model"):
            ServeSettings(models=bad, public_key="p", api_keys=["k" * 16]).check()


def test_the_demo_registry_is_made_once_from_the_demo_output(tiny_results, tmp_path):
    import shutil

    from keiryo.app import registry_refs
    from keiryo.app.demo import ensure_demo_registry
    from keiryo.packages.remote import open_registry

    out, _ = tiny_results
    demo = tmp_path / "keiryo-demo"
    shutil.copytree(out, demo)
    root, pub = ensure_demo_registry(demo, progress=False)
    reg = open_registry(root, None, tmp_path / "cache")
    assert reg.names() == ["digits"] and reg.aliases("digits") == ["production", "staging"]
    assert reg.resolve("digits@production") == ("digits", "2.0.0") and reg.resolve("digits@staging") == ("digits", "1.0.0")
    assert registry_refs(reg) == ["digits@production=digits@production", "digits@staging=digits@staging"]
    before = (root / "tuf" / "timestamp.json").read_bytes()
    assert ensure_demo_registry(demo, progress=False) == (root, pub)  # reused as it is
    assert (root / "tuf" / "timestamp.json").read_bytes() == before
