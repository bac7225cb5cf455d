"""A server under uvicorn on a loopback port, in a thread, for tests and benches that drive it for real."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The app under uvicorn with the options ``keiryo serve`` uses (connection deadlines and cap); a context
    manager that returns once ``/v2/health/ready`` answers 200."""

    def __init__(self, app: Any, port: int | None = None):
        import uvicorn

        from keiryo.serve.settings import uvicorn_options

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        opts = uvicorn_options(app.server.settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **opts)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
