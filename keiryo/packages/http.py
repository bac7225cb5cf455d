"""A read-only HTTP server over a registry root, for agents and servers on other machines.

It serves only what a TUF client fetches: ``tuf/*.json`` and the files under ``packages/``; never
the lock, the log, hidden files (a half-written ``.partial`` folder) or anything outside the root.
``Range: bytes=N-`` is honoured so that an interrupted download resumes. Any static file server
(nginx, S3, a CDN) over the same folder works as well: trust comes from the signed metadata, not
from the server.
"""

from __future__ import annotations

import re
import shutil
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SAFE = re.compile(r"^(tuf/[0-9A-Za-z._-]+\.json|packages/[0-9A-Za-z._+-]+/[0-9A-Za-z._+-]+(/[0-9A-Za-z._+-]+)+)$")
RANGE = re.compile(r"^bytes=(\d+)-$")


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "keiryo-registry"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise here
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            parts = rel.split("/")
            if not SAFE.match(rel) or any(p.startswith(".") for p in parts):
                return self._fail(HTTPStatus.NOT_FOUND)
            f = root / rel
            if f.is_symlink() or not f.is_file() or root not in f.resolve().parents:
                return self._fail(HTTPStatus.NOT_FOUND)
            size = f.stat().st_size
            start = 0
            if m := RANGE.match(self.headers.get("Range", "")):
                start = int(m.group(1))
                if start >= size:
                    return self._fail(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if start else HTTPStatus.OK)
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Cache-Control", "no-cache" if rel.endswith("timestamp.json") else "max-age=60")
            self.end_headers()
            if body:
                with open(f, "rb") as fh:
                    fh.seek(start)
                    shutil.copyfileobj(fh, self.wfile)

        def _fail(self, status: HTTPStatus) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 8100) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer((host, port), _handler(Path(root).resolve()))
    srv.daemon_threads = True
    return srv


def serve_registry(root: str | Path, host: str = "127.0.0.1", port: int = 8100) -> None:
    with make_server(root, host, port) as srv:
        srv.serve_forever()
