"""Connection-level defences uvicorn does not have: a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle *after* a response, but not one that never
sends a request, nor one that sends a header a byte at a time (every byte resets its idle timer):
300 such connections held open for minutes exhaust a server's sockets. :func:`header_timeout_protocol`
subclasses uvicorn's HTTP protocol so that a connection must deliver complete request headers within
``seconds`` of being opened (or of its previous response); otherwise it is closed. The deadlines are
entries in a :class:`~keiryo.serve.deadlines.Deadlines` of the loop (no timer per request). A body that
stalls is the ASGI front's business (a read timeout per chunk, 408).
"""

from __future__ import annotations

from typing import Any

from keiryo.serve.deadlines import Deadlines


def _close(protocol: Any) -> None:
    if not protocol.transport.is_closing():
        protocol.transport.close()  # no response: the client never finished asking


def header_timeout_protocol(seconds: float) -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    tick = Deadlines.tick_for(seconds)

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _deadlines: Deadlines | None = None  # the server loop's, shared by its connections

        def _headers_due(self) -> Deadlines:
            d = HeaderTimeoutProtocol._deadlines
            if d is None or d.loop is not self.loop:  # a new server (tests start several, one loop each)
                d = HeaderTimeoutProtocol._deadlines = Deadlines(self.loop, tick)
            return d

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._headers_due().watch(self, seconds, _close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            d = self._headers_due()
            if not d.watching(self):  # the deadline runs from the connection's start or its previous response
                d.watch(self, seconds, _close)

        def on_headers_complete(self) -> None:
            self._headers_due().forget(self)
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._headers_due().watch(self, seconds, _close)  # the next request's headers are due as well

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_due().forget(self)
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
