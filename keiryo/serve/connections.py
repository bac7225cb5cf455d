"""Connection-level defences uvicorn does not have: a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle *after* a response, but not one that never
sends a request, nor one that sends a header a byte at a time (every byte resets its idle timer):
300 such connections held open for minutes exhaust a server's sockets. :func:`header_timeout_protocol`
subclasses uvicorn's HTTP protocol so that a connection must deliver complete request headers within
``seconds`` of being opened (or of its previous response); otherwise it is closed. A body that stalls is
the ASGI front's business (a read timeout per chunk, 408).
"""

from __future__ import annotations

import asyncio
from typing import Any


def header_timeout_protocol(seconds: float) -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _header_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expire(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()  # no response: the client never finished asking

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers are due as well (keep-alive idles are uvicorn's)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
