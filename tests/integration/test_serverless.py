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
