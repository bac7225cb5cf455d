"""The standard library's threaded HTTP/1.1 server, bounded: what keiryo's small OIP endpoints share (the device's
endpoint in :mod:`keiryo.agent.endpoint`, the serverless function in :mod:`keiryo.serverless_http`). No FastAPI, no
uvicorn, no torch.

- :class:`BoundedHTTPServer`: at most ``max_connections`` connections served at once (a further one is answered
  503 and closed at once, never queued); every read on a connection times out after ``read_timeout_s`` (the
  request line, headers, body, the next keep-alive request), which closes idle and stalled connections; the
  requests being answered are counted (``inflight``) so a shutdown can let them finish.
- :class:`OIPRequestHandler`: keep-alive, no line per request, ``reply``/``error`` (``{"error": ...}`` bodies) and
  ``read_body`` (``Content-Length`` required: 411 without it or for chunked bodies, 413 over the limit before a
  byte of the body is read).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class InFlight:
    """Requests being answered (not idle keep-alive connections)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *_: Any) -> None:
        with self._lock:
            self.count -= 1


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection never holds up the exit
    request_queue_size = 128

    def __init__(
        self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, max_connections: int, read_timeout_s: float
    ) -> None:
        self.read_timeout_s = read_timeout_s
        self.inflight = InFlight()
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in addr[0]:  # an IPv6 host: this server's socket only (the class attribute stays IPv4)
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # past the connection cap: refused at once, never queued
            body = b'{"error": "too many connections; retry"}'
            head = f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            try:
                request.sendall(head.encode() + b"connection: close\r\nretry-after: 1\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.read_timeout_s)
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class OIPRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "keiryo"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # no line per request

    def reply(self, status: int, headers: dict[str, str], body: bytes, close: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        if close:
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str, close: bool = False) -> None:
        self.reply(status, {"content-type": "application/json"}, json.dumps({"error": message}).encode(), close)

    def read_body(self, limit: int) -> bytes | None:
        """The request's body, or None once the request has been answered (411, 413) or the client stalled or left
        (the connection is then closed)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.error(411, "chunked bodies are not accepted; send Content-Length", close=True)
            return None
        length = (self.headers.get("content-length") or "").strip()
        if not length.isdigit():
            self.error(411, f"Content-Length {length[:40]!r}: expected the body's size in bytes", close=True)
            return None
        if int(length) > limit:
            self.error(413, f"body of {length} bytes: over the limit of {limit}", close=True)
            return None
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) < int(length):  # the client stalled mid-body or went away: nothing to answer
            self.close_connection = True
            return None
        return body
