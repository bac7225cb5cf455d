"""The OIP gRPC endpoint (``--grpc-port``), on the same event loop, models and batcher as REST: the same
vectors through REST and gRPC give bit-identical outputs; keys, the admin key, message size and error
codes; ``tritonclient.grpc`` against it (in a child process: its stubs and keiryo's register the same
``inference.*`` names in protobuf's default pool, so they cannot share one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from keiryo.packages.store import PackageStore  # noqa: E402
from keiryo.serve import ServeSettings, create_app  # noqa: E402
from keiryo.serve._oip import grpc_predict_v2_pb2 as pb  # noqa: E402
from keiryo.serve._oip import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from keiryo.testing.live import free_port  # noqa: E402

API = "grpc-inference-key-0123456789"
ADMIN = "grpc-admin-key-0123456789abc"
AUTH = (("authorization", f"Bearer {API}"),)
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)


@pytest.fixture(scope="module")
def live(signed, tmp_path_factory):
    """tiny 1.0.0 (fp32) and 2.0.0 (int8) served over REST and gRPC by one uvicorn process (this one)."""
    import uvicorn

    from keiryo.serve.settings import uvicorn_options

    d = tmp_path_factory.mktemp("grpc")
    store = PackageStore(d / "registry")
    for v in ("v1", "v2"):
        store.push(signed[v], signed["pub"])
    store.promote("tiny", "1.0.0", "production")
    settings = ServeSettings(
        models=["tiny@production"],
        public_key=str(signed["pub"]),
        api_keys=[API],
        admin_keys=[ADMIN],
        poll_s=None,
        tuf_cache=str(d / "cache"),
        grpc_port=0,
        grpc_host="127.0.0.1",
        grpc_max_message_bytes=64 * 1024,
        max_queue_delay_ms=5,
    )
    app = create_app(store, settings)
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_options(settings))
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200 and app.server.grpc_bound:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not become ready")
    channel = grpc.insecure_channel(f"127.0.0.1:{app.server.grpc_bound}")
    yield {"url": url, "app": app, "store": store, "stub": pb_grpc.GRPCInferenceServiceStub(channel), "signed": signed}
    channel.close()
    srv.should_exit = True
    thread.join(30)


def _rest(live, x: np.ndarray, *, binary: bool) -> bytes:
    """logits over REST as raw little-endian bytes (binary extension, or JSON numbers cast back to FP32)."""
    head = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape)}]}
    h = {"Authorization": f"Bearer {API}"}
    if binary:
        raw = x.astype("<f4").tobytes()
        head["inputs"][0]["parameters"] = {"binary_data_size": len(raw)}
        head["parameters"] = {"binary_data_output": True}
        js = json.dumps(head).encode()
        h["Inference-Header-Content-Length"] = str(len(js))
        r = httpx.post(live["url"] + "/v2/models/tiny/infer", content=js + raw, headers=h)
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        return r.content[n:]
    head["inputs"][0]["data"] = x.reshape(-1).tolist()
    r = httpx.post(live["url"] + "/v2/models/tiny/infer", json=head, headers=h)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], np.float32).astype("<f4").tobytes()


def _grpc_request(x: np.ndarray, *, raw: bool, model="tiny") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="g-1")
    t = req.inputs.add(name="image", datatype="FP32", shape=x.shape)
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def test_the_same_vectors_give_bit_identical_outputs_over_rest_and_grpc(live, digits):
    stub = live["stub"]
    for rows in (1, 3, 17):
        x = np.ascontiguousarray(digits.test.inputs["image"][:rows].numpy())
        answers = {"rest-binary": _rest(live, x, binary=True), "rest-json": _rest(live, x, binary=False)}
        for raw in (True, False):
            resp = stub.ModelInfer(_grpc_request(x, raw=raw), metadata=AUTH)
            assert resp.model_name == "tiny" and resp.model_version == "1.0.0" and resp.id == "g-1"
            (out,) = resp.outputs
            assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [rows, 10])
            answers[f"grpc-{'raw' if raw else 'typed'}"] = resp.raw_output_contents[0]
        assert len(set(answers.values())) == 1, {k: v[:16] for k, v in answers.items()}
        assert len(answers["rest-binary"]) == rows * 10 * 4


def test_health_metadata_and_repository_rpcs(live):
    stub = live["stub"]
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # no key, like REST's /v2/health/live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), metadata=AUTH).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="ghost"), metadata=AUTH).ready
    assert "model_repository" in stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=AUTH).extensions
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=AUTH)
    assert (meta.name, list(meta.versions), meta.platform) == ("tiny", ["1.0.0"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=ADMIN_AUTH)
    assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1.0.0", "READY")]
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), metadata=ADMIN_AUTH)
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../../etc"), metadata=ADMIN_AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not configured" in e.value.details()


@pytest.mark.parametrize(
    "call, metadata, code, message",
    [
        ("infer", (), "UNAUTHENTICATED", "missing or invalid API key"),
        ("infer", (("authorization", "Bearer wrong-key-wrong-key"),), "UNAUTHENTICATED", "invalid API key"),
        ("index", AUTH, "PERMISSION_DENIED", "admin key required"),  # an inference key is not an admin key
        ("index", (), "UNAUTHENTICATED", "admin key required"),
        ("metadata", (), "UNAUTHENTICATED", "API key"),
    ],
)
def test_keys_are_checked_on_grpc_like_on_rest(live, digits, call, metadata, code, message):
    stub = live["stub"]
    x = digits.test.inputs["image"][:1].numpy()
    rpc = {
        "infer": lambda: stub.ModelInfer(_grpc_request(x, raw=True), metadata=metadata),
        "index": lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata),
        "metadata": lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=metadata),
    }[call]
    with pytest.raises(grpc.RpcError) as e:
        rpc()
    assert e.value.code() == getattr(grpc.StatusCode, code) and message in e.value.details()


def _bad(x):
    def mutate(f):
        req = _grpc_request(x, raw=True)
        f(req)
        return req

    return mutate


@pytest.mark.parametrize(
    "change, code, message",
    [
        (lambda r: setattr(r, "model_name", "ghost"), "NOT_FOUND", "unknown model 'ghost'"),
        (lambda r: setattr(r, "model_version", "9.9.9"), "NOT_FOUND", "no loaded version '9.9.9'"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT64"), "INVALID_ARGUMENT", "datatype 'INT64', expected FP32"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "unknown input 'x'"),
        (lambda r: r.inputs[0].shape.__setitem__(2, 4), "INVALID_ARGUMENT", "expected [-1, 1, 8, 8]"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "INVALID_ARGUMENT", "12 raw bytes, expected 256"),
        (lambda r: r.raw_input_contents.__setitem__(0, np.full(64, np.nan, "<f4").tobytes()), "INVALID_ARGUMENT", "NaN"),
        (lambda r: r.outputs.add(name="probs"), "INVALID_ARGUMENT", "unknown outputs ['probs']"),
        (lambda r: r.raw_input_contents.append(b"x"), "INVALID_ARGUMENT", "2 entries for 1 inputs"),
        (lambda r: r.inputs[0].contents.int64_contents.append(1), "INVALID_ARGUMENT", "typed contents and raw"),
    ],
)
def test_bad_requests_get_their_grpc_code_and_the_server_keeps_serving(live, digits, change, code, message):
    x = digits.test.inputs["image"][:1].numpy()
    with pytest.raises(grpc.RpcError) as e:
        live["stub"].ModelInfer(_bad(x)(change), metadata=AUTH)
    assert e.value.code() == getattr(grpc.StatusCode, code) and message in e.value.details(), e.value.details()
    assert live["stub"].ModelInfer(_grpc_request(x, raw=True), metadata=AUTH).outputs[0].name == "logits"


def test_typed_contents_in_the_wrong_field_or_count_are_refused(live, digits):
    x = digits.test.inputs["image"][:1].numpy()
    req = _grpc_request(x, raw=False)
    req.inputs[0].contents.fp64_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as e:
        live["stub"].ModelInfer(req, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "belongs in contents.fp32_contents" in e.value.details()
    req = _grpc_request(x[:, :, :4], raw=False)
    req.inputs[0].shape[:] = [1, 1, 8, 8]
    with pytest.raises(grpc.RpcError) as e:
        live["stub"].ModelInfer(req, metadata=AUTH)
    assert "32 elements for shape [1, 1, 8, 8] (64 expected)" in e.value.details()


def test_a_message_over_the_size_limit_is_resource_exhausted(live):
    big = np.zeros((300, 1, 8, 8), np.float32)  # 76.8 KB of raw contents; the limit here is 64 KiB
    with pytest.raises(grpc.RpcError) as e:
        live["stub"].ModelInfer(_grpc_request(big, raw=True), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = np.zeros((100, 1, 8, 8), np.float32)
    assert list(live["stub"].ModelInfer(_grpc_request(small, raw=True), metadata=AUTH).outputs[0].shape) == [100, 10]


def test_grpc_requests_share_the_metrics_and_the_batcher(live, digits):
    import concurrent.futures as cf

    x = digits.test.inputs["image"][:1].numpy()
    metrics = live["app"].server.metrics.registry
    sample = {"model": "tiny", "endpoint": "grpc_infer", "status": "200"}
    for _ in range(3):  # on a machine busy with other work the calls may all arrive one by one: burst again
        before = metrics.get_sample_value("keiryo_requests_total", sample) or 0.0
        batches = metrics.get_sample_value("keiryo_batch_size_count", {"model": "tiny"}) or 0.0
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: live["stub"].ModelInfer(_grpc_request(x, raw=True), metadata=AUTH), range(64)))
        assert metrics.get_sample_value("keiryo_requests_total", sample) == before + 64
        ran = metrics.get_sample_value("keiryo_batch_size_count", {"model": "tiny"}) - batches
        if ran < 64:
            break
    assert ran < 64  # concurrent gRPC calls were batched together
    for i in range(50):  # unknown names from the request never become labels
        with pytest.raises(grpc.RpcError):
            live["stub"].ModelInfer(_grpc_request(x, raw=True, model=f"junk{i}"), metadata=AUTH)
    text = httpx.get(live["url"] + "/metrics", headers={"Authorization": f"Bearer {API}"}).text
    assert "junk" not in text and 'endpoint="grpc_infer",model="unknown",status="404"' in text


_TRITON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as g
    port, key, x_path = sys.argv[1], sys.argv[2], sys.argv[3]
    c = g.InferenceServerClient(url=f"127.0.0.1:{port}")
    h = {"authorization": f"Bearer {key}"}
    x = np.load(x_path)
    out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("tiny", headers=h)}
    meta = c.get_model_metadata("tiny", headers=h, as_json=True)
    out["inputs"] = [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]]
    inp = g.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = c.infer("tiny", [inp], outputs=[g.InferRequestedOutput("logits")], headers=h, request_id="t-1")
    out["logits"] = res.as_numpy("logits").astype("<f4").tobytes().hex()
    out["id"] = res.get_response().id
    try:
        c.infer("tiny", [inp], headers={"authorization": "Bearer nope-nope-nope-nope"})
    except g.InferenceServerException as e:
        out["refused"] = e.status()
    print(json.dumps(out))
    """
)


def test_tritonclient_grpc_works_against_it(live, digits, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tritonclient.grpc") is None:  # found, not imported: see the module docstring
        pytest.skip("tritonclient.grpc is not installed")
    x = np.ascontiguousarray(digits.test.inputs["image"][:4].numpy())
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _TRITON, str(live["app"].server.grpc_bound), API, str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"] and out["id"] == "t-1"
    assert out["inputs"] == [["image", "FP32", [-1, 1, 8, 8]]]
    assert bytes.fromhex(out["logits"]) == _rest(live, x, binary=True)
    assert out["refused"] == "StatusCode.UNAUTHENTICATED"


def _certs(tmp_path):
    """A CA, and a server (127.0.0.1) and a client certificate it signed, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    out = {}
    for name in ("ca", "server", "client"):
        key = ca_key if name == "ca" else ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=name == "ca", path_length=None), critical=True)
        )
        if name != "ca":
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        (tmp_path / f"{name}.key").write_bytes(pem)
        out[name] = (tmp_path / f"{name}.crt").read_bytes(), pem
    return out


def test_keiryo_serve_grpc_port_with_mutual_tls(live, digits, tmp_path):
    """`keiryo serve --grpc-port` (uvloop, the CLI's wiring): the gRPC port speaks the REST port's TLS,
    refuses a client without a certificate, answers like REST, and SIGTERM ends the process cleanly."""
    from pathlib import Path

    certs = _certs(tmp_path)
    port, gport = free_port(), free_port()
    signed = live["signed"]
    cmd = [str(Path(sys.executable).parent / "keiryo"), "serve", "--registry", str(live["store"].root), "--model", "tiny@1.0.0"]
    cmd += ["--public-key", str(signed["pub"]), "--port", str(port), "--grpc-port", str(gport), "--poll-s", "0"]
    cmd += ["--tuf-cache", str(tmp_path / "cache"), "--ssl-certfile", str(tmp_path / "server.crt")]
    cmd += ["--ssl-keyfile", str(tmp_path / "server.key"), "--ssl-ca-certs", str(tmp_path / "ca.crt")]
    proc = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": API}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    creds = grpc.ssl_channel_credentials(certs["ca"][0], certs["client"][1], certs["client"][0])
    x = np.ascontiguousarray(digits.test.inputs["image"][:2].numpy())
    try:
        with grpc.secure_channel(f"127.0.0.1:{gport}", creds) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            deadline = time.time() + 60
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        break
                except grpc.RpcError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise
                time.sleep(0.2)
            resp = stub.ModelInfer(_grpc_request(x, raw=True), metadata=AUTH, timeout=10)
            assert resp.raw_output_contents[0] == _rest(live, x, binary=True)  # live serves the same 1.0.0
        anonymous = grpc.ssl_channel_credentials(certs["ca"][0])  # trusts the server, has no certificate
        with grpc.secure_channel(f"127.0.0.1:{gport}", anonymous) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:  # no plaintext on a TLS port
            with pytest.raises(grpc.RpcError):
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert proc.poll() is None
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith('{"request_id"')]
        assert any(r["method"] == "GRPC" and r["path"].endswith("/ModelInfer") and r["status"] == 200 for r in lines)
    finally:
        proc.kill()
