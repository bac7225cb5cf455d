"""The device's local inference endpoint: a small Open Inference Protocol v2 server over the agent's
active model, on the standard library's threaded HTTP server (no FastAPI, no torch on the device).

- ``GET /v2/health/live``; ``GET /v2/health/ready`` (503 with the reason while no verified model is
  active or the model is stale); ``GET /v2/models/NAME``; ``POST /v2/models/NAME/infer`` (JSON or
  binary tensors, as the server); ``GET /agent/status`` (state record, active version).
- Requests read the active model once, so a swap never fails a request: in-flight requests finish
  on the version they started on.
- Optional bearer key (``api_key``); bodies over ``body_limit_bytes`` are refused with 413; at most
  ``max_connections`` at once, every read timing out after ``read_timeout_s`` (:mod:`keiryo.serve.stdlib_http`).
"""

from __future__ import annotations

import hmac
import json
import threading
from typing import Any

from keiryo.errors import KeiryoError, PackageNotFoundError, RuntimeSessionError
from keiryo.serve.stdlib_http import BoundedHTTPServer, OIPRequestHandler


def _handler(agent: Any, api_key: str | None, body_limit: int) -> type[OIPRequestHandler]:
    from keiryo.serve.protocol import HEADER, ProtocolError, build_response, parse_request

    class Handler(OIPRequestHandler):
        server_version = "keiryo-agent"

        def _send(self, status: int, body: bytes, media: str = "application/json", extra: dict[str, str] | None = None) -> None:
            self.reply(status, {"Content-Type": media, **(extra or {})}, body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if hmac.compare_digest(given.encode(), api_key.encode()):
                return True
            self._json(401, {"error": "missing or wrong bearer key"})
            return False

        def do_GET(self) -> None:
            act = agent.active
            if self.path == "/v2/health/live":
                return self._json(200, {"live": True})
            if self.path == "/v2/health/ready":
                why = "no verified model is active yet" if act is None else agent.stale_reason()
                return self._json(503, {"ready": False, "error": why}) if why else self._json(200, {"ready": True})
            if not self._authorized():
                return None
            if self.path == "/agent/status":
                return self._json(200, {"active": act and act.version, **json.loads(agent.rec.model_dump_json())})
            if self.path == f"/v2/models/{agent.cfg.name}" and act is not None:
                m = act.manifest
                return self._json(
                    200,
                    {
                        "name": agent.cfg.name,
                        "versions": [act.version],
                        "platform": f"{m['runtime']}_{m['format']}",
                        "inputs": m["inputs"],
                        "outputs": m["outputs"],
                    },
                )
            return self._json(404, {"error": f"unknown path {self.path[:100]!r}"})

        def do_POST(self) -> None:
            if not self._authorized():
                return None
            if self.path != f"/v2/models/{agent.cfg.name}/infer":
                return self._json(404, {"error": f"unknown path {self.path[:100]!r}; this device serves {agent.cfg.name}"})
            body = self.read_body(body_limit)
            if body is None:  # answered (411, 413) or the client stalled
                return None
            try:
                act = agent.active
                if act is None:
                    raise RuntimeSessionError("no verified model is active on this device yet")
                req = parse_request(body, self.headers.get(HEADER), {t["name"]: t for t in act.manifest["inputs"]})
                act, outputs = agent.infer(req.inputs)
                content, extra, media = build_response(agent.cfg.name, act.version, req, outputs)
                self._send(200, content, media, extra)
            except ProtocolError as e:
                self._json(400, {"error": str(e)})
            except PackageNotFoundError as e:
                self._json(404, {"error": str(e)})
            except (RuntimeSessionError, KeiryoError) as e:
                self._json(503, {"error": str(e)})

    return Handler


class Endpoint:
    """Runs the local endpoint in a background thread; ``with Endpoint(agent, port) as ep: ...``."""

    def __init__(
        self,
        agent: Any,
        host: str = "127.0.0.1",
        port: int = 8200,
        *,
        api_key: str | None = None,
        body_limit_bytes: int = 16 << 20,
        max_connections: int = 64,
        read_timeout_s: float = 30,
    ):
        handler = _handler(agent, api_key, body_limit_bytes)
        self.httpd = BoundedHTTPServer((host, port), handler, max_connections=max_connections, read_timeout_s=read_timeout_s)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="keiryo-agent-endpoint", daemon=True)

    def __enter__(self) -> Endpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
