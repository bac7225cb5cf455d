"""``run_server``: the app under uvicorn, as ``keiryo serve`` runs it (logging off the event loop,
SIGTERM drains)."""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any

from keiryo.serve.settings import ServeSettings, TLSSettings, uvicorn_options


class BackgroundLines(logging.Handler):
    """A handler that formats each record in the caller's thread and leaves the line in a deque; a
    background thread writes what has gathered every ``interval`` seconds, in one write.

    The caller never blocks on a slow stream and never wakes another thread: a ``QueueHandler``'s
    listener is woken by every record and then takes the GIL from the event loop, about 0.1 ms per
    request on 2 busy cores. Here the writer wakes on its own clock however many lines came (an idle
    server's wake-ups find nothing and go back to sleep). Lines reach the stream within ``interval``.

    The buffer is bounded (``max_lines``): when the stream stalls (a full stderr pipe nobody reads) and requests
    keep coming, the oldest lines are dropped and their count written once the stream moves again, so a flood
    of requests cannot grow the server's memory through its log."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.05, max_lines: int = 65536):
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._lines: deque[str] = deque(maxlen=max_lines)
        self.dropped = 0  # lines pushed out of the full buffer, not yet reported
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="keiryo-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """A line already formatted (the access log's, when this handler is its only destination)."""
        if len(self._lines) == self._lines.maxlen:
            self.dropped += 1  # approximate under races: only the writer thread reads it
        self._lines.append(line)

    def _write_loop(self) -> None:
        while not self._closing.wait(self.interval):
            self._write()

    def _write(self) -> None:
        out = []
        if self.dropped:
            n, self.dropped = self.dropped, 0
            out.append(f"keiryo: {n} log line(s) dropped: the log stream was too slow")
        while self._lines:
            out.append(self._lines.popleft())
        if out:
            try:
                self.stream.write("\n".join(out) + "\n")
                self.stream.flush()
            except Exception:  # a closed or broken stream: the lines are lost, the server goes on
                pass

    def stop(self) -> None:
        """Write out what is left and end the thread."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._write()


def _only_destination(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether every record ``logger`` passes on reaches ``handler`` alone, unfiltered and unformatted but
    for its message (as ``keiryo serve`` sets the logging up)."""
    chain: logging.Logger | None = logger
    while chain is not None and chain.parent is not None:
        if chain.handlers or chain.filters or not chain.propagate:
            return False
        chain = chain.parent  # type: ignore[assignment]
    root = logging.getLogger()
    fmt = handler.formatter
    return (
        root.handlers == [handler]
        and not root.filters
        and not handler.filters
        and fmt is not None
        and fmt._fmt == "%(message)s"
        and handler.level <= logging.INFO
    )


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
    (:class:`BackgroundLines`): a write to a slow stderr pipe never blocks the event loop, the write
    system calls leave the loop's thread (they were a fifth of its time under load), and the writer
    wakes every 50 ms, not once per line."""
    import signal

    import uvicorn

    from keiryo.serve.app import create_app
    from keiryo.serve.front import set_access_sink

    listener = BackgroundLines()
    listener.setFormatter(logging.Formatter("%(message)s"))
    level = getattr(logging, log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, handlers=[listener], force=True)
    listener.start()
    if _only_destination(logging.getLogger("keiryo.access"), listener):
        set_access_sink(listener.write_line)  # every access line ends here: no record, no formatter
    # uvicorn drains on SIGTERM, then raises the signal again for the handler that was there before
    # it: make that handler end the process through the ``finally`` below instead of killing it
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        app = (build or create_app)(store_root, settings)  # build: another assembly (keiryo app mounts /app)
        uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(settings, tls, limit_concurrency))
    finally:
        signal.signal(signal.SIGTERM, previous)
        set_access_sink(None)
        listener.stop()  # writes out what is still queued
