"""The serverless function behind a small HTTP/1.1 server: the process of ``keiryo deploy knative``'s Service.

``python -m keiryo.serverless_http [--host H] [--port P]`` (``$PORT``, which Knative sets, else 8080) verifies
and loads the model named by the environment (the variables of :mod:`keiryo.serverless`) **before** it binds
the port, so it never answers "not ready", and exits non-zero with one line when the package fails. It imports
the standard library's ``http.server``, onnxruntime and keiryo's package code: no torch, FastAPI or uvicorn,
which is what keeps a scale from zero short (bench/serve_cold.py).

Routes, OIP v2 REST: ``GET /v2/health/live|ready``, ``GET /v2/models/NAME[/versions/V]`` (metadata),
``POST /v2/models/NAME[/versions/V]/infer`` (JSON or the binary tensor extension); anything else is 404, another
model's name or version 404. Each request is answered by :func:`keiryo.serverless.respond`.

Limits, from the environment: a body over ``KEIRYO_MAX_BODY_BYTES`` (default 64 MiB) is refused with 413 before
it is read; a POST without ``Content-Length`` (chunked) gets 411; every read on a connection times out after
``KEIRYO_READ_TIMEOUT_S`` (default 30 s), which closes idle and stalled connections; at most
``KEIRYO_MAX_CONNECTIONS`` (default 64) connections are served at once, a further one gets 503 and is closed.
In Knative the queue-proxy sidecar sits in front of it (request timeouts, queueing); a server exposed to the
internet directly is ``keiryo serve``'s job.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from urllib.parse import unquote

from keiryo.errors import ConfigError, KeiryoError
from keiryo.serve.stdlib_http import BoundedHTTPServer, OIPRequestHandler
from keiryo.serverless import Loaded, init, respond

log = logging.getLogger("keiryo.serverless")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer)?$")
_HEALTH = ("/v2/health/live", "/v2/health/ready")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"${name}={raw!r}: expected a positive integer")
    return int(raw)


class _Handler(OIPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        loaded = self.server.loaded
        if path not in _HEALTH or method != "GET":
            m = _MODEL_PATH.match(path)
            if m is None or (method == "POST") != bool(m.group(3)):
                return self.error(404, f"{method} {path[:200]}: not an OIP route of this function", close=method == "POST")
            name, version = unquote(m.group(1)), m.group(2) and unquote(m.group(2))
            if name != loaded.name or version not in (None, loaded.version):
                wanted = f"{name[:100]!r}" + (f" version {version[:50]!r}" if version else "")
                return self.error(404, f"model {wanted} not found; this function serves {loaded.name!r} {loaded.version}", True)
        body = b""
        if method == "POST":
            read = self.read_body(self.server.max_body)
            if read is None:  # answered (411, 413) or the client stalled
                return None
            body = read
        with self.server.inflight:
            try:
                status, headers, content = respond(method, path, {k.lower(): v for k, v in self.headers.items()}, body)
            except Exception:  # a fault of the function, not of the request: logged once, answered 500
                log.exception("keiryo serverless: %s %s failed", method, path[:200])
                return self.error(500, "internal error of the function (logged)")
        self.reply(status, headers, content)
        return None


class _Server(BoundedHTTPServer):
    def __init__(self, addr: tuple[str, int], loaded: Loaded, max_body: int, max_connections: int, timeout_s: int) -> None:
        self.loaded, self.max_body = loaded, max_body
        super().__init__(addr, _Handler, max_connections=max_connections, read_timeout_s=timeout_s)


def make_server(host: str, port: int) -> _Server:
    """Verify and load the model (:func:`keiryo.serverless.init`), then bind ``host:port``."""
    loaded = init()
    max_body = _env_int("KEIRYO_MAX_BODY_BYTES", 64 * 1024 * 1024)
    conns = _env_int("KEIRYO_MAX_CONNECTIONS", 64)
    timeout_s = _env_int("KEIRYO_READ_TIMEOUT_S", 30)
    return _Server((host, port), loaded, max_body, conns, timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m keiryo.serverless_http", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=None, help="default: $PORT (Knative sets it), else 8080")
    ap.add_argument("--drain-s", type=float, default=20.0, help="on SIGTERM, wait this long for requests being answered")
    args = ap.parse_args(argv)
    try:
        port = args.port if args.port is not None else _env_int("PORT", 8080)
        server = make_server(args.host, port)
    except (KeiryoError, OSError) as e:
        print(f"keiryo serverless: {e}", file=sys.stderr)
        return 2
    loaded = server.loaded
    print(f"keiryo serverless: {loaded.name} {loaded.version} verified, on http://{args.host}:{port}", flush=True)

    # SIGTERM: stop accepting (shutdown() waits for serve_forever, so from another thread), then below, let the
    # requests being answered finish before the exit
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    deadline = time.monotonic() + args.drain_s
    while server.inflight.count and time.monotonic() < deadline:
        time.sleep(0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
