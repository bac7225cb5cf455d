"""The Open Inference Protocol v2 server, started for real (uvicorn on a loopback port), driven by
``tritonclient.http`` and raw HTTP: inference (binary and JSON), metadata, batching, hot reload,
refusals, auth, metrics, and a bounded schemathesis run against its OpenAPI."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from keiryo.packages import keygen, package
from keiryo.packages.store import PackageStore
from keiryo.runtime import open_session
from keiryo.serve import ServeSettings, create_app
from keiryo.testing.live import LiveServer, free_port

API = "inference-key-0123456789"
ADMIN = "admin-key-0123456789abc"


@pytest.fixture(scope="module")
def world(tiny_results, tmp_path_factory):
    """A registry with tiny 1.0.0 (fp32) at production and 2.0.0 (int8) published, and a running server."""
    out, _ = tiny_results
    d = tmp_path_factory.mktemp("serve")
    priv, pub = keygen(d / "key.pem")
    store = PackageStore(d / "registry")
    for version, cand in (("1.0.0", "fp32"), ("2.0.0", "int8"), ("3.0.0", "fp32")):
        store.push(package(out, name="tiny", version=version, private_key=priv, out=d / version, candidate=cand), pub)
    store.promote("tiny", "1.0.0", "production")
    settings = ServeSettings(
        models=["tiny@production"],
        public_key=str(pub),
        api_keys=[API],
        admin_keys=[ADMIN],
        max_batch_size=16,
        max_queue_delay_ms=20,
        body_limit_bytes=64 * 1024,
        poll_s=0.2,
        header_timeout_s=1.0,
        body_timeout_s=1.0,
    )
    app = create_app(store, settings)
    with LiveServer(app, free_port()) as srv:
        yield {"srv": srv, "store": store, "app": app, "pub": pub, "dir": d}


def _client(world):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=f"127.0.0.1:{world['srv'].port}", concurrency=4)


H = {"Authorization": f"Bearer {API}"}  # pass copies to tritonclient: it adds its own headers to the dict


def _expected(world, x, version="1.0.0"):
    path = world["store"].path(f"tiny@{version}")
    with open_session("onnxruntime", path / "model.onnx") as s:
        return s.run(x)[0]


def _wait_version(world, version, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        r = httpx.get(f"{world['srv'].url}/v2/models/tiny", headers=dict(H))
        if r.status_code == 200 and r.json()["versions"] == [version]:
            return True
        time.sleep(0.05)
    return False


def test_tritonclient_binary_and_json(world, digits):
    import tritonclient.http as httpclient

    c = _client(world)
    assert c.is_server_live() and c.is_server_ready(headers=dict(H))
    assert c.is_model_ready("tiny", headers=dict(H))
    meta = c.get_model_metadata("tiny", headers=dict(H))
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    x = digits.test.inputs["image"][:3].numpy()
    want = _expected(world, x)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        res = c.infer("tiny", [inp], outputs=[out], headers=dict(H), request_id="r-1")
        np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
        assert res.get_response()["id"] == "r-1" and res.get_response()["model_version"] == "1.0.0"
    res = c.infer("tiny", [inp], model_version="1.0.0", headers=dict(H))  # no outputs requested: all, binary
    np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
    meta = c.get_server_metadata(headers=dict(H))
    assert "binary_tensor_data" in meta["extensions"]


def _post(world, body, *, headers=None, path="/v2/models/tiny/infer", content=None):
    h = {**H, **(headers or {})}
    return httpx.post(world["srv"].url + path, headers=h, content=content if content is not None else json.dumps(body))


def _good(x):
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


@pytest.mark.parametrize(
    "mutate,status,message",
    [
        (lambda b: "{not json", 400, "not valid JSON"),
        (lambda b: {**b, "inputs": [{**b["inputs"][0], "name": "x"}]}, 400, "unknown input 'x'"),
        (lambda b: {**b, "inputs": [{**b["inputs"][0], "datatype": "INT64"}]}, 400, "datatype 'INT64', expected FP32"),
        (lambda b: {**b, "inputs": [{**b["inputs"][0], "shape": [1, 1, 4, 4]}]}, 400, "expected [-1, 1, 8, 8]"),
        (lambda b: {**b, "inputs": [{**b["inputs"][0], "data": [0.0] * 10}]}, 400, "10 elements for shape"),
        (lambda b: {**b, "inputs": [{**b["inputs"][0], "data": ["a"] * 64}]}, 400, "not a (nested) list of FP32"),
        (lambda b: {"inputs": []}, 400, "non-empty 'inputs'"),
        (lambda b: {**b, "outputs": [{"name": "probs"}]}, 400, "unknown outputs ['probs']"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(world, digits, mutate, status, message):
    body = mutate(_good(digits.test.inputs["image"][:1].numpy()))
    r = _post(world, None, content=body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == status and message in r.json()["error"]


def test_limits_auth_and_unknown_models(world, digits):
    url = world["srv"].url
    x = digits.test.inputs["image"][:1].numpy()
    big = np.zeros((400, 1, 8, 8), np.float32)  # ~128 KB of JSON, limit 64 KB
    r = _post(world, _good(big))
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert _post(world, _good(x), path="/v2/models/ghost/infer").status_code == 404
    r = _post(world, _good(x), path="/v2/models/tiny/versions/9.9.9/infer")
    assert r.status_code == 404 and "no loaded version '9.9.9'" in r.json()["error"]
    assert httpx.post(url + "/v2/models/tiny/infer", content=json.dumps(_good(x))).status_code == 401
    r = _post(world, _good(x), headers={"Authorization": "Bearer wrong-key-wrong-key"})
    assert r.status_code == 401 and r.json() == {"error": "missing or invalid API key"}
    assert httpx.post(url + "/v2/repository/index", headers=dict(H)).status_code == 403  # an inference key is not an admin key
    assert httpx.post(url + "/v2/repository/index").status_code == 401
    r = httpx.post(url + "/v2/repository/models/..%2F..%2Fetc/load", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code in (400, 404) and "error" in r.json()
    assert _post(world, _good(x)).status_code == 200  # still serving


def test_dynamic_batching_runs_concurrent_requests_together(world, digits):
    x = digits.test.inputs["image"][:1].numpy()
    want = _expected(world, x)

    def one(_):
        r = _post(world, _good(x))
        return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)

    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(64)))
    for o in outs:
        np.testing.assert_allclose(o, want, atol=1e-5)
    text = httpx.get(world["srv"].url + "/metrics", headers=H).text
    sizes = {
        float(line.split('le="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("keiryo_batch_size_bucket") and 'model="tiny"' in line and "+Inf" not in line
    }
    total = float(next(ln for ln in text.splitlines() if ln.startswith("keiryo_batch_size_count")).rsplit(" ", 1)[1])
    assert sizes[1.0] < total  # some runs held more than one request
    for name in ("keiryo_requests_total", "keiryo_request_latency_seconds_bucket", "keiryo_queue_time_seconds_bucket"):
        assert name in text
    assert (
        "keiryo_in_flight_requests" in text
        and 'keiryo_model_load_events_total{model="tiny",result="loaded",version="1.0.0"}' in text
    )


def test_hot_reload_on_alias_move_and_refusal_of_a_bad_version(world, digits):
    store, x = world["store"], digits.test.inputs["image"][:2].numpy()
    store.promote("tiny", "2.0.0", "production")
    assert _wait_version(world, "2.0.0")
    r = _post(world, _good(x))
    assert r.status_code == 200 and r.json()["model_version"] == "2.0.0"
    # 3.0.0 is damaged on disk after publishing: the server must refuse it and keep serving 2.0.0
    bad = store.path("tiny@3.0.0") / "model.onnx"
    bad.write_bytes(bad.read_bytes() + b"\0")
    store.promote("tiny", "3.0.0", "production")
    time.sleep(1.0)
    r = _post(world, _good(x))
    assert r.status_code == 200 and r.json()["model_version"] == "2.0.0"
    text = httpx.get(world["srv"].url + "/metrics", headers=H).text
    assert 'result="refused"' in text
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(world["srv"].url + "/v2/repository/models/tiny/load", headers=admin)
    err = r.json()["error"]  # the registry's signed metadata catches the change before the signature would
    assert r.status_code == 400 and "model.onnx: longer than its signed length" in err
    store.rollback("tiny", "production")
    assert _wait_version(world, "2.0.0")
    idx = httpx.post(world["srv"].url + "/v2/repository/index", headers=admin).json()
    assert idx == [{"name": "tiny", "version": "2.0.0", "state": "READY", "ref": "tiny@production"}]


def test_in_flight_requests_survive_a_reload(world, digits):
    x = digits.test.inputs["image"][:1].numpy()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    stop = threading.Event()
    codes: list[int] = []

    def hammer():
        while not stop.is_set():
            codes.append(_post(world, _good(x)).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(3):
        r = httpx.post(world["srv"].url + "/v2/repository/models/tiny/load", headers=admin)
        assert r.status_code == 200, r.text
    stop.set()
    for t in threads:
        t.join(30)
    assert codes and set(codes) == {200}


def test_schemathesis_finds_no_server_error(world):
    import schemathesis
    from hypothesis import HealthCheck, settings

    schema = schemathesis.openapi.from_url(world["srv"].url + "/openapi.json", headers=H)
    failures = []
    calls = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @schemathesis_given(operation)
        def check(case):
            case.headers = {**(case.headers or {}), **H}
            resp = case.call()
            calls.append(resp.status_code)
            if resp.status_code >= 500 and resp.status_code != 503:
                failures.append((case.method, case.path, resp.status_code))

        check()
    assert not failures, failures
    assert len(calls) > 50 and {200, 400, 404} <= set(calls), sorted(set(calls))  # it really exercised the API


def schemathesis_given(operation):
    from hypothesis import given

    return given(case=operation.as_strategy())


def test_request_id_is_echoed_and_a_streamed_body_over_the_limit_is_refused(world, digits):
    x = digits.test.inputs["image"][:1].numpy()
    r = _post(world, _good(x), headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    generated = {_post(world, _good(x)).headers["x-request-id"] for _ in range(3)}  # generated when absent
    assert len(generated) == 3 and all(len(i) >= 8 for i in generated)

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(world["srv"].url + "/v2/models/tiny/infer", headers=H, content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_every_request_gets_one_json_access_log_line_with_its_id(world, digits, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="keiryo.access")
    x = digits.test.inputs["image"][:1].numpy()
    assert _post(world, _good(x), headers={"X-Request-ID": 'log-"1"'}).status_code == 200
    assert httpx.get(world["srv"].url + "/v2/models/nope", headers={**H, "X-Request-ID": "log-2"}).status_code == 404
    end = time.time() + 5  # the line is written once the response is sent: wait for it
    while time.time() < end:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "keiryo.access"]
        mine = {line["request_id"]: line for line in lines if line["request_id"] in ('log-"1"', "log-2")}
        if len(mine) == 2:
            break
        time.sleep(0.02)
    first = mine['log-"1"']
    assert {k: first[k] for k in ("method", "path", "status", "client")} == {
        "method": "POST",
        "path": "/v2/models/tiny/infer",
        "status": 200,
        "client": "127.0.0.1",
    }
    assert isinstance(first["ms"], float) and first["ms"] > 0
    assert mine["log-2"]["status"] == 404 and mine["log-2"]["method"] == "GET"


def test_keiryo_serve_exits_cleanly_on_sigterm_with_every_access_line_written(world, digits):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "keiryo"), "serve", "--registry", str(world["store"].root)]
    cmd += ["--model", "tiny@production", "--public-key", str(world["pub"]), "--port", str(port), "--poll-s", "0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": API}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        x = digits.test.inputs["image"][:1].numpy()
        ids = [f"term-{i}" for i in range(20)]
        for rid in ids:
            r = httpx.post(url + "/v2/models/tiny/infer", headers={**H, "X-Request-ID": rid}, content=json.dumps(_good(x)))
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith('{"request_id"')]
    assert [line["request_id"] for line in lines if line["request_id"].startswith("term-")] == ids
    assert all(line["status"] == 200 for line in lines if line["request_id"] in ids)


def test_a_client_that_leaves_before_its_body_arrives_is_counted_as_499_and_gets_nothing(world):
    import asyncio

    front = world["app"]
    sample = {"model": "tiny", "endpoint": "infer", "status": "499"}
    before = front.server.metrics.registry.get_sample_value("keiryo_requests_total", sample) or 0.0
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/tiny/infer", "client": ("127.0.0.1", 1)}
    scope["headers"] = [(b"authorization", f"Bearer {API}".encode())]
    asyncio.run(front(scope, receive, send))
    assert sent == []
    assert front.server.metrics.registry.get_sample_value("keiryo_requests_total", sample) == before + 1


def test_the_documented_fastapi_infer_route_answers_like_the_front(world, digits):
    """``Front`` serves infer itself; the FastAPI routes behind it document it and answer the same when the
    FastAPI app runs alone."""
    from fastapi.testclient import TestClient

    settings = ServeSettings(models=["tiny@1.0.0"], public_key=str(world["pub"]), api_keys=[API], poll_s=None)
    front = create_app(world["store"], settings)
    x = digits.test.inputs["image"][:2].numpy()
    answers = []
    for app in (front, front.api):
        with TestClient(app) as c:
            r = c.post("/v2/models/tiny/versions/1.0.0/infer", headers=H, content=json.dumps(_good(x)))
            assert r.status_code == 200, r.text
            answers.append(r.json()["outputs"])
            bad = c.post("/v2/models/tiny/infer", headers={"Authorization": "Bearer wrong-key-0123456789"}, content=b"{}")
            assert bad.status_code == 401 and "API key" in bad.json()["error"]
    assert answers[0] == answers[1]
    np.testing.assert_allclose(np.array(answers[0][0]["data"]).reshape(2, 10), _expected(world, x), atol=1e-5)
    paths = front.api.openapi()["paths"]
    assert "post" in paths["/v2/models/{name}/infer"] and "post" in paths["/v2/models/{name}/versions/{version}/infer"]


def test_settings_refuse_a_server_without_keys(tmp_path):
    from keiryo.errors import ConfigError

    with pytest.raises(ConfigError, match="no API key given"):
        ServeSettings(models=["m"], public_key="k.pem").check()
    with pytest.raises(ConfigError, match="at least 16 characters"):
        ServeSettings(models=["m"], public_key="k.pem", api_keys=["short"]).check()


def test_a_tampered_package_keeps_the_server_from_starting(world, tmp_path):
    from fastapi.testclient import TestClient

    reg = tmp_path / "reg"
    shutil.copytree(world["store"].root, reg)
    store = PackageStore(reg, world["store"].trust.keys)
    (store.path("tiny@1.0.0") / "keiryo.json").write_text("{}")
    store.promote("tiny", "1.0.0", "production", downgrade=True)
    app = create_app(store, ServeSettings(models=["tiny@production"], public_key=str(world["pub"]), api_keys=[API], poll_s=None))
    from keiryo.errors import IntegrityError

    with pytest.raises(IntegrityError, match="keiryo.json: 2 bytes, the signed metadata says"), TestClient(app):
        pass


def test_a_package_signed_by_an_unknown_key_keeps_the_server_from_starting(world, tmp_path):
    from fastapi.testclient import TestClient

    from keiryo.errors import IntegrityError

    _, stranger = keygen(tmp_path / "stranger.pem")
    app = create_app(world["store"], ServeSettings(models=["tiny@1.0.0"], public_key=str(stranger), api_keys=[API], poll_s=None))
    with pytest.raises(IntegrityError, match="not made with stranger.pub.pem"), TestClient(app):
        pass


def test_a_request_over_its_timeout_gets_503_and_the_server_keeps_serving(world, digits):
    from fastapi.testclient import TestClient

    settings = ServeSettings(
        models=["tiny@1.0.0"], public_key=str(world["pub"]), api_keys=[API], poll_s=None, request_timeout_s=1e-9
    )
    x = digits.test.inputs["image"][:1].numpy()
    with TestClient(create_app(world["store"], settings)) as c:
        r = c.post("/v2/models/tiny/infer", headers=H, content=json.dumps(_good(x)))
        assert r.status_code == 503 and "error" in r.json()
        assert c.get("/v2/health/ready").status_code == 200


def test_a_text_model_with_int64_token_inputs_is_served(tmp_path):
    """Several named inputs of datatype INT64 (token ids and a mask) through the OIP server with tritonclient."""
    import tritonclient.http as httpclient

    from keiryo.benchmark import BenchConfig
    from keiryo.data import DataSpec, load_data
    from keiryo.model import load_model
    from keiryo.pipeline import RunOptions, compress, load_recipe

    data = load_data(DataSpec(source="tokens", options={"samples": 120, "vocab": 50, "seq": 12}, calib_size=16))
    h = load_model(
        "zoo:text_encoder", data, output_name="logits", options={"vocab": 50, "dim": 16, "heads": 2, "layers": 1, "ffn": 32}
    )
    opts = RunOptions(bench=BenchConfig(iterations=5, warmup=1, throughput_iterations=1, throughput_batch=2), progress=False)
    compress(h, data, [load_recipe("int8-dynamic")], tmp_path / "out", opts=opts)
    priv, pub = keygen(tmp_path / "key.pem")
    store = PackageStore(tmp_path / "registry")
    pkg = package(
        tmp_path / "out", name="text", version="1.0.0", private_key=priv, out=tmp_path / "pkg", candidate="int8-dynamic"
    )
    manifest = json.loads((pkg / "keiryo.json").read_text())
    assert manifest["inputs"] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, 12]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, 12]},
    ]
    assert manifest["task"]["name"] == "sequence-classification" and list(manifest["golden"]["inputs"]) == [
        "input_ids",
        "attention_mask",
    ]
    store.push(pkg, pub)
    store.promote("text", "1.0.0", "production")
    app = create_app(store, ServeSettings(models=["text@production"], public_key=str(pub), api_keys=[API], poll_s=5))
    x = {k: v[:3] for k, v in data.test.numpy().items()}
    with open_session("onnxruntime", pkg / manifest["model_file"]) as s:
        want = s.run(x)[0]
    with LiveServer(app, free_port()) as srv:
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
        meta = c.get_model_metadata("text", headers=dict(H))
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("input_ids", "INT64"), ("attention_mask", "INT64")]
        inputs = []
        for name in ("input_ids", "attention_mask"):
            inp = httpclient.InferInput(name, list(x[name].shape), "INT64")
            inp.set_data_from_numpy(x[name], binary_data=True)
            inputs.append(inp)
        res = c.infer("text", inputs, headers=dict(H))
        np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
        bad = httpclient.InferInput("input_ids", [3, 12], "FP32")
        bad.set_data_from_numpy(x["input_ids"].astype(np.float32))
        with pytest.raises(Exception, match="datatype 'FP32', expected INT64"):
            c.infer("text", [bad, inputs[1]], headers=dict(H))


def test_hostile_clients_cannot_grow_metrics_or_read_private_endpoints(world):
    """Model labels come from configured names only; /metrics, /docs and /openapi.json need a key."""
    url = world["srv"].url
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(url + path).status_code == 401, path
    before = httpx.get(url + "/metrics", headers=H).text
    with httpx.Client() as c:
        for i in range(300):
            assert c.post(f"{url}/v2/models/junk{i}/infer", content=b"{}").status_code == 401
    after = httpx.get(url + "/metrics", headers=H).text
    assert "junk" not in after and 'model="unknown"' in after
    series = lambda t: sum(1 for line in t.splitlines() if line and not line.startswith("#"))  # noqa: E731
    assert series(after) - series(before) <= 4  # one new (unknown, other, 401) series and its friends, not 300


@pytest.mark.parametrize(
    "body, status, error",
    [
        (b"[" * 20_000 + b"]" * 20_000, 400, "depth limit exceeded"),  # under the body limit, past orjson's 1,024 levels
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1], "data": [' + b"1" * 5000 + b"]}]}",
            400,
            "number is infinity when parsed as double",  # (the stdlib parser's refusal: its 4,300-digit limit)
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": ['
            + str(10**400).encode()
            + b"]}]}",
            400,
            "number is infinity when parsed as double",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [NaN' + b", 0.5" * 63 + b"]}]}",
            400,
            "not valid JSON",  # NaN and Infinity are not JSON
        ),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": ["0.5"] * 64}]}).encode(),
            400,
            "FP32 values",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [True] + [0.5] * 63}]}
            ).encode(),
            400,
            "FP32 values",
        ),
    ],
    ids=["deep-nesting", "huge-int", "overflow", "nan-literal", "string-number", "bool-number"],
)
def test_malformed_json_is_a_400_and_never_a_500(world, body, status, error):
    r = httpx.post(world["srv"].url + "/v2/models/tiny/infer", content=body, headers=H)
    assert r.status_code == status and error in r.json()["error"], r.text


def test_non_finite_outputs_and_a_failing_session_are_500s_with_their_reason(world, caplog):
    from keiryo.errors import RuntimeSessionError
    from keiryo.serve.protocol import InferRequest, NonFiniteOutput, build_response

    req = InferRequest(None, {}, None, set(), False)
    with pytest.raises(NonFiniteOutput, match="NaN or Inf"):
        build_response("m", "1", req, {"logits": np.array([[-np.inf, 0.0]], np.float32)})
    body, _, _ = build_response(
        "m", "1", InferRequest(None, {}, None, set(), True), {"logits": np.array([[-np.inf]], np.float32)}
    )
    assert body  # binary outputs carry them
    from keiryo.serve.app import _error_body, _status_of

    e = RuntimeSessionError("model.onnx: onnxruntime run failed: boom")
    assert _status_of(e) == 500 and json.loads(_error_body(500, e))["error"].endswith("boom")
    assert _status_of(NonFiniteOutput("x")) == 500


def _cert(tmp_path, name, issuer=None, *, ca=False):
    """A certificate for 127.0.0.1 made in the test (self-signed, or signed by ``issuer``), written as PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = b.sign(issuer[1] if issuer else key, hashes.SHA256())
    (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


def test_tls_and_mutual_tls(world, tmp_path):
    """keiryo serve with a certificate made in the test: HTTPS works, plain HTTP does not; with --ssl-ca-certs
    a client without a certificate fails the handshake and one signed by the CA is served."""
    import os
    import ssl
    import subprocess
    import sys
    from pathlib import Path

    ca = _cert(tmp_path, "ca", ca=True)
    _cert(tmp_path, "server", ca)
    _cert(tmp_path, "client", ca)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "keiryo"), "serve", "--registry", str(world["store"].root), "--model", "tiny@1.0.0"]
    cmd += ["--public-key", str(world["pub"]), "--port", str(port), "--poll-s", "0", "--tuf-cache", str(tmp_path / "cache")]
    cmd += ["--ssl-certfile", str(tmp_path / "server.crt"), "--ssl-keyfile", str(tmp_path / "server.key")]
    cmd += ["--ssl-ca-certs", str(tmp_path / "ca.crt")]
    proc = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": API}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    client_ctx.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready", verify=client_ctx, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(url + "/v2/models/tiny", verify=client_ctx, headers=H).json()["versions"] == ["1.0.0"]
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))  # trusts the server, has no certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/v2/health/ready", verify=anonymous, timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)  # no plaintext on a TLS port
        assert proc.poll() is None  # handshake failures never reached (or ended) the application
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_docker_healthcheck_passes_over_http_and_tls_and_fails_when_nothing_answers(world, tmp_path):
    """The image's HEALTHCHECK script (written by `keiryo deploy docker`), pointed at this test's ports: the plain
    server and a TLS one (certificate made here) are healthy, a port where nothing listens is not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from keiryo.serve.deploy import HEALTHCHECK_PY, SERVE_PORT

    def healthy(port: int) -> bool:
        script = tmp_path / f"health{port}.py"
        script.write_text(HEALTHCHECK_PY.replace(f":{SERVE_PORT}/", f":{port}/"))
        return subprocess.run([sys.executable, str(script)], timeout=30).returncode == 0

    ca = _cert(tmp_path, "ca", ca=True)
    _cert(tmp_path, "server", ca)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "keiryo"), "serve", "--registry", str(world["store"].root), "--model", "tiny@1.0.0"]
    cmd += ["--public-key", str(world["pub"]), "--port", str(port), "--poll-s", "0", "--tuf-cache", str(tmp_path / "cache")]
    cmd += ["--ssl-certfile", str(tmp_path / "server.crt"), "--ssl-keyfile", str(tmp_path / "server.key")]
    proc = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": API}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not healthy(port):
            time.sleep(0.3)
        assert healthy(port)  # over TLS
        assert healthy(world["srv"].port)  # plain HTTP
    finally:
        proc.terminate()
        proc.wait(30)
    assert not healthy(port)  # nothing answers any more


def test_slow_and_idle_clients_are_cut_off_and_the_server_keeps_serving(world, digits):
    """An idle connection, a header sent a byte at a time, and a stalled authenticated body are closed
    within their deadlines (1 s here), while normal requests go on being served."""
    host, port = "127.0.0.1", world["srv"].port

    def connect():
        s = socket.create_connection((host, port))
        s.settimeout(5)
        return s

    idle, slow_header, slow_body = connect(), connect(), connect()
    slow_body.sendall(
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
    )
    x = digits.test.inputs["image"][:1].numpy()
    start = time.monotonic()
    answered = 0
    header = iter(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # a byte every 0.1 s: never finished in time
    cut_at = None
    while time.monotonic() - start < 2.5:
        if cut_at is None:
            try:
                slow_header.sendall(bytes([next(header)]))
            except OSError:
                cut_at = time.monotonic() - start
        if _post(world, _good(x)).status_code == 200:
            answered += 1
        time.sleep(0.1)
    assert answered >= 10  # normal requests kept being answered meanwhile
    assert idle.recv(100) == b""  # closed by the server, no response: it never asked anything
    assert slow_header.recv(100) == b""
    reply = slow_body.recv(1000)
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply
    assert time.monotonic() - start < 5
    for s in (idle, slow_header, slow_body):
        s.close()


def test_a_big_json_body_is_parsed_off_the_loop_and_big_bodies_past_the_cap_get_503(world, digits, tmp_path):
    """A 10+ MB JSON infer request is parsed in the worker process: health probes sent meanwhile answer promptly
    (measured: each probe's round trip against the big request's). Concurrent big bodies past the cap on bytes in
    flight get 503 with Retry-After at once instead of piling up in memory. The server runs in its own process
    (`keiryo serve`), so the test's client threads do not share its GIL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    x = digits.test.inputs["image"].numpy()
    per_row = len(json.dumps(_good(x))) / len(x)
    rows = int(11 * 2**20 / per_row)  # about 11 MB of JSON
    x = np.tile(x, (-(-rows // len(x)), 1, 1, 1))[:rows]
    body = json.dumps({**_good(x), "parameters": {"binary_data_output": True}}).encode()  # a cheap answer
    assert 10 * 2**20 < len(body) < 12 * 2**20
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "keiryo"), "serve", "--registry", str(world["store"].root), "--model", "tiny@1.0.0"]
    cmd += ["--public-key", str(world["pub"]), "--port", str(port), "--poll-s", "0", "--tuf-cache", str(tmp_path / "cache")]
    cmd += ["--body-limit-mb", "12", "--parse-in-flight-mb", f"{len(body) * 1.5 / 2**20:.3f}"]  # one big body at a time
    env = {**os.environ, "KEIRYO_API_KEYS": API}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a log line a request
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def post():
            t = time.perf_counter()
            r = httpx.post(base + "/v2/models/tiny/infer", headers=H, content=body, timeout=60)
            return r, time.perf_counter() - t

        assert post()[0].status_code == 200  # and the worker is started
        with cf.ThreadPoolExecutor(1) as pool, httpx.Client(base_url=base, timeout=5) as prober:
            assert prober.get("/v2/health/ready").status_code == 200  # connected before the big request
            big = pool.submit(post)
            probes = []
            while not big.done():
                t = time.perf_counter()
                assert prober.get("/v2/health/ready").status_code == 200
                probes.append(time.perf_counter() - t)
                time.sleep(0.01)
            r, took = big.result()
        assert r.status_code == 200, r.text
        head = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
        assert head["outputs"][0]["shape"] == [rows, 10]
        assert len(probes) >= 3 and max(probes) < 0.1 and max(probes) * 3 < took, (probes, took)

        with cf.ThreadPoolExecutor(4) as pool:
            answers = [f.result()[0] for f in [pool.submit(post) for _ in range(4)]]
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.headers["retry-after"] == "1" and "bytes in flight" in a.json()["error"] for a in refused)
        print(
            f"big JSON {len(body) / 2**20:.1f} MiB: request {took:.3f} s, probes max {max(probes) * 1e3:.1f} ms "
            f"median {sorted(probes)[len(probes) // 2] * 1e3:.1f} ms over {len(probes)}; 4 at once: {codes}"
        )
    finally:
        proc.terminate()
        proc.wait(30)


def _gauges(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name) :]] = float(value)
    return out


def test_drift_gauges_move_with_shifted_traffic_and_the_crossing_is_logged_once(world, digits, caplog):
    """The package carries the drift reference measured on the test split (input mean/std per channel, the file's
    predicted classes); the server's gauges read low on that same distribution and move when the inputs shift,
    and one JSON line {"event": "drift"} is logged when the PSI goes over 0.2."""
    import logging

    from keiryo.packages import read_manifest

    manifest = read_manifest(world["dir"] / "1.0.0")
    ref = manifest["drift_reference"]
    assert "drift_reference" not in manifest["metrics"]
    assert ref["inputs"]["image"]["axis"] == 1 and len(ref["inputs"]["image"]["mean"]) == 1
    assert ref["predictions"]["output"] == "logits" and ref["predictions"]["classes"] == 10
    assert sum(ref["predictions"]["distribution"]) == pytest.approx(1, abs=1e-4)

    settings = ServeSettings(
        models=["tiny@1.0.0"],
        public_key=str(world["pub"]),
        api_keys=[API],
        poll_s=None,
        drift_window_rows=300,
        tuf_cache=str(world["dir"] / "cache-drift"),
    )
    x = digits.test.inputs["image"].numpy()
    assert len(x) >= 300
    caplog.set_level(logging.WARNING, logger="keiryo.serve")
    with LiveServer(create_app(world["store"], settings), free_port()) as srv, httpx.Client(base_url=srv.url, headers=H) as c:

        def send(rows):
            for i in range(0, len(rows), 30):
                assert c.post("/v2/models/tiny/infer", content=json.dumps(_good(rows[i : i + 30]))).status_code == 200

        send(x[:300])  # the test split: what the reference was measured on
        calm = c.get("/metrics").text
        psi0 = _gauges(calm, "keiryo_drift_psi")['{model="tiny"}']
        shift0 = _gauges(calm, "keiryo_drift_input_shift")['{input="image",model="tiny"}']
        assert psi0 < 0.1 and shift0 < 0.25, (psi0, shift0)
        assert not [r for r in caplog.records if '"event": "drift"' in r.getMessage()]

        send(np.clip(x[:300] * 0.2 + x.max() * 0.8, 0, None).astype(np.float32))  # washed-out images
        moved = c.get("/metrics").text
        psi1 = _gauges(moved, "keiryo_drift_psi")['{model="tiny"}']
        shift1 = _gauges(moved, "keiryo_drift_input_shift")['{input="image",model="tiny"}']
        assert psi1 > 0.2 and shift1 > 1.0, (psi1, shift1)
        send(np.clip(x[:90] * 0.2 + x.max() * 0.8, 0, None).astype(np.float32))  # still over: no second line
    lines = [json.loads(r.getMessage()) for r in caplog.records if '"event": "drift"' in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0]["model"] == "tiny" and lines[0]["version"] == "1.0.0" and lines[0]["psi"] > 0.2
    assert lines[0]["threshold"] == 0.2 and lines[0]["input_shift"]["image"] > shift0  # logged as it crossed
    print(f"drift: calm psi {psi0:.3f} shift {shift0:.3f}; shifted psi {psi1:.3f} shift {shift1:.3f}")
