"""``run_server``: the app under uvicorn, as ``keiryo serve`` runs it (logging off the event loop,
SIGTERM drains)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from keiryo.serve.settings import ServeSettings, TLSSettings, uvicorn_options


def run_server(
    store_root: str | Path | None,
    settings: ServeSettings,
    host: str,
    port: int,
    log_level: str = "info",
    *,
    tls: TLSSettings | None = None,
    limit_concurrency: int | None = 1000,
    build: Any = None,
) -> None:
    """Run with uvicorn; SIGTERM drains in-flight requests before exiting.

    keiryo's log lines (one JSON access line per request) go to stderr from a background thread
    (``QueueHandler`` → ``QueueListener``): a write to a slow stderr pipe never blocks the event loop,
    and the write system calls leave the loop's thread (they were a fifth of its time under load)."""
    import queue
    import signal
    import sys
    from logging.handlers import QueueHandler, QueueListener

    import uvicorn

    from keiryo.serve.app import create_app

    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, logging.StreamHandler())  # the QueueHandler has formatted the line
    level = getattr(logging, log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", handlers=[QueueHandler(records)], force=True)
    listener.start()
    # uvicorn drains on SIGTERM, then raises the signal again for the handler that was there before
    # it: make that handler end the process through the ``finally`` below instead of killing it
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        app = (build or create_app)(store_root, settings)  # build: another assembly (keiryo app mounts /app)
        uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(settings, tls, limit_concurrency))
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.stop()  # writes out what is still queued
