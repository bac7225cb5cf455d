"""keiryo's HTTP/1.1 connection protocol: uvicorn's (httptools), with what uvicorn does not do.

- **A deadline for a request's headers.** uvicorn closes a keep-alive connection that stays idle *after* a
  response, but not one that never sends a request, nor one that sends a header a byte at a time (every byte
  resets its idle timer): 300 such connections held open for minutes exhaust a server's sockets. Here a
  connection must deliver complete request headers within ``header_timeout_s`` of being opened (or of its
  previous response); otherwise it is closed. The deadlines are entries in the loop's
  :class:`~keiryo.serve.deadlines.Deadlines` (no timer per request). A body that stalls is the ASGI front's
  business (a read timeout per chunk, 408).
- **One write per response.** uvicorn writes a response's status line and headers when the app starts the
  response, and the body when it sends it: two ``send`` system calls and two TCP segments for every small
  answer, and a client that wakes for the first and waits for the second. The protocol puts its
  :class:`OneWrite` transport in the request's scope (``scope["extensions"]["keiryo.one_write"]``); an app that
  sends the body right after the start (the front's inference answers) calls ``hold_next()`` first, and the
  head then leaves with the body in one write.
"""

from __future__ import annotations

from typing import Any

from keiryo.serve.deadlines import Deadlines


class OneWrite:
    """The connection's transport, which can hold a response's head (``hold_next()``, then the next write) until
    the write after it and send both at once. Everything else passes through to the real transport."""

    __slots__ = ("_transport", "_hold", "_head")

    def __init__(self, transport: Any):
        self._transport = transport
        self._hold = False  # the next write is a head whose body comes in the same loop turn
        self._head: bytes | None = None

    def hold_next(self) -> None:
        self._hold = True

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) < 65536:
                self._transport.write(b"".join((head, data)))  # one send
            else:
                self._transport.writelines((head, data))  # no copy of a big body (one writev on uvloop)
        elif self._hold:
            self._hold = False
            self._head = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        self._hold = False
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport's interface (abort, set_protocol, ...)
        return getattr(self._transport, name)


def _close(protocol: Any) -> None:
    if not protocol.transport.is_closing():
        protocol.transport.close()  # no response: the client never finished asking


def http_protocol(header_timeout_s: float) -> type:
    """The protocol class for uvicorn's ``http`` setting."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    seconds = header_timeout_s
    tick = Deadlines.tick_for(seconds)

    class KeiryoHTTPProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _due: Deadlines  # the server loop's header deadlines, shared by its connections

        def connection_made(self, transport: Any) -> None:
            self._one_write = OneWrite(transport)
            super().connection_made(self._one_write)  # type: ignore[arg-type]  # a Transport in all it is asked for
            self._due = Deadlines.of(self.loop, tick)
            self._due.watch(self, seconds, _close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._due.watching(self):  # the deadline runs from the connection's start or its previous response
                self._due.watch(self, seconds, _close)

        def on_headers_complete(self) -> None:
            self._due.forget(self)
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions["keiryo.one_write"] = self._one_write
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._one_write.flush()  # held, and no body came (never with the front's answers; a safety net)
            super().on_response_complete()
            self._due.watch(self, seconds, _close)  # the next request's headers are due as well

        def connection_lost(self, exc: Exception | None) -> None:
            self._due.forget(self)
            super().connection_lost(exc)

    return KeiryoHTTPProtocol
