"""Deploy assets: the Kubernetes manifests validate against the Kubernetes API schema (offline, strict),
and the Docker build context holds a verified registry the server can start from."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import yaml
from test_cli import one_line_error, run_cli

from keiryo.packages import keygen, package
from keiryo.packages.store import PackageStore


@pytest.fixture(scope="module")
def signed(tiny_results, tmp_path_factory):
    out, _ = tiny_results
    d = tmp_path_factory.mktemp("deploy")
    priv, pub = keygen(d / "key.pem")
    return package(out, name="tiny", version="1.0.0", private_key=priv, out=d / "pkg"), pub


def test_k8s_manifests_validate_against_the_api_schema(signed, tmp_path, capsys):
    import kubernetes_validate

    pkg, pub = signed
    k8s = ["deploy", "k8s", str(pkg), "--public-key", str(pub), "--out", str(tmp_path / "k8s"), "--cpu", "500m"]
    code, out, err = run_cli(*k8s, capsys=capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "keiryo.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"]
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)  # raises on any schema error
    c = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["requests"]["cpu"] == "500m" and c["resources"]["limits"]["memory"] == "1Gi"
    assert c["image"] == "keiryo-tiny:1.0.0" and c["securityContext"]["readOnlyRootFilesystem"]
    hpa = docs[2]["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu" and hpa["scaleTargetRef"]["name"] == docs[0]["metadata"]["name"]
    assert "args" not in c and c["ports"] == [{"name": "http", "containerPort": 8000}]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the TUF cache under a read-only root
    policy = docs[3]["spec"]  # by default: any pod of the same namespace, on the serving port only
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keiryo-tiny"}
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8000}]}]


def _serve_options():
    import typer

    from keiryo.cli.main import app

    cmd = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {opt for p in cmd.params for opt in p.opts}


def test_k8s_tls_mtls_and_network_policy_validate(signed, tmp_path, capsys):
    """--tls-secret mounts a kubernetes.io/tls Secret and passes it to `keiryo serve` (appended to the image's
    ENTRYPOINT, every flag one serve knows); probes go over HTTPS, or to the port under mTLS (the kubelet has
    no client certificate); the NetworkPolicy takes namespace and pod selectors."""
    import kubernetes_validate

    pkg, pub = signed
    args = ["deploy", "k8s", str(pkg), "--public-key", str(pub), "--tls-secret", "tiny-tls"]
    code, _, err = run_cli(*args, "--out", str(tmp_path / "tls"), capsys=capsys)
    assert code == 0, err
    text = (tmp_path / "tls" / "keiryo.yaml").read_text()
    assert "kubectl create secret tls tiny-tls" in text
    docs = list(yaml.safe_load_all(text))
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    pod = docs[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["--ssl-certfile", "/etc/keiryo/tls/tls.crt", "--ssl-keyfile", "/etc/keiryo/tls/tls.key"]
    assert {"name": "tls", "secret": {"secretName": "tiny-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/etc/keiryo/tls", "readOnly": True} in c["volumeMounts"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "https", "scheme": "HTTPS"}
    assert docs[1]["spec"]["ports"] == [{"name": "https", "port": 8000, "targetPort": "https"}]

    mtls = [*args, "--client-ca-secret", "clients-ca", "--ingress-namespaces", "kubernetes.io/metadata.name=apps"]
    code, _, err = run_cli(*mtls, "--ingress-pods", "role=frontend,tier=web", "--out", str(tmp_path / "m"), capsys=capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all((tmp_path / "m" / "keiryo.yaml").read_text()))
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    c = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][-2:] == ["--ssl-ca-certs", "/etc/keiryo/client-ca/ca.crt"]
    assert set(c["args"][::2]) <= _serve_options()
    assert all(c[p]["tcpSocket"] == {"port": "https"} and "httpGet" not in c[p] for p in ("livenessProbe", "readinessProbe"))
    (peer,) = docs[3]["spec"]["ingress"][0]["from"]
    assert peer == {
        "podSelector": {"matchLabels": {"role": "frontend", "tier": "web"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}},
    }

    bad = [
        (["--client-ca-secret", "ca"], "needs --tls-secret"),
        (["--tls-secret", "Bad_Name"], "secret name 'Bad_Name'"),
        (["--ingress-pods", "role"], "--ingress-pods 'role': expected labels key=value"),
        (["--ingress-namespaces", "a=b c"], "--ingress-namespaces"),
    ]
    for i, (extra, msg) in enumerate(bad):
        out = tmp_path / f"bad{i}"
        code, _, err = run_cli("deploy", "k8s", str(pkg), "--public-key", str(pub), *extra, "--out", str(out), capsys=capsys)
        assert code != 0 and msg in one_line_error(err) and not out.exists(), (extra, err)


def test_the_docker_entrypoint_takes_serve_options_as_arguments(signed, tmp_path):
    import json as _json

    from keiryo.serve.deploy import write_docker

    pkg, pub = signed
    df = (write_docker(pkg, pub, tmp_path / "d") / "Dockerfile").read_text()
    line = df[df.index("ENTRYPOINT ") + len("ENTRYPOINT ") :].split("\n\n")[0].replace("\\\n", "")
    cmd = _json.loads(line.strip())
    assert cmd[:2] == ["keiryo", "serve"] and "\nCMD " not in df
    assert {a for a in cmd[2:] if a.startswith("--")} <= _serve_options()


def test_a_broken_manifest_is_caught_by_the_validator(signed):
    import kubernetes_validate

    from keiryo.packages import read_manifest
    from keiryo.serve.deploy import k8s_manifests

    dep = k8s_manifests(read_manifest(signed[0]))[0]
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def test_docker_context_has_a_verified_registry_and_a_slim_cpu_image(signed, tmp_path, capsys):
    pkg, pub = signed
    out = tmp_path / "docker"
    code, _, err = run_cli("deploy", "docker", str(pkg), "--public-key", str(pub), "--out", str(out), capsys=capsys)
    assert code == 0, err
    df = (out / "Dockerfile").read_text()
    assert df.startswith("# keiryo inference server") and "FROM python:3.11-slim" in df
    assert "torch" not in df.replace("training stack, torch", "")  # the server does not need torch
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.lock" in df and "pip install --no-deps" not in df
    assert "COPY requirements.lock /tmp/requirements.lock" in df and "COPY wheels /tmp/wheels" in df
    from keiryo.serve.deploy import lock_file

    # the serving lock, plus keiryo's own wheel (built from this source tree) pinned by its sha256
    (whl,) = (out / "wheels").iterdir()
    lock = (out / "requirements.lock").read_text()
    assert lock.startswith(lock_file("onnxruntime").read_text().rstrip("\n") + "\n")
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    assert lock.endswith(f"/tmp/wheels/{whl.name} --hash=sha256:{digest}\n") and whl.name.startswith("keiryo-")
    # pip holds the image to that hash: the wheel as written installs, one changed byte is refused
    only = tmp_path / "keiryo.lock"
    only.write_text(f"{whl} --hash=sha256:{digest}\n")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--require-hashes", "--no-index", "-r", str(only)]
    ok = subprocess.run(pip, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-500:]
    blob = bytearray(whl.read_bytes())
    blob[len(blob) // 2] ^= 1
    whl.write_bytes(bytes(blob))
    bad = subprocess.run(pip, capture_output=True, text=True)
    assert bad.returncode != 0 and "DO NOT MATCH THE HASHES" in bad.stderr
    code, _, err = run_cli(
        "deploy", "docker", str(pkg), "--public-key", str(pub), "--keiryo-wheel", str(pub), "--out", str(tmp_path / "d3"),
        capsys=capsys,
    )  # fmt: skip
    assert code != 0 and "--keiryo-wheel" in one_line_error(err) and not (tmp_path / "d3").exists()
    assert "USER 10001" in df and '"tiny@production"' in df
    store = PackageStore(out / "registry")
    assert store.resolve("tiny@production") == ("tiny", "1.0.0")
    code, _, err = run_cli("deploy", "docker", str(pkg), "--out", str(tmp_path / "d2"), capsys=capsys)
    assert code != 0 and "pass --public-key" in one_line_error(err)
    code, _, err = run_cli("deploy", "docker", str(pkg), "--public-key", str(pub), "--out", str(out), capsys=capsys)
    assert code != 0 and "exists" in one_line_error(err)


def _crafted(pkg, bad):
    """A copy of ``pkg`` whose manifest name would start a second YAML document (a privileged Pod); unsigned."""
    import json
    import shutil

    shutil.copytree(pkg, bad)
    m = json.loads((bad / "keiryo.json").read_text())
    m["name"] = "x\n---\napiVersion: v1\nkind: Pod\nspec: {hostPID: true}"
    (bad / "keiryo.json").write_text(json.dumps(m))
    return bad


def test_k8s_needs_a_verified_package_and_a_crafted_name_never_reaches_the_yaml(signed, tmp_path, capsys):

    from keiryo.packages.signing import sign_dir

    pkg, pub = signed
    code, _, err = run_cli("deploy", "k8s", str(pkg), "--out", str(tmp_path / "a"), capsys=capsys)
    assert code != 0 and "pass --public-key" in one_line_error(err)
    bad = _crafted(pkg, tmp_path / "bad")
    code, _, err = run_cli("deploy", "k8s", str(bad), "--public-key", str(pub), "--out", str(tmp_path / "b"), capsys=capsys)
    assert code != 0 and not (tmp_path / "b").exists()  # the signature no longer matches
    priv = pkg.parent / "key.pem"
    sign_dir(bad, priv)  # even signed by the right key, the name is refused
    code, _, err = run_cli("deploy", "k8s", str(bad), "--public-key", str(pub), "--out", str(tmp_path / "c"), capsys=capsys)
    assert code != 0 and "package name" in one_line_error(err) and not (tmp_path / "c").exists()


def test_knative_service_scales_to_zero_and_its_pod_spec_validates(signed, tmp_path, capsys):
    """Knative's CRDs are not in kubernetes-validate's schemas: the Service's structure is checked here, and its
    revision template's pod spec, less Knative's own two fields, is validated strictly as a Kubernetes PodSpec."""
    import kubernetes_validate

    pkg, pub = signed
    out = tmp_path / "kn"
    args = ["deploy", "knative", str(pkg), "--public-key", str(pub), "--out", str(out), "--concurrency", "16"]
    code, _, err = run_cli(*args, "--max-replicas", "4", capsys=capsys)
    assert code == 0, err
    text = (out / "knative.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 1
    svc = docs[0]
    assert (svc["apiVersion"], svc["kind"], svc["metadata"]["name"]) == ("serving.knative.dev/v1", "Service", "keiryo-tiny")
    tmpl = svc["spec"]["template"]
    ann = tmpl["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "0" and ann["autoscaling.knative.dev/max-scale"] == "4"
    assert ann["autoscaling.knative.dev/target"] == "16" and ann["autoscaling.knative.dev/metric"] == "concurrency"
    assert ann["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
    assert all(isinstance(v, str) for v in ann.values())  # Knative refuses non-string annotation values
    assert "min-scale: '0'" in text  # quoted in the file, not the integer 0
    spec = dict(tmpl["spec"])
    assert spec.pop("containerConcurrency") == 16 and spec.pop("timeoutSeconds") == 60
    (c,) = spec["containers"]
    # the image's serverless function, not `keiryo serve`, on the package the image holds
    assert c["command"] == ["python", "-m", "keiryo.serverless_http"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KEIRYO_REGISTRY"] == "/srv/registry" and env["KEIRYO_MODEL"] == "tiny@production"
    assert env["KEIRYO_PUBLIC_KEY"] == "/srv/public.pem" and env["KEIRYO_TRUSTED_ROOT"] == "/srv/registry/tuf/1.root.json"
    assert env["KEIRYO_TUF_CACHE"].startswith("/tmp/") and env["KEIRYO_MAX_CONNECTIONS"] == "48"
    assert len(c["ports"]) == 1 and c["ports"][0] == {"name": "http1", "containerPort": 8000}  # Knative: one port
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert c["image"] == "keiryo-tiny:1.0.0"  # what `keiryo deploy docker` tells you to build
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the image's --tuf-cache is under /tmp
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e} == {"keiryo-tiny-keys"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "revision"}, "spec": spec}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_knative_needs_the_key_and_refuses_a_crafted_package(signed, tmp_path, capsys):

    pkg, pub = signed
    code, _, err = run_cli("deploy", "knative", str(pkg), "--out", str(tmp_path / "a"), capsys=capsys)
    assert code != 0 and "pass --public-key" in one_line_error(err)
    bad = _crafted(pkg, tmp_path / "bad")
    code, _, err = run_cli("deploy", "knative", str(bad), "--public-key", str(pub), "--out", str(tmp_path / "b"), capsys=capsys)
    assert code != 0 and not (tmp_path / "b").exists()  # the signature no longer matches
    code, _, err = run_cli("deploy", "kn", str(pkg), "--public-key", str(pub), "--out", str(tmp_path / "c"), capsys=capsys)
    assert code != 0 and "expected docker, k8s, knative or agent" in one_line_error(err)


def test_workload_names_are_dns_labels():
    from keiryo.errors import ConfigError
    from keiryo.serve.deploy import knative_service, workload_name

    assert workload_name({"name": "a.b_c"}) == "keiryo-a-b-c"
    long = {"name": "m" * 60 + "-x", "version": "1.0.0+build.5"}
    svc = knative_service(long)
    assert len(svc["metadata"]["name"]) <= 57 and not svc["metadata"]["name"].endswith("-")
    assert svc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "1.0.0_build.5"
    with pytest.raises(ConfigError, match="concurrency 0"):
        knative_service({"name": "m", "version": "1"}, concurrency=0)


def _locked(path):
    """name -> (version, [sha256...]) from a pip-compile --generate-hashes file (continuation lines joined)."""
    import re

    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, *opts = line.split(" --hash=")
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", req.strip())
        assert m, f"{path.name}: not an exact pin: {line!r}"
        assert opts and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in opts), f"{path.name}: {line!r}"
        out[m.group(1).lower().replace("_", "-")] = (m.group(2), [h.strip() for h in opts])
    return out


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_the_serving_lock_pins_every_package_with_hashes_and_no_torch(runtime):
    """The image's lock (scripts/lock-serve): every line an exact pin with sha256 hashes, every requirement of
    requirements*.in in it at a version its specifier allows, no torch or CUDA, and the versions the tests ran with."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    from keiryo.serve.deploy import lock_file

    lock = lock_file(runtime)
    assert "scripts/lock-serve" in lock.read_text()  # the command that made it heads the file
    pins = _locked(lock)
    assert not any(n.startswith(("torch", "nvidia-", "triton")) for n in pins)
    ins = [lock.with_name("requirements.in"), lock.with_name(f"requirements-{runtime}.in")]
    reqs = [ln.split("#")[0].strip() for f in ins for ln in f.read_text().splitlines()]
    for r in (Requirement(x) for x in reqs if x and not x.startswith("-r")):
        name = r.name.lower().replace("_", "-")
        assert name in pins and r.specifier.contains(pins[name][0]), (r, pins.get(name))
        installed = md.version(r.name)
        assert installed == pins[name][0], f"{r.name} {installed} installed, {pins[name][0]} locked: run scripts/lock-serve"


def test_the_lock_parser_refuses_an_unhashed_or_loose_line(tmp_path):
    ok = "six==1.17.0 \\\n    --hash=sha256:" + "a" * 64 + "\n"
    (tmp_path / "a.lock").write_text(ok)
    assert _locked(tmp_path / "a.lock") == {"six": ("1.17.0", ["sha256:" + "a" * 64])}
    for bad in ("six==1.17.0\n", "six>=1.0 --hash=sha256:" + "a" * 64 + "\n", "six==1 --hash=md5:abc\n"):
        (tmp_path / "b.lock").write_text(bad)
        with pytest.raises(AssertionError):
            _locked(tmp_path / "b.lock")
