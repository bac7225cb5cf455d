"""How the server's failures reach a client: the one mapping from an exception to a status
(:func:`status_of`) and the ``{"error": ...}`` body (:func:`error_body`). Every transport reads these:
the ASGI front, the FastAPI routes and gRPC (which translates the HTTP status to a gRPC code)."""

from __future__ import annotations

import json
import logging

from keiryo.errors import KeiryoError, PackageNotFoundError, RuntimeSessionError
from keiryo.serve.batching import QueueFull
from keiryo.serve.protocol import NonFiniteOutput, ProtocolError

events_log = logging.getLogger("keiryo.serve")


class HTTPError(Exception):
    """A refusal with its HTTP status (401, 403, 408, 413, ...) and optional response headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def status_of(e: BaseException) -> int:
    """The HTTP status for ``e``: the one mapping of the server's errors."""
    if isinstance(e, HTTPError):
        return e.status
    if isinstance(e, ProtocolError):
        return 400
    if isinstance(e, PackageNotFoundError):
        return 404
    if isinstance(e, QueueFull | TimeoutError):
        return 503
    if isinstance(e, RuntimeSessionError | NonFiniteOutput):
        return 500  # the model failed on a valid request: the server's side, not the client's
    if isinstance(e, KeiryoError):
        return 400
    return 500


_status_of = status_of  # the name tests and older callers know

# the same mapping for gRPC: an HTTP status -> the name of its grpc.StatusCode (INTERNAL for any other)
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    500: "INTERNAL",
}


def error_message(status: int, e: BaseException) -> str:
    """What the caller is told; a model failure is logged once with its traceback, a bug (500) is
    logged and not shown."""
    if isinstance(e, RuntimeSessionError | NonFiniteOutput):
        events_log.error("model run failed", exc_info=e)  # logged once with its traceback; the caller gets the reason
        return str(e)
    if status == 500:
        events_log.exception("internal error", exc_info=e)  # a bug: logged with its traceback, not shown to the caller
        return "internal error"
    return str(e) or ("request timed out" if isinstance(e, TimeoutError) else type(e).__name__)


def error_body(status: int, e: BaseException) -> bytes:
    return json.dumps({"error": error_message(status, e)}).encode()


_error_body = error_body
