"""A function-platform handler: ``keiryo.serverless:handler(event, context)``.

An AWS Lambda-style API Gateway proxy event in (``body``, ``isBase64Encoded``, ``headers``, ``httpMethod`` /
``requestContext.http.method``, ``path`` / ``rawPath``), an Open Inference Protocol v2 response out
(``statusCode``, ``headers``, ``body``, ``isBase64Encoded``): ``POST .../infer`` (JSON or the binary tensor
extension), ``GET .../v2/models/NAME`` (metadata) and the health paths.

The model is verified and loaded once, at init (module import on a cold start, or the first call),
from the environment, and never answered "not ready": a package that fails verification fails the
init. It imports onnxruntime and keiryo's package code only (no torch, no FastAPI, no uvicorn).

- ``KEIRYO_PACKAGE``: a package directory, or ``KEIRYO_REGISTRY`` (a registry directory or URL) with
  ``KEIRYO_MODEL`` (``NAME[@ALIAS]``) and optionally ``KEIRYO_TRUSTED_ROOT`` / ``KEIRYO_TUF_CACHE``;
- ``KEIRYO_PUBLIC_KEY``: the signer's public key (PEM file), required;
- ``KEIRYO_API_KEYS``: bearer keys (comma-separated); unset, the platform's own auth is relied on;
- ``KEIRYO_THREADS``: intra-op threads (default 1).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from keiryo.errors import ConfigError, KeiryoError, PackageNotFoundError

_lock = threading.Lock()
_loaded: Loaded | None = None


@dataclass
class Loaded:
    name: str
    version: str
    manifest: dict[str, Any]
    session: Any
    keys: list[str]

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.manifest["inputs"]}


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"${name} is not set: the serverless handler needs it (see keiryo.serverless)")
    return value


def init() -> Loaded:
    """Verify and load the model named by the environment (once per process)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        from keiryo.packages.verified import load_verified

        public_key = _env("KEIRYO_PUBLIC_KEY")
        threads = int(os.environ.get("KEIRYO_THREADS") or 1)
        if os.environ.get("KEIRYO_PACKAGE"):
            pkg, session = load_verified(os.environ["KEIRYO_PACKAGE"], public_key, threads=threads)
        elif os.environ.get("KEIRYO_REGISTRY"):
            from keiryo.packages.remote import open_registry

            registry = open_registry(
                os.environ["KEIRYO_REGISTRY"], os.environ.get("KEIRYO_TRUSTED_ROOT"), os.environ.get("KEIRYO_TUF_CACHE")
            )
            name, version = registry.resolve(_env("KEIRYO_MODEL"))
            files, trusted = registry.fetch_package(name, version)
            pkg, session = load_verified(
                None, public_key, files=files, name=name, version=version, trusted=trusted, threads=threads
            )
        else:
            raise ConfigError("set $KEIRYO_PACKAGE (a package directory) or $KEIRYO_REGISTRY and $KEIRYO_MODEL")
        m = pkg.manifest
        keys = [k for k in (os.environ.get("KEIRYO_API_KEYS") or "").split(",") if k]
        _loaded = Loaded(m["name"], m["version"], m, session, keys)
        return _loaded


Response = tuple[int, dict[str, str], bytes]  # status, headers, body


def _json(status: int, doc: Any) -> Response:
    return status, {"content-type": "application/json"}, json.dumps(doc).encode()


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def respond(method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
    """One OIP request (``headers`` with lower-case names) -> (status, headers, body); the function's core, which
    :func:`handler` (function platforms) and :mod:`keiryo.serverless_http` (Knative) put their transport around."""
    from keiryo.serve.protocol import NonFiniteOutput, ProtocolError, build_response, parse_request

    m = init()
    if path.startswith("/v2/health/"):
        return _json(200, {"live": True} if path.endswith("live") else {"ready": True})
    if m.keys:
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        ok = False
        for k in m.keys:  # constant time, every key
            ok |= hmac.compare_digest(token.encode(), k.encode())
        if not ok:
            return _error(401, "missing or invalid API key")
    if method == "GET":
        meta = {"name": m.name, "versions": [m.version], "platform": f"{m.manifest['runtime']}_{m.manifest['format']}"}
        return _json(200, {**meta, "inputs": m.manifest["inputs"], "outputs": m.manifest["outputs"]})
    try:
        req = parse_request(body, headers.get("inference-header-content-length"), m.inputs)
        outs = m.session.run(req.inputs)
        outputs = {o["name"]: v for o, v in zip(m.manifest["outputs"], outs, strict=True)}
        content, extra, media = build_response(m.name, m.version, req, outputs)
    except NonFiniteOutput as e:
        return _error(500, str(e))
    except ProtocolError as e:
        return _error(400, str(e))
    except PackageNotFoundError as e:
        return _error(404, str(e))
    except KeiryoError as e:  # the session failed on a valid request: the function's side
        return _error(500, str(e))
    return 200, {"content-type": media, **extra}, content


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """One API Gateway proxy event -> one OIP response (binary bodies base64-encoded both ways)."""
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    method = (event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method") or "POST").upper()
    path = event.get("rawPath") or event.get("path") or "/"
    raw = event.get("body") or ""
    try:
        body = base64.b64decode(raw, validate=True) if event.get("isBase64Encoded") else str(raw).encode()
    except ValueError as e:
        status, out_headers, content = _error(400, f"body is not valid base64: {e}")
    else:
        status, out_headers, content = respond(method, path, headers, body)
    binary = out_headers["content-type"] != "application/json"
    return {
        "statusCode": status,
        "headers": out_headers,
        "body": base64.b64encode(content).decode() if binary else content.decode(),
        "isBase64Encoded": binary,
    }
