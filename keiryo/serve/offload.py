"""Big JSON request bodies, parsed away from the event loop, a bounded number of bytes at once.

``json.loads`` and numpy's list conversion are C code that holds the GIL for the whole parse: in a worker
*thread* a 10 MB body still stalled the event loop for 0.20 s (measured; the same as parsing on the loop),
so health probes and small requests waited behind it. So bodies whose JSON part is at least
``parse_offload_bytes`` (256 KiB) go to a worker *process* (``_parse_worker.py``: numpy and ``protocol.py``
only, started on the first big body, never a fork of the server), which returns the parsed request (numpy
arrays, pickled) while the loop goes on serving. Small bodies are parsed on the loop, without a hop.

:class:`ByteBudget` caps the bytes handed to the worker at once (``parse_bytes_in_flight``): a request over
it is refused at once with 503 and ``Retry-After`` (no queue: a queue of big bodies would be memory, which is
what the cap is for).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from keiryo.serve.errors import HTTPError
from keiryo.serve.protocol import InferRequest, ProtocolError

WORKER = Path(__file__).with_name("_parse_worker.py")


class ByteBudget:
    """Bytes being parsed off the loop: a request takes its size or is refused; it gives them back when done."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.capacity:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


def json_part_size(body: bytes, header_length: str | None) -> int:
    """The bytes of a REST request's JSON part: the whole body, or the binary extension's JSON header."""
    if header_length is None:
        return len(body)
    try:
        return min(max(int(header_length), 0), len(body))
    except ValueError:
        return len(body)  # parse_request refuses it


def _retry(message: str) -> HTTPError:
    return HTTPError(503, message, {"Retry-After": "1"})


class OffLoopParser:
    """``parse_request`` in a worker process, one request at a time, within a :class:`ByteBudget`."""

    def __init__(self, capacity: int):
        self.budget = ByteBudget(capacity)
        self._proc: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None

    async def _worker(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", str(WORKER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        return self._proc

    async def parse(self, body: bytes, header_length: str | None, expected: dict[str, dict[str, Any]], n: int) -> InferRequest:
        b = self.budget
        if not b.take(n):
            raise _retry(f"too many large requests being parsed ({b.used} of {b.capacity} bytes in flight); retry shortly")
        try:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                kind, value = await self._exchange(body, header_length, expected)
        finally:
            b.give(n)
        if kind == "ok":
            rid, inputs, outputs, binary_outputs, binary_all = value
            return InferRequest(rid, inputs, outputs, binary_outputs, binary_all)
        if kind == "bad":
            raise ProtocolError(value)
        raise RuntimeError(f"request parser: {value}")  # a bug: 500, logged

    async def _exchange(self, body: bytes, header_length: str | None, expected: dict[str, Any]) -> tuple[str, Any]:
        proc = await self._worker()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            meta = json.dumps([header_length, expected]).encode()
            proc.stdin.write(struct.pack("<II", len(meta), len(body)) + meta)
            proc.stdin.write(body)
            await proc.stdin.drain()
            (size,) = struct.unpack("<Q", await proc.stdout.readexactly(8))
            return pickle.loads(await proc.stdout.readexactly(size))  # noqa: S301  # our own child's answer
        except (ConnectionError, asyncio.IncompleteReadError) as e:  # the worker died (killed, out of memory)
            self._kill()
            raise _retry("the request parser stopped; retry shortly") from e
        except BaseException:  # cancelled mid-exchange: the pipe is out of step, the next request gets a new worker
            self._kill()
            raise

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the worker exits at the end of its input
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
