"""keiryo.serverless:handler: an API Gateway proxy event in, an OIP response out; the package verified
and loaded at init from the environment; no torch and no FastAPI in the function's process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

_CHILD = textwrap.dedent(
    """
    import base64, json, sys
    import numpy as np
    from keiryo.serverless import handler
    x = np.load(sys.argv[1])
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    H = {"Authorization": "Bearer fn-key-0123456789abcdef"}
    out = {
        "json": handler({"httpMethod": "POST", "path": "/v2/models/tiny/infer", "headers": H, "body": json.dumps(body)}),
        "binary": None,
        "meta": handler({"httpMethod": "GET", "path": "/v2/models/tiny", "headers": H}),
        "noauth": handler({"httpMethod": "POST", "path": "/v2/models/tiny/infer", "body": json.dumps(body)}),
        "bad": handler({"requestContext": {"http": {"method": "POST"}}, "rawPath": "/v2/models/tiny/infer", "headers": H,
                        "body": '{"inputs": [{"name": "x"}]}'}),
    }
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    out["binary"] = handler({"httpMethod": "POST", "path": "/v2/models/tiny/infer", "isBase64Encoded": True,
                             "headers": {**H, "Inference-Header-Content-Length": str(len(head))},
                             "body": base64.b64encode(head + raw).decode()})
    out["modules"] = sorted(m for m in ("torch", "fastapi", "starlette", "uvicorn") if m in sys.modules)
    print(json.dumps(out))
    """
)


def test_the_handler_serves_a_verified_package_without_torch_or_fastapi(signed, digits, tmp_path):
    from keiryo.packages import read_manifest
    from keiryo.runtime import open_session

    pkg = signed["v2"]  # the int8 candidate
    x = np.ascontiguousarray(digits.test.inputs["image"][:3].numpy())
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "KEIRYO_PACKAGE": str(pkg), "KEIRYO_PUBLIC_KEY": str(signed["pub"])}
    env["KEIRYO_API_KEYS"] = "fn-key-0123456789abcdef"
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["modules"] == []  # onnxruntime and keiryo's package code only
    with open_session("onnxruntime", pkg / read_manifest(pkg)["model_file"]) as s:
        want = np.asarray(s.run({"image": x})[0], np.float32)
    js = out["json"]
    assert js["statusCode"] == 200 and not js["isBase64Encoded"]
    got = np.asarray(json.loads(js["body"])["outputs"][0]["data"], np.float32).reshape(want.shape)
    assert np.array_equal(got, want)
    b = out["binary"]
    assert b["statusCode"] == 200 and b["isBase64Encoded"]
    raw = base64.b64decode(b["body"])
    n = int(b["headers"]["Inference-Header-Content-Length"])
    assert raw[n:] == want.astype("<f4").tobytes()
    assert json.loads(out["meta"]["body"])["versions"] == ["2.0.0"]
    assert out["noauth"]["statusCode"] == 401
    assert out["bad"]["statusCode"] == 400 and "unknown input 'x'" in json.loads(out["bad"]["body"])["error"]


def test_the_handler_refuses_to_start_on_a_tampered_package_or_a_missing_setting(signed, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(signed["v1"], pkg)
    (pkg / "model.onnx").write_bytes((pkg / "model.onnx").read_bytes() + b"\0")
    code = "from keiryo.serverless import handler; handler({'httpMethod': 'GET', 'path': '/v2/models/tiny'})"
    env = {**os.environ, "KEIRYO_PACKAGE": str(pkg), "KEIRYO_PUBLIC_KEY": str(signed["pub"])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "IntegrityError" in r.stderr
    env.pop("KEIRYO_PUBLIC_KEY")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "$KEIRYO_PUBLIC_KEY is not set" in r.stderr


def _start_http(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    from keiryo.testing.live import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keiryo.serverless_http", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # printed once the package is verified and the port bound
    assert "verified, on http://127.0.0.1" in line, line + proc.stderr.read()[-2000:]
    return proc, port


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):  # every answer here closes the connection
            out += chunk
        return out


def test_the_knative_entry_serves_the_verified_package_over_http_within_its_limits(signed, digits, tmp_path):
    """`python -m keiryo.serverless_http` as `keiryo deploy knative`'s Service runs it (a registry with the package
    at alias production, its TUF root, a TUF cache): OIP over HTTP/1.1, answers equal to the package's session,
    auth, other models 404, a body over the cap refused before it is read (413), no chunked bodies (411), idle
    connections closed after the read timeout, connections past the cap answered 503 at once, SIGTERM exits."""
    import socket
    import time

    import httpx

    from keiryo.packages import read_manifest
    from keiryo.packages.store import PackageStore
    from keiryo.runtime import open_session

    pkg, key = signed["v2"], "fn-key-0123456789abcdef"
    store = PackageStore(tmp_path / "registry")
    store.push(pkg, signed["pub"])
    store.promote("tiny", "2.0.0", "production")
    env = {**os.environ, "KEIRYO_REGISTRY": str(store.root), "KEIRYO_MODEL": "tiny@production", "KEIRYO_API_KEYS": key}
    env.update(KEIRYO_PUBLIC_KEY=str(signed["pub"]), KEIRYO_TRUSTED_ROOT=str(store.root / "tuf" / "1.root.json"))
    env.update(KEIRYO_TUF_CACHE=str(tmp_path / "tuf-cache"))
    env.pop("KEIRYO_PACKAGE", None)
    env.update(KEIRYO_MAX_BODY_BYTES="100000", KEIRYO_READ_TIMEOUT_S="1", KEIRYO_MAX_CONNECTIONS="3")
    proc, port = _start_http(env)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        x = np.ascontiguousarray(digits.test.inputs["image"][:3].numpy())
        with open_session("onnxruntime", pkg / read_manifest(pkg)["model_file"]) as s:
            want = np.asarray(s.run({"image": x})[0], np.float32)
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/v2/health/ready").json() == {"ready": True}
            r = c.post("/v2/models/tiny/infer", json=body, headers=auth)
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
            assert np.array_equal(got, want)
            assert c.post("/v2/models/tiny/versions/2.0.0/infer", json=body, headers=auth).status_code == 200
            assert c.get("/v2/models/tiny", headers=auth).json()["versions"] == ["2.0.0"]
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 401
            other = c.post("/v2/models/other/infer", json=body, headers=auth)
            assert other.status_code == 404 and "this function serves 'tiny'" in other.json()["error"]
            assert c.post("/v2/models/tiny/versions/1.0.0/infer", json=body, headers=auth).status_code == 404
            assert c.get("/admin/anything", headers=auth).status_code == 404
        head = f"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        big = _raw(port, (head + "content-length: 1000000000\r\n\r\n").encode())  # headers only: never read
        assert big.startswith(b"HTTP/1.1 413") and b"over the limit of 100000" in big
        chunked = _raw(port, (head + "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode())
        assert chunked.startswith(b"HTTP/1.1 411")

        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]  # the cap: 3
        # once the server has taken the three (a loaded machine can take longer than a fixed pause), a fourth is
        # refused; asked again until then, within the idle ones' 1 s read timeout. The probe asks for the close: one
        # let in before the three are taken must not sit in keep-alive, holding a slot, until that timeout
        deadline = time.monotonic() + 0.9
        while True:
            refused = _raw(port, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            if refused.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert refused.startswith(b"HTTP/1.1 503") and b"too many connections" in refused
        t0 = time.monotonic()
        assert all(s.recv(1) == b"" for s in idle)  # closed by the server after the 1 s read timeout
        assert time.monotonic() - t0 < 3
        for s in idle:
            s.close()
        assert httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200  # the slots are free again
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_the_knative_entry_imports_no_torch_and_refuses_a_tampered_package_before_binding(signed, tmp_path):
    import shutil

    env = {**os.environ, "KEIRYO_PACKAGE": str(signed["v2"]), "KEIRYO_PUBLIC_KEY": str(signed["pub"])}
    code = (
        "import sys, keiryo.serverless_http as s; s.make_server('127.0.0.1', 0).server_close(); "
        "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'uvicorn') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
    pkg = tmp_path / "pkg"
    shutil.copytree(signed["v2"], pkg)
    (pkg / "model.onnx").write_bytes((pkg / "model.onnx").read_bytes() + b"\0")
    r = subprocess.run(
        [sys.executable, "-m", "keiryo.serverless_http", "--port", "0"],
        env={**env, "KEIRYO_PACKAGE": str(pkg)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "keiryo serverless:" in r.stderr and "does not match its signature; changed: model.onnx" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "keiryo.serverless_http"], env={**env, "PORT": "http"}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "$PORT='http': expected a positive integer" in r.stderr
