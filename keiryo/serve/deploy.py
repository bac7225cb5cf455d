"""Deploy assets for a package: a slim CPU-only container, Kubernetes and Knative manifests, a systemd unit.

``keiryo deploy docker PKG --public-key pub.pem --out DIR`` writes a build context: the package
published in a registry (alias ``production``), the public key, a Dockerfile that installs only
what serving needs (no torch: the server runs the exported file), and a ``.dockerignore``.
``keiryo deploy k8s PKG --out DIR`` writes a Deployment (probes on the OIP health paths, resource
requests and limits, non-root, read-only root filesystem), a Service and a CPU-based
HorizontalPodAutoscaler. ``keiryo deploy knative PKG --out DIR`` writes a Knative Service that
scales to zero and runs the same image. Every manifest is for a package verified with
``--public-key``; nothing from the manifest reaches a YAML file but through the YAML serializer,
and the names it yields are checked as DNS labels.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from keiryo._atomic import atomic_dir, write_atomic
from keiryo.errors import ConfigError
from keiryo.packages.package import read_manifest
from keiryo.packages.trust import EXPIRY_DAYS

SERVE_PORT = 8000
# where the image of `keiryo deploy docker` keeps the registry (the package at alias production) and the public key,
# and the TUF cache under the writable /tmp
IMAGE_REGISTRY, IMAGE_PUBLIC_KEY, IMAGE_TUF_CACHE = "/srv/registry", "/srv/public.pem", "/tmp/keiryo-tuf"
# what the server imports (the CLI, the package layer, the runtime of the file, the HTTP stack), pinned with hashes:
# keiryo/serve/requirements-RUNTIME.lock, made by scripts/lock-serve from keiryo/serve/requirements*.in
LOCKS = {"onnxruntime": "requirements-onnxruntime.lock", "litert": "requirements-litert.lock"}


def lock_file(runtime: str) -> Path:
    """The hashed lock of the serving image for a package's runtime (package data of keiryo.serve)."""
    if runtime not in LOCKS:
        raise ConfigError(f"runtime {runtime!r}: no serving image for it; expected one of {sorted(LOCKS)}")
    return Path(__file__).with_name(LOCKS[runtime])


WHEEL_RE = re.compile(r"^keiryo-[0-9][0-9A-Za-z.+!_]*-py3-none-any\.whl$")


def keiryo_wheel(given: str | Path | None, into: Path) -> Path:
    """The keiryo wheel the image installs, in ``into``: ``given`` (``--keiryo-wheel``), else one built from the
    source tree this keiryo runs from (``pip wheel``, a few seconds). Hashed into the lock like every other
    distribution, so the image installs nothing unpinned."""
    import subprocess
    import sys

    into.mkdir(parents=True, exist_ok=True)
    if given is not None:
        src = Path(given)
        if not src.is_file() or not WHEEL_RE.match(src.name):
            raise ConfigError(f"--keiryo-wheel {given}: expected a keiryo wheel file (keiryo-VERSION-py3-none-any.whl)")
        return Path(shutil.copy2(src, into / src.name))
    tree = Path(__file__).resolve().parents[2]
    if not (tree / "pyproject.toml").is_file() or not (tree / "keiryo" / "serve" / "deploy.py").is_file():
        raise ConfigError(
            "deploy docker: keiryo is not running from a source tree, so no wheel can be built for the image; "
            "pass --keiryo-wheel keiryo-VERSION-py3-none-any.whl"
        )
    with tempfile.TemporaryDirectory() as td:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", td, str(tree)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        built = [p for p in Path(td).iterdir() if WHEEL_RE.match(p.name)]
        if done.returncode != 0 or len(built) != 1:
            why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise ConfigError(f"deploy docker: building keiryo's wheel from {tree} failed ({why}); pass --keiryo-wheel")
        return Path(shutil.move(str(built[0]), into / built[0].name))


def _hashed_line(path: Path, where: str) -> str:
    import hashlib

    return f"{where} --hash=sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}\n"


DNS_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _tag(version: str) -> str:
    """A package version as an image tag and a label value ('+' is valid in neither)."""
    return str(version).replace("+", "_")


def _image(manifest: dict[str, Any]) -> str:
    return f"keiryo-{manifest['name']}:{_tag(manifest['version'])}"


def workload_name(manifest: dict[str, Any], max_len: int = 63) -> str:
    """``keiryo-NAME`` as a DNS-1035 label (Kubernetes object names; Knative adds ``-00001`` for revisions)."""
    name = f"keiryo-{manifest['name']}".replace(".", "-").replace("_", "-")[:max_len].rstrip("-")
    if not DNS_LABEL_RE.match(name):
        raise ConfigError(f"package name {manifest['name']!r}: yields {name!r}, not a DNS label (a-z, 0-9, '-')")
    return name


# the image's HEALTHCHECK: /v2/health/ready over plain HTTP, else over TLS (the server's certificate is not checked:
# the probe talks to itself on 127.0.0.1); a server that demands client certificates (mTLS) fails it
HEALTHCHECK_PY = f"""import ssl
import sys
import urllib.request

for scheme, ctx in (("http", None), ("https", ssl._create_unverified_context())):
    try:
        with urllib.request.urlopen(f"{{scheme}}://127.0.0.1:{SERVE_PORT}/v2/health/ready", timeout=2, context=ctx) as r:
            sys.exit(0 if r.status == 200 else 1)
    except Exception:
        continue
sys.exit(1)
"""


def _dockerfile(manifest: dict[str, Any]) -> str:
    return f"""# keiryo inference server for {manifest["name"]} {manifest["version"]} ({manifest["format"]} on {manifest["runtime"]}), CPU only.
# Build: docker build -t {_image(manifest)} .
# Run:   docker run -p {SERVE_PORT}:{SERVE_PORT} -e KEIRYO_API_KEYS=<key of 16+ chars> {_image(manifest)}
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The server runs the exported file: the serving set and keiryo's own wheel (not its training stack, torch)
# from one lock file with the sha256 of every distribution (pip refuses anything unpinned or changed).
COPY requirements.lock /tmp/requirements.lock
COPY wheels /tmp/wheels
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock && rm -rf /tmp/wheels
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin keiryo
COPY --chown=root:root registry /srv/registry
COPY --chown=root:root public.pem /srv/public.pem
USER 10001
EXPOSE {SERVE_PORT}
COPY --chown=root:root healthcheck.py /srv/healthcheck.py
HEALTHCHECK --interval=10s --timeout=5s CMD ["python", "/srv/healthcheck.py"]
# more `keiryo serve` options as arguments: docker run IMAGE --ssl-certfile ... (Kubernetes: args);
# the HEALTHCHECK speaks HTTP or TLS; with --ssl-ca-certs (mTLS) run with --no-healthcheck (Kubernetes ignores it)
ENTRYPOINT ["keiryo", "serve", "--registry", "{IMAGE_REGISTRY}", "--model", "{manifest["name"]}@production", \\
     "--public-key", "{IMAGE_PUBLIC_KEY}", "--trusted-root", "{IMAGE_REGISTRY}/tuf/1.root.json", \\
     "--tuf-cache", "{IMAGE_TUF_CACHE}", "--host", "0.0.0.0", "--port", "{SERVE_PORT}"]
"""


def write_docker(pkg: str | Path, public_key: str | Path, out: str | Path, *, wheel: str | Path | None = None) -> Path:
    """A docker build context in ``out`` (written aside, then renamed into place); ``wheel``: keiryo's wheel for
    the image (default: built from the source tree, :func:`keiryo_wheel`)."""
    from keiryo.packages.store import PackageStore

    src, dst = Path(pkg), Path(out)
    manifest = read_manifest(src)
    lock = lock_file(manifest["runtime"])
    if dst.exists():
        raise ConfigError(f"{dst}: exists; choose another --out")
    with atomic_dir(dst, replace=False) as tmp, tempfile.TemporaryDirectory() as keys:
        # the image's registry is sealed: its keys are thrown away once it is written, and its metadata
        # lasts as long as a root (the image digest, not a timestamp, is what says it is current)
        store = PackageStore(tmp / "registry", keys, expiry_days={role: EXPIRY_DAYS["root"] for role in EXPIRY_DAYS})
        name, version = store.push(src, public_key, by="keiryo deploy")  # verifies the package
        store.promote(name, version, "production", by="keiryo deploy")
        shutil.copy2(public_key, tmp / "public.pem")
        whl = keiryo_wheel(wheel, tmp / "wheels")
        text = lock.read_text(encoding="utf-8").rstrip("\n") + "\n" + _hashed_line(whl, f"/tmp/wheels/{whl.name}")
        (tmp / "requirements.lock").write_text(text, encoding="utf-8")
        (tmp / "Dockerfile").write_text(_dockerfile(manifest), encoding="utf-8")
        (tmp / "healthcheck.py").write_text(HEALTHCHECK_PY, encoding="utf-8")
        (tmp / ".dockerignore").write_text("**/.lock\n", encoding="utf-8")
    return dst


def _api_key_env(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": "KEIRYO_API_KEYS", "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-keys"}}},
        {"name": "KEIRYO_ADMIN_KEYS", "valueFrom": {"secretKeyRef": {"name": secret, "key": "admin-keys", "optional": True}}},
    ]


TLS_DIR = "/etc/keiryo/tls"  # a kubernetes.io/tls Secret: tls.crt, tls.key
CLIENT_CA_DIR = "/etc/keiryo/client-ca"  # a Secret with ca.crt
_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_labels(text: str | None, what: str) -> dict[str, str] | None:
    """``k=v[,k=v]`` as a label selector's ``matchLabels`` (None when not given)."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or not _LABEL_KEY_RE.match(key) or len(key) > 253 or not _LABEL_VALUE_RE.match(value):
            raise ConfigError(f"{what} {text!r}: expected labels key=value[,key=value] (Kubernetes label syntax)")
        out[key] = value
    return out


def network_policy(
    name: str,
    labels: dict[str, str],
    *,
    from_namespaces: dict[str, str] | None = None,
    from_pods: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ingress to the server's pods only on the serving port, only from the selected peers: by default every
    pod of the same namespace; ``from_namespaces`` (namespace labels; ``kubernetes.io/metadata.name=NS`` names
    one) and ``from_pods`` (pod labels) narrow or widen it. Egress is not restricted."""
    peer: dict[str, Any] = {"podSelector": {"matchLabels": from_pods} if from_pods else {}}
    if from_namespaces is not None:
        peer["namespaceSelector"] = {"matchLabels": from_namespaces}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [peer], "ports": [{"protocol": "TCP", "port": SERVE_PORT}]}],
        },
    }


def k8s_manifests(
    manifest: dict[str, Any],
    *,
    image: str | None = None,
    replicas: int = 2,
    max_replicas: int = 10,
    cpu_target: int = 70,
    cpu: str = "1",
    memory: str = "1Gi",
    tls_secret: str | None = None,
    client_ca_secret: str | None = None,
    ingress_namespaces: dict[str, str] | None = None,
    ingress_pods: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Deployment, Service, HPA and NetworkPolicy. ``tls_secret``: a ``kubernetes.io/tls`` Secret mounted at
    ``/etc/keiryo/tls`` and passed as ``--ssl-certfile/--ssl-keyfile``; ``client_ca_secret`` (needs
    ``tls_secret``): a Secret with ``ca.crt`` passed as ``--ssl-ca-certs`` (mutual TLS)."""
    name = workload_name(manifest)
    for secret in (tls_secret, client_ca_secret):
        if secret is not None and (len(secret) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", secret)):
            raise ConfigError(f"secret name {secret!r}: expected a Kubernetes object name (a-z, 0-9, '-', '.')")
    if client_ca_secret is not None and tls_secret is None:
        raise ConfigError("--client-ca-secret needs --tls-secret (client certificates are checked over TLS)")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/version": _tag(manifest["version"])}
    port_name = "https" if tls_secret else "http"
    args: list[str] = []  # appended to the image's ENTRYPOINT (keiryo serve ...)
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]  # the TUF cache; the root filesystem is read-only
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    if tls_secret:
        args += ["--ssl-certfile", f"{TLS_DIR}/tls.crt", "--ssl-keyfile", f"{TLS_DIR}/tls.key"]
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret, "defaultMode": 0o440}})
    if client_ca_secret:
        args += ["--ssl-ca-certs", f"{CLIENT_CA_DIR}/ca.crt"]
        mounts.append({"name": "client-ca", "mountPath": CLIENT_CA_DIR, "readOnly": True})
        volumes.append({"name": "client-ca", "secret": {"secretName": client_ca_secret, "defaultMode": 0o444}})

    def probe(path: str, **kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"periodSeconds": 10, "timeoutSeconds": 2, **kw}
        if client_ca_secret:
            # the kubelet cannot present a client certificate: it checks the port, which uvicorn opens only
            # once every model is verified, reproduced and loaded (startup runs before the socket is bound)
            return {"tcpSocket": {"port": port_name}, **base}
        get = {"path": path, "port": port_name, **({"scheme": "HTTPS"} if tls_secret else {})}
        return {"httpGet": get, **base}

    container: dict[str, Any] = {
        "name": "server",
        "image": image or _image(manifest),
        **({"args": args} if args else {}),
        "ports": [{"name": port_name, "containerPort": SERVE_PORT}],
        "env": _api_key_env(f"{name}-keys"),
        "livenessProbe": probe("/v2/health/live"),
        "readinessProbe": probe("/v2/health/ready", periodSeconds=5),
        "startupProbe": probe("/v2/health/live", failureThreshold=30, periodSeconds=2),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 40,  # > the server's 30 s drain
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "fsGroup": 10001,  # the secret files (0440) are readable by the server's group
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": port_name, "port": SERVE_PORT, "targetPort": port_name}],
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu_target}},
                }
            ],
        },
    }
    policy = network_policy(name, labels, from_namespaces=ingress_namespaces, from_pods=ingress_pods)
    return [deployment, service, hpa, policy]


def write_k8s(pkg: str | Path, out: str | Path, public_key: str | Path, **kw: Any) -> Path:
    """``out/keiryo.yaml`` with the Deployment, Service, HPA and NetworkPolicy (one multi-document file), for a package
    verified with ``public_key``. Nothing from the manifest goes into the file but through the YAML
    serializer (its name and version are validated by ``read_manifest`` too)."""
    import yaml

    from keiryo.packages.package import verify

    manifest = verify(pkg, public_key, golden=False)["manifest"]
    docs = k8s_manifests(manifest, **kw)
    name = docs[0]["metadata"]["name"]
    header = f"# keiryo: create the API-key secret first: kubectl create secret generic {name}-keys --from-literal=api-keys=...\n"
    if kw.get("tls_secret"):
        header += f"# TLS: kubectl create secret tls {kw['tls_secret']} --cert=server.crt --key=server.key\n"
    if kw.get("client_ca_secret"):
        header += f"# mTLS: kubectl create secret generic {kw['client_ca_secret']} --from-file=ca.crt=clients-ca.pem\n"
    return write_atomic(Path(out) / "keiryo.yaml", header + yaml.safe_dump_all(docs, sort_keys=False))


def knative_service(
    manifest: dict[str, Any],
    *,
    image: str | None = None,
    max_scale: int = 10,
    concurrency: int = 32,
    cpu: str = "1",
    memory: str = "1Gi",
    timeout_s: int = 60,
) -> dict[str, Any]:
    """A Knative Service (``serving.knative.dev/v1``) running the ``keiryo deploy docker`` image's serverless
    function (:mod:`keiryo.serverless_http`: no FastAPI, no uvicorn, a short scale from zero) on the package the
    image holds: scaled to zero when idle (``min-scale: "0"``, the KPA autoscaler), scaled on in-flight requests per
    pod (``target``), at most ``concurrency`` at once per pod (``containerConcurrency``: the queue-proxy queues the
    rest). The function verifies and loads the package before it binds its port, so no request reaches a pod that
    is not ready (the activator holds them during a cold start)."""
    if not (1 <= max_scale <= 1000 and 1 <= concurrency <= 10000 and 1 <= timeout_s <= 3600):
        raise ConfigError(
            f"max_scale {max_scale}, concurrency {concurrency}, timeout_s {timeout_s}: expected 1-1000, 1-10000, 1-3600"
        )
    name = workload_name(manifest, max_len=57)  # the revision is NAME-00001, itself a DNS label
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/version": _tag(manifest["version"])}
    probe = {"httpGet": {"path": "/v2/health/ready", "port": SERVE_PORT}, "periodSeconds": 1, "timeoutSeconds": 2}
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {  # Knative reads annotation values as strings
                        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",  # the one that scales to zero
                        "autoscaling.knative.dev/metric": "concurrency",
                        "autoscaling.knative.dev/target": str(concurrency),
                        "autoscaling.knative.dev/min-scale": "0",
                        "autoscaling.knative.dev/max-scale": str(max_scale),
                    },
                },
                "spec": {
                    # a hard cap per pod: the queue-proxy holds requests past it, the function's threads never pile up
                    "containerConcurrency": concurrency,
                    "timeoutSeconds": timeout_s,
                    "containers": [
                        {
                            "name": "server",
                            "image": image or _image(manifest),
                            "command": ["python", "-m", "keiryo.serverless_http"],  # in place of `keiryo serve`
                            "ports": [{"name": "http1", "containerPort": SERVE_PORT}],  # Knative sets $PORT to it
                            "env": [
                                *_api_key_env(f"{name}-keys")[:1],  # the function has no admin routes
                                {"name": "KEIRYO_REGISTRY", "value": IMAGE_REGISTRY},
                                {"name": "KEIRYO_MODEL", "value": f"{manifest['name']}@production"},
                                {"name": "KEIRYO_PUBLIC_KEY", "value": IMAGE_PUBLIC_KEY},
                                {"name": "KEIRYO_TRUSTED_ROOT", "value": f"{IMAGE_REGISTRY}/tuf/1.root.json"},
                                {"name": "KEIRYO_TUF_CACHE", "value": IMAGE_TUF_CACHE},
                                # the queue-proxy's pooled keep-alive connections beside the ones in use
                                {"name": "KEIRYO_MAX_CONNECTIONS", "value": str(2 * concurrency + 16)},
                            ],
                            "readinessProbe": probe,
                            "livenessProbe": {
                                **probe,
                                "httpGet": {"path": "/v2/health/live", "port": SERVE_PORT},
                                "periodSeconds": 10,
                            },
                            "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": 10001,
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # the TUF cache
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            }
        },
    }


def write_knative(pkg: str | Path, out: str | Path, public_key: str | Path, **kw: Any) -> Path:
    """``out/knative.yaml``: the Knative Service for a package verified with ``public_key`` (see ``knative_service``)."""
    import yaml

    from keiryo.packages.package import verify

    manifest = verify(pkg, public_key, golden=False)["manifest"]
    doc = knative_service(manifest, **kw)
    name = doc["metadata"]["name"]
    header = (
        "# keiryo: a scale-to-zero Knative Service; the image is the one `keiryo deploy docker` builds.\n"
        f"# Create the API-key secret first: kubectl create secret generic {name}-keys --from-literal=api-keys=...\n"
    )
    return write_atomic(Path(out) / "knative.yaml", header + yaml.safe_dump(doc, sort_keys=False))


_UNIT = """\
# keiryo agent for {name}@{alias}: generated by `keiryo deploy agent`. Install:
#   sudo install -d -m 0755 /etc/keiryo/{name} && sudo cp root.json public.pem /etc/keiryo/{name}/
#   sudo cp keiryo-agent-{name}.service /etc/systemd/system/ && sudo systemctl daemon-reload
#   sudo systemctl enable --now keiryo-agent-{name}
[Unit]
Description=keiryo agent: keeps {name}@{alias} current and serves it locally
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
DynamicUser=yes
StateDirectory=keiryo/{name}
ExecStart={exe} agent run --source "{source}" --name {name} --alias {alias} \\
    --trusted-root /etc/keiryo/{name}/root.json --public-key /etc/keiryo/{name}/public.pem \\
    --state-dir /var/lib/keiryo/{name} --host 127.0.0.1 --port {port} --health-window-s {health_window_s:g}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
MemoryMax={memory_max}

[Install]
WantedBy=multi-user.target
"""


def write_agent(
    pkg: str | Path,
    public_key: str | Path,
    trusted_root: str | Path,
    out: str | Path,
    *,
    source: str,
    alias: str = "production",
    port: int = 8200,
    health_window_s: float = 10.0,
    memory_max: str = "512M",
    exe: str = "/usr/local/bin/keiryo",
) -> Path:
    """A systemd unit for ``keiryo agent run`` on a device, with the trusted root and public key beside it."""
    import re

    from keiryo.packages.package import verify
    from keiryo.packages.store import _check_alias

    verify(pkg, public_key)  # the package the device will follow is one this key signed
    name = read_manifest(pkg)["name"]  # checked by read_manifest: letters, digits, . _ -
    _check_alias(alias)
    if not re.match(r"^(https?://[A-Za-z0-9._~:/?#@!$&'()*+,;=-]+|/[A-Za-z0-9._/-]+)$", source):
        raise ConfigError(f"--source {source!r}: expected an http(s):// URL or an absolute directory, no spaces or quotes")
    if not re.match(r"^[0-9]+[KMG]?$", memory_max) or not re.match(r"^/[A-Za-z0-9._/-]+$", exe):
        raise ConfigError(f"memory_max {memory_max!r} / exe {exe!r}: expected e.g. 512M and an absolute path")
    if not Path(trusted_root).is_file():
        raise ConfigError(f"{trusted_root}: trusted root not found (the registry's tuf/1.root.json)")
    dst = Path(out)
    with atomic_dir(dst, replace=False) as tmp:
        unit = _UNIT.format(
            name=name,
            alias=alias,
            source=source,
            port=int(port),
            health_window_s=float(health_window_s),
            memory_max=memory_max,
            exe=exe,
        )
        (tmp / f"keiryo-agent-{name}.service").write_text(unit, encoding="utf-8")
        shutil.copy2(public_key, tmp / "public.pem")
        shutil.copy2(trusted_root, tmp / "root.json")
    return dst
